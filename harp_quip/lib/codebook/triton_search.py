"""Fused nearest-candidate search on CUDA (Triton): argmax_j (bias_j + <z_i, u_j>)
over C candidates for 8-dim rows z_i, without materializing the N x C score matrix.

Same contract as `torch.addmm(bias, z, ut).argmax(1)` (first index of the maximum);
scores are fp32 sums in a fixed order, so near-ties may resolve differently from
cuBLAS at the last ulp. Used by E8P12's exact search when Triton and a CUDA tensor
are available; `available()` says whether it can run.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def available(x):
    return triton is not None and x.is_cuda and x.dtype == torch.float32


if triton is not None:
    @triton.jit
    def _argmax_kernel(z_ptr, ut_ptr, bias_ptr, out_ptr, N, C,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """Running elementwise max over candidate tiles, one reduction at the end."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        z0 = tl.load(z_ptr + rows * 8 + 0, mask=row_mask, other=0.0)[:, None]
        z1 = tl.load(z_ptr + rows * 8 + 1, mask=row_mask, other=0.0)[:, None]
        z2 = tl.load(z_ptr + rows * 8 + 2, mask=row_mask, other=0.0)[:, None]
        z3 = tl.load(z_ptr + rows * 8 + 3, mask=row_mask, other=0.0)[:, None]
        z4 = tl.load(z_ptr + rows * 8 + 4, mask=row_mask, other=0.0)[:, None]
        z5 = tl.load(z_ptr + rows * 8 + 5, mask=row_mask, other=0.0)[:, None]
        z6 = tl.load(z_ptr + rows * 8 + 6, mask=row_mask, other=0.0)[:, None]
        z7 = tl.load(z_ptr + rows * 8 + 7, mask=row_mask, other=0.0)[:, None]
        best = tl.full((BLOCK_N, BLOCK_C), float("-inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_N, BLOCK_C), tl.int32)
        for start in range(0, C, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            col_mask = cols < C
            scores = tl.load(bias_ptr + cols, mask=col_mask, other=float("-inf"))[None, :]
            scores += z0 * tl.load(ut_ptr + 0 * C + cols, mask=col_mask, other=0.0)[None, :]
            scores += z1 * tl.load(ut_ptr + 1 * C + cols, mask=col_mask, other=0.0)[None, :]
            scores += z2 * tl.load(ut_ptr + 2 * C + cols, mask=col_mask, other=0.0)[None, :]
            scores += z3 * tl.load(ut_ptr + 3 * C + cols, mask=col_mask, other=0.0)[None, :]
            scores += z4 * tl.load(ut_ptr + 4 * C + cols, mask=col_mask, other=0.0)[None, :]
            scores += z5 * tl.load(ut_ptr + 5 * C + cols, mask=col_mask, other=0.0)[None, :]
            scores += z6 * tl.load(ut_ptr + 6 * C + cols, mask=col_mask, other=0.0)[None, :]
            scores += z7 * tl.load(ut_ptr + 7 * C + cols, mask=col_mask, other=0.0)[None, :]
            better = scores > best
            best = tl.where(better, scores, best)
            best_idx = tl.where(better, cols[None, :], best_idx)
        top = tl.max(best, axis=1)
        first = tl.min(tl.where(best == top[:, None], best_idx, C), axis=1)
        tl.store(out_ptr + rows, first, mask=row_mask)


def argmax_scores(z, ut, bias, block_n=64, block_c=64):
    """Index (int64, (N,)) of max_j bias_j + z_i . ut[:, j]; z (N, 8), ut (8, C), fp32 CUDA."""
    z, ut, bias = z.contiguous(), ut.contiguous(), bias.contiguous()
    n, c = z.shape[0], ut.shape[1]
    out = torch.empty(n, dtype=torch.int32, device=z.device)
    if n:
        _argmax_kernel[(triton.cdiv(n, block_n),)](z, ut, bias, out, n, c,
                                                   BLOCK_N=block_n, BLOCK_C=block_c)
    return out.long()
