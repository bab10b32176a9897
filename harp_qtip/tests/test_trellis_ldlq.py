"""Block LDLQ (the mirrored lib/algo/ldlq.py) with the trellis quantizer: 16-column
blocks, each a batch of 16 x 16 tiles through Viterbi, codes in tile order."""
import pytest
import torch

from lib.algo.harp_target import CodebookTarget
from lib.algo.ldlq import block_ldl, ldlq, proxy_loss
from lib.codebook import get_codebook


def gen(seed):
    return torch.Generator().manual_seed(seed)


def correlated_hessian(n, seed, decay=0.9):
    """A strongly correlated SPD H (AR(1)-like covariance of decay^|i-j| plus a random
    low-rank part), normalized and damped as the pipeline does."""
    idx = torch.arange(n, dtype=torch.float64)
    H = decay ** (idx[:, None] - idx[None, :]).abs()
    A = torch.randn(n, 4, generator=gen(seed), dtype=torch.float64)
    H = H + A @ A.T / 4
    H = H / H.diagonal().mean()
    return H + 0.01 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("config", [
    {"L": 8, "K": 2, "V": 1, "decode_mode": "1mad"},
    {"L": 10, "K": 2, "V": 1, "decode_mode": "3inst"},
    {"L": 8, "K": 3, "V": 1, "decode_mode": "1mad"},
])
def test_ldlq_lowers_the_proxy_loss_against_direct_rounding(config):
    """tr(E H E^T) of LDLQ is well below that of rounding every tile on its own (the
    same quantizer without error feedback), on a batch of two problems."""
    cb = get_codebook(**config)
    m, n = 32, 96
    W = torch.randn(2, m, n, generator=gen(1), dtype=torch.float64) * cb.code_rms
    H = torch.stack([correlated_hessian(n, 0), correlated_hessian(n, 1)])
    W_hat, codes = ldlq(W, H, cb)
    direct = cb.round_independently(W)
    for b in range(2):
        ldlq_loss, direct_loss = proxy_loss(W[b], W_hat[b], H[b]), proxy_loss(W[b], direct[b], H[b])
        assert ldlq_loss < 0.8 * direct_loss, (ldlq_loss, direct_loss)
        assert torch.equal(cb.decode_matrix(codes[b], m, n).double(), W_hat[b])
    assert codes.shape == (2, *cb.code_shape(m, n))


def test_ldlq_error_decomposes_over_blocks():
    """With H = L' D L'^T (16 x 16 blocks), LDLQ's proxy loss is sum_k f_k D_k f_k^T where
    f_k is the rounding error of block k's LDLQ target: the feedback cancels the rest."""
    cb = get_codebook(L=8, K=2, V=1, decode_mode="1mad")
    m, n = 16, 64
    W = torch.randn(m, n, generator=gen(5), dtype=torch.float64)
    H = correlated_hessian(n, 2)
    W_hat, _ = ldlq(W, H, cb)
    L, D = block_ldl(H[None], 16)
    L, D = L[0], D[0]
    E = W - W_hat
    total = torch.zeros((), dtype=torch.float64)
    for k in range(n // 16):
        cols, rest = slice(16 * k, 16 * (k + 1)), slice(16 * (k + 1), n)
        target = W[:, cols] + E[:, rest] @ L[rest, cols]
        f = target - W_hat[:, cols]
        total += torch.trace(f @ D[k] @ f.T)
    torch.testing.assert_close(torch.trace(E @ H @ E.T), total, rtol=1e-9, atol=1e-12)


def test_single_matrix():
    cb = get_codebook(L=8, K=2, V=1, decode_mode="1mad")
    W = torch.randn(16, 48, generator=gen(6), dtype=torch.float64)
    H = correlated_hessian(48, 3)
    W_hat, codes = ldlq(W, H, cb)
    assert W_hat.shape == W.shape and codes.shape == cb.code_shape(16, 48)
    assert torch.equal(ldlq(W[None], H[None], cb)[1][0], codes)


def test_harp_target_scale_and_feedback():
    """HARP's target from the trellis codebook: s = (RMS + 1e-8) / (code RMS * override),
    independent per-tile rounding, and with feedback exactly LDLQ's output."""
    cb = get_codebook(L=8, K=2, V=1, decode_mode="1mad")
    target = CodebookTarget(cb, 0.9, chunk_size=3)
    Wt = torch.randn(2, 32, 32, generator=gen(7)) * 3
    s = target.scale(Wt)
    expected = (Wt.square().mean(dim=(-2, -1), keepdim=True).sqrt() + 1e-8) / (cb.code_rms * 0.9)
    torch.testing.assert_close(s, expected)
    assert torch.equal(target(Wt / s), cb.round_independently(Wt / s))
    Ht = torch.stack([correlated_hessian(32, 4), correlated_hessian(32, 5)]).float()
    assert torch.equal(target.with_feedback(Wt / s, Ht), ldlq(Wt / s, Ht, cb)[0])
