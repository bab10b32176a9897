"""Block LDL decomposition and block LDLQ (QuIP#, with E8 vectors of g = 8 columns).

With H = L L^T (Cholesky) and L_kk its g x g diagonal blocks, H = L' D L'^T where
L' = L with block column k multiplied by L_kk^{-1} (unit block lower triangular) and
D_k = L_kk L_kk^T. LDLQ rounds the blocks from the last to the first,

    W^_k = Q(W_k + (W_{>k} - W^_{>k}) L'_{>k,k}),

so the proxy loss tr((W - W^) H (W - W^)^T) = sum_k f_k D_k f_k^T with f_k the k-th
rounding error (the error feedback cancels the off-diagonal part of H).
"""
import torch


class CholeskyError(RuntimeError):
    """The matrix is not numerically positive definite, even with jitter."""


def cholesky_with_jitter(H, tries=5):
    """Cholesky of the symmetrized H; on failure add 1e-8 * mean|diag| * 10^(i-1), i = 1..tries."""
    H = (H + H.T) / 2
    base = H.diagonal().abs().mean()
    for i in range(tries + 1):
        A = H if i == 0 else H + torch.eye(H.shape[0], dtype=H.dtype, device=H.device) * (
            base * 1e-8 * 10 ** (i - 1))
        L, info = torch.linalg.cholesky_ex(A)
        if info.item() == 0 and torch.isfinite(L).all():
            return L
    raise CholeskyError(f"Cholesky failed in {H.dtype} after {tries} jitter retries")


def block_ldl(H, g):
    """Unit block lower factor L' and diagonal blocks D (n/g, g, g) with H = L' D L'^T."""
    n = H.shape[0]
    L = cholesky_with_jitter(H)
    nb = n // g
    blocks = L.reshape(nb, g, nb, g)
    diag = blocks[torch.arange(nb), :, torch.arange(nb), :]
    inv_diag = torch.linalg.inv(diag)
    unit = torch.einsum("ipjq,jqr->ipjr", blocks, inv_diag).reshape(n, n)
    D = diag @ diag.transpose(1, 2)
    return unit, D


def ldlq(W, H, codebook, tune_iters=0):
    """Quantize W (m x n, in codebook units) with block LDLQ on H, then `tune_iters`
    passes of block coordinate descent: W^_k = Q(W^_k + (W - W^) H_{:,k} H_kk^{-1}).

    Returns (W^, codes) with codes of shape (m, n / g) in codebook order.
    """
    m, n = W.shape
    g = codebook.codesz
    nb = n // g
    L, _ = block_ldl(H, g)
    W_hat = torch.zeros_like(W)
    err = torch.zeros_like(W)
    codes = torch.zeros(m, nb, dtype=torch.int64, device=W.device)

    def place(k, target):
        cols = slice(k * g, (k + 1) * g)
        W_hat[:, cols], codes[:, k:k + 1] = codebook.quantize(target)
        err[:, cols] = W[:, cols] - W_hat[:, cols]

    for k in reversed(range(nb)):
        rest = slice((k + 1) * g, n)
        cols = slice(k * g, (k + 1) * g)
        place(k, W[:, cols] + err[:, rest] @ L[rest, cols])

    if tune_iters > 0:
        Hd = H.reshape(nb, g, nb, g)[torch.arange(nb), :, torch.arange(nb), :]
        Hd_inv = torch.linalg.inv(Hd)
        for _ in range(tune_iters):
            for k in reversed(range(nb)):
                cols = slice(k * g, (k + 1) * g)
                place(k, W_hat[:, cols] + (err @ H[:, cols]) @ Hd_inv[k])
    return W_hat, codes


def proxy_loss(W, W_hat, H):
    """tr((W - W^) H (W - W^)^T) / tr(W H W^T)."""
    D = W - W_hat
    return (torch.sum((D @ H) * D) / torch.sum((W @ H) * W)).item()
