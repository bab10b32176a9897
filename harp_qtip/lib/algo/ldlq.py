"""Block LDL decomposition and block LDLQ with any codebook of the pipeline contract
(lib/codebook/base.py): blocks of g = codebook.block_width columns (QuIP#: E8 vectors,
g = 8; QTIP: 16-column blocks of 16 x 16 trellis tiles).

With H = L L^T (Cholesky) and L_kk its g x g diagonal blocks, H = L' D L'^T where
L' = L with block column k multiplied by L_kk^{-1} (unit block lower triangular) and
D_k = L_kk L_kk^T. LDLQ rounds the blocks from the last to the first,

    W^_k = Q(W_k + (W_{>k} - W^_{>k}) L'_{>k,k}),

so the proxy loss tr((W - W^) H (W - W^)^T) = sum_k f_k D_k f_k^T with f_k the k-th
rounding error (the error feedback cancels the off-diagonal part of H).

Every function takes one matrix or a batch (leading dim B) of same-shape problems,
which are solved independently with the same number of kernel launches.
"""
import torch


class CholeskyError(RuntimeError):
    """Not numerically positive definite, even with jitter; `failed` lists the batch
    indices concerned."""

    def __init__(self, message, failed=()):
        super().__init__(message)
        self.failed = list(failed)


def _diagonal_blocks(A, g):
    """(..., n/g, g, g) diagonal blocks of A (..., n, n)."""
    n = A.shape[-1]
    blocks = A.reshape(*A.shape[:-2], n // g, g, n // g, g)
    return blocks.diagonal(dim1=-4, dim2=-2).permute(*range(A.dim() - 2), -1, -3, -2)


def cholesky_with_jitter(H, tries=5):
    """(L, ok): Cholesky of the symmetrized H (..., n, n); where it fails, retry with
    1e-8 * mean|diag| * 10^(i-1) added to the diagonal, i = 1..tries. ok marks the
    matrices that succeeded."""
    H = (H + H.transpose(-1, -2)) / 2
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    base = H.diagonal(dim1=-2, dim2=-1).abs().mean(-1)[..., None, None]
    L, info = torch.linalg.cholesky_ex(H)
    ok = (info == 0) & torch.isfinite(L).flatten(-2).all(-1)
    for i in range(1, tries + 1):
        if bool(ok.all()):
            break
        L_try, info = torch.linalg.cholesky_ex(H + eye * base * 1e-8 * 10 ** (i - 1))
        fixed = ~ok & (info == 0) & torch.isfinite(L_try).flatten(-2).all(-1)
        L = torch.where(fixed[..., None, None], L_try, L)
        ok = ok | fixed
    return L, ok


def block_ldl(H, g):
    """Unit block lower factor L' and diagonal blocks D (..., n/g, g, g), H = L' D L'^T.
    Raises CholeskyError (with the failed batch indices) if H is not PD even with jitter."""
    L, ok = cholesky_with_jitter(H)
    if not bool(ok.all()):
        failed = torch.nonzero(~ok.reshape(-1)).flatten().tolist()
        raise CholeskyError(f"Cholesky failed in {H.dtype} after jitter retries", failed)
    n = H.shape[-1]
    diag = _diagonal_blocks(L, g)
    inv_diag = torch.linalg.inv(diag)
    blocks = L.reshape(*L.shape[:-2], n // g, g, n // g, g)
    unit = torch.einsum("...ipjq,...jqr->...ipjr", blocks, inv_diag).reshape(L.shape)
    return unit, diag @ diag.transpose(-1, -2)


def ldlq(W, H, codebook, tune_iters=0):
    """Quantize W ((B,) m, n, in codebook units) with block LDLQ on H ((B,) n, n), then
    `tune_iters` passes of block coordinate descent:
    W^_k = Q(W^_k + (W - W^) H_{:,k} H_kk^{-1}). Returns (W^, codes ((B,) *code_shape(m, n)))."""
    single = W.dim() == 2
    if single:
        W, H = W[None], H[None]
    B, m, n = W.shape
    g = codebook.block_width
    nb = n // g
    L, _ = block_ldl(H, g)
    W_hat = torch.zeros_like(W)
    err = torch.zeros_like(W)
    blocks = [None] * nb

    def place(k, target):
        cols = slice(k * g, (k + 1) * g)
        W_hat[..., cols], blocks[k] = codebook.quantize_block(target)
        err[..., cols] = W[..., cols] - W_hat[..., cols]

    for k in reversed(range(nb)):
        rest, cols = slice((k + 1) * g, n), slice(k * g, (k + 1) * g)
        place(k, W[..., cols] + err[..., rest] @ L[..., rest, cols])

    if tune_iters > 0:
        Hd_inv = torch.linalg.inv(_diagonal_blocks(H, g))
        for _ in range(tune_iters):
            for k in reversed(range(nb)):
                cols = slice(k * g, (k + 1) * g)
                place(k, W_hat[..., cols] + (err @ H[..., :, cols]) @ Hd_inv[:, k])
    codes = codebook.join_block_codes(blocks)
    if single:
        return W_hat[0], codes[0]
    return W_hat, codes


def proxy_loss(W, W_hat, H):
    """tr((W - W^) H (W - W^)^T) / tr(W H W^T), per matrix of a batch (float or (B,) tensor)."""
    D = W - W_hat
    ratio = torch.sum((D @ H) * D, dim=(-2, -1)) / torch.sum((W @ H) * W, dim=(-2, -1))
    return ratio.item() if ratio.dim() == 0 else ratio
