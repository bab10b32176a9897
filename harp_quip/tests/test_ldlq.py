"""Block LDL and LDLQ against independent computations."""
import pytest
import torch

from lib.algo.ldlq import CholeskyError, block_ldl, cholesky_with_jitter, ldlq, proxy_loss
from lib.codebook import get_codebook


def random_hessian(n, seed, tokens=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens or 4 * n, n, generator=g) * torch.linspace(0.2, 3, n)
    X[:, : n // 4] += 2 * torch.randn(X.shape[0], 1, generator=g)   # correlated columns
    H = X.T @ X / X.shape[0]
    return H / H.diagonal().mean() + 0.01 * torch.eye(n)


def test_block_ldl_reconstructs_h():
    H = random_hessian(64, 0).double()
    L, D = block_ldl(H, 8)
    Dfull = torch.block_diag(*D)
    torch.testing.assert_close(L @ Dfull @ L.T, H, atol=1e-9, rtol=0)
    for k in range(8):
        blk = L[8 * k:8 * k + 8, 8 * k:8 * k + 8]
        torch.testing.assert_close(blk, torch.eye(8, dtype=H.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(L.triu(1), torch.zeros_like(L), atol=1e-12, rtol=0)


def test_ldlq_loss_equals_ldl_formula_and_beats_rounding():
    cb = get_codebook("E8P12")
    g = torch.Generator().manual_seed(1)
    H = random_hessian(128, 1).double()
    W = torch.randn(64, 128, generator=g, dtype=torch.float64) * cb.opt_scale
    W_hat, codes = ldlq(W, H, cb, tune_iters=0)
    torch.testing.assert_close(cb.decode(codes).reshape(W.shape).double(), W_hat)
    # tr(E H E^T) = sum_k f_k D_k f_k^T where f = E L' is the per-block rounding error.
    L, D = block_ldl(H, 8)
    F = (W - W_hat) @ L
    ldl_loss = sum(torch.sum((F[:, 8 * k:8 * k + 8] @ D[k]) * F[:, 8 * k:8 * k + 8]) for k in range(16))
    E = W - W_hat
    torch.testing.assert_close(torch.sum((E @ H) * E), ldl_loss, rtol=1e-9, atol=0)
    rounded, _ = cb.quantize(W)
    assert proxy_loss(W, W_hat, H) < 0.9 * proxy_loss(W, rounded, H)


def test_tune_iters_do_not_increase_loss():
    cb = get_codebook("E8P12")
    H = random_hessian(64, 2).double()
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    losses = [proxy_loss(W, ldlq(W, H, cb, tune_iters=t)[0], H) for t in (0, 1, 5)]
    assert losses[1] <= losses[0] + 1e-12 and losses[2] <= losses[1] + 1e-12


def test_cholesky_jitter_rescues_semidefinite_and_fails_on_indefinite():
    X = torch.randn(8, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    H = X.T @ X           # rank 8 < 32: singular
    L, ok = cholesky_with_jitter(H)
    assert bool(ok) and torch.isfinite(L).all()
    batch = torch.stack([torch.eye(32), -torch.eye(32), H])
    _, ok = cholesky_with_jitter(batch)
    assert ok.tolist() == [True, False, True]
    with pytest.raises(CholeskyError) as info:
        block_ldl(batch.double(), 8)
    assert info.value.failed == [1]


def test_batched_ldlq_equals_one_by_one():
    cb = get_codebook("E8P12")
    Hs = torch.stack([random_hessian(64, s).double() for s in (3, 4, 5)])
    Ws = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    W_hat, codes = ldlq(Ws, Hs, cb, tune_iters=2)
    for i in range(3):
        one_hat, one_codes = ldlq(Ws[i], Hs[i], cb, tune_iters=2)
        assert torch.equal(codes[i], one_codes)
        torch.testing.assert_close(W_hat[i], one_hat)
    losses = proxy_loss(Ws, W_hat, Hs)
    assert losses.shape == (3,)
    assert abs(losses[1].item() - proxy_loss(Ws[1], W_hat[1], Hs[1])) < 1e-12
