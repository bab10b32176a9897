"""Tests for lib.codebook: the E8P12 grid, its code layout and exact quantizer."""
import itertools

import pytest
import torch

from lib.codebook import CODEBOOKS, get_codebook
from lib.codebook.e8p12 import (
    COORD_OF_SIGN_BIT, NORM12_PATTERNS, abs_patterns, packed_abs_table, search_candidates)
from lib.utils.errors import UserInputError

ALL_CODES = torch.arange(1 << 16)


@pytest.fixture(scope="module")
def cb():
    return get_codebook("E8P12")


@pytest.fixture(scope="module")
def grid(cb):
    return cb.grid


def shifts_of(codes):
    """+1/4 for codes with an even number of sign bits, -1/4 for odd."""
    bits = codes & 0xFF
    odd = sum((bits >> b) & 1 for b in range(8)) % 2
    return 0.25 - 0.5 * odd.to(torch.float64)


def unshifted(grid):
    return grid.to(torch.float64) - shifts_of(ALL_CODES)[:, None]


def brute_force_min_dist2(x, grid, rows=256):
    """min over all 65,536 grid points of ||x - g||^2 by a full scan, in float64."""
    g = grid.to(torch.float64)
    g_norm2 = (g * g).sum(dim=1)
    out = []
    for chunk in x.to(torch.float64).split(rows):
        d2 = torch.addmm(g_norm2, chunk, g.T, alpha=-2) + (chunk * chunk).sum(dim=1, keepdim=True)
        out.append(d2.amin(dim=1))
    return torch.cat(out).clamp_min(0)


def classwise_min_dist2(x, rows=2048):
    """min over all 65,536 grid points of ||x - g||^2, one (pattern, shift) class at a time.

    A class is {s (.) a + t/4 : s in {+-1}^8, #(s_i = -1) = sum(a) mod 2}. With
    y = x - t/4 the best s is sign(y), except that when its parity is wrong the
    coordinate with the smallest a_i |y_i| is flipped back, at cost 4 a_i |y_i|.
    Exact and independent of the fast quantizer's candidate reduction.
    """
    A = abs_patterns()
    A_norm2 = (A * A).sum(dim=1)
    A_parity = A.sum(dim=1).remainder(2)
    out = []
    for chunk in x.to(torch.float64).split(rows):
        best = torch.full((len(chunk),), float("inf"), dtype=torch.float64)
        for t in (1, -1):
            y = chunk - t / 4
            weighted = y.abs()[:, None, :] * A[None, :, :]
            wrong = ((y < 0).sum(dim=1, keepdim=True) + A_parity).remainder(2)
            d2 = ((y * y).sum(dim=1, keepdim=True) + A_norm2 - 2 * weighted.sum(dim=2)
                  + 4 * wrong * weighted.amin(dim=2))
            best = torch.minimum(best, d2.amin(dim=1))
        out.append(best)
    return torch.cat(out).clamp_min(0)


def decode_from_packed(codes):
    """Decode codes as a kernel would, from the packed base-point table."""
    words = packed_abs_table().to(torch.int64)[codes >> 8]
    bits = codes & 0xFF
    points = torch.zeros(len(codes), 8, dtype=torch.float64)
    odd = sum((bits >> j) & 1 for j in range(8)) % 2
    for j, coord in enumerate(COORD_OF_SIGN_BIT):
        value = (((words >> (4 * j)) & 0xF) - 8).to(torch.float64) / 2
        flip = (bits >> j) & 1
        if coord == 0:
            flip = flip ^ odd
        points[:, coord] = value * (1 - 2 * flip)
    return points + (0.25 - 0.5 * odd.to(torch.float64))[:, None]


# ---------------------------------------------------------------- registry

def test_registry_and_attributes(cb):
    assert "E8P12" in CODEBOOKS
    assert get_codebook("E8P12") is cb
    assert cb.name == "E8P12"
    assert cb.codesz == 8
    assert cb.bits == 2
    assert cb.opt_scale == 1.03
    assert cb.storage_dtype == torch.int16
    assert cb.num_codes == 65536


def test_unknown_codebook_lists_valid_names():
    with pytest.raises(UserInputError, match="nope") as err:
        get_codebook("nope")
    assert "E8P12" in str(err.value)


# ---------------------------------------------------------------- grid

def test_grid_shape_distinct_and_norm(grid):
    assert grid.shape == (65536, 8) and grid.dtype == torch.float32
    assert len(torch.unique(grid, dim=0)) == 65536
    assert (grid.to(torch.float64) ** 2).sum(dim=1).max().item() == 16.5


def test_unshifted_points_are_half_integer_points_of_e8(grid):
    p = unshifted(grid)
    twice = 2 * p
    assert torch.equal(twice, twice.round())
    assert (twice.remainder(2) == 1).all()
    assert (p.sum(dim=1).remainder(2) == 0).all()


def test_abs_patterns():
    A = abs_patterns()
    assert A.shape == (256, 8)
    expected_small = sorted(
        v for v in itertools.product((0.5, 1.5, 2.5, 3.5), repeat=8)
        if sum(c * c for c in v) <= 10)
    assert len(expected_small) == 227
    assert A[:227].tolist() == [list(v) for v in expected_small]
    expected_norm12 = [[int(d) / 2 for d in p] for p in NORM12_PATTERNS]
    assert len(expected_norm12) == 29
    assert A[227:].tolist() == expected_norm12
    assert ((A[227:] ** 2).sum(dim=1) == 12).all()


def test_codes_follow_pattern_and_sign_layout(grid):
    p = unshifted(grid)
    patterns = ALL_CODES >> 8
    assert torch.equal(p.abs(), abs_patterns()[patterns])
    negative_mask = ((p < 0).to(torch.int64) << torch.arange(8)).sum(dim=1)
    minus_shift = (shifts_of(ALL_CODES) < 0).to(torch.int64)
    group = 2 * patterns + minus_shift
    assert len(torch.unique(256 * group + negative_mask)) == 65536
    assert (torch.bincount(group, minlength=512) == 128).all()


def test_hand_decoded_codes(grid):
    assert grid[0x0000].tolist() == [0.75] * 8
    assert grid[0x0001].tolist() == [0.25] * 8
    assert grid[0x0002].tolist() == [-0.75, 0.25, -0.75, 0.25, 0.25, 0.25, 0.25, 0.25]
    assert grid[0x0003].tolist() == [-0.25, 0.75, -0.25, 0.75, 0.75, 0.75, 0.75, 0.75]
    assert grid[0x0100].tolist() == [0.75] * 7 + [-1.25]


def test_packed_abs_table_decodes_to_grid(grid):
    table = packed_abs_table()
    assert table.shape == (256,) and table.dtype == torch.int32
    assert torch.equal(decode_from_packed(ALL_CODES), grid.to(torch.float64))


def test_search_candidates():
    points, patterns = search_candidates()
    assert len(points) == 1366
    head = points[:, :7]
    assert ((head < 0).sum(dim=1) <= 1).all()
    assert ((head >= 0) | (head == -0.5)).all()
    assert torch.equal(points.abs(), abs_patterns()[patterns])


# ---------------------------------------------------------------- decode

def test_decode_lists_grid(cb, grid):
    flat = cb.decode(ALL_CODES)
    assert flat.shape == (65536 * 8,) and flat.dtype == torch.float32
    assert torch.equal(flat.view(-1, 8), grid)
    assert torch.equal(cb.decode(ALL_CODES.view(-1, 1)), grid)


def test_decode_int16_storage(cb):
    idx = torch.randint(0, 1 << 16, (3, 5, 4))
    stored = idx.to(torch.int16)
    assert (stored < 0).any()
    assert torch.equal(cb.decode(stored), cb.decode(idx))
    assert cb.decode(idx).shape == (3, 5, 32)


def test_decode_rejects_float_codes(cb):
    with pytest.raises(UserInputError):
        cb.decode(torch.zeros(4))


# ---------------------------------------------------------------- quantize

def test_quantize_grid_round_trip(cb, grid):
    X_hat, idx = cb.quantize(grid)
    assert torch.equal(idx, ALL_CODES.view(-1, 1))
    assert torch.equal(X_hat, grid)


@pytest.fixture(scope="module")
def hard_vectors(grid):
    """Gaussian vectors at several scales plus vectors at decision boundaries."""
    gen = torch.Generator().manual_seed(0)
    g = grid.to(torch.float64)

    def randn(n, scale=1.0):
        return scale * torch.randn(n, 8, generator=gen, dtype=torch.float64)

    def random_points(n):
        return g[torch.randint(0, 1 << 16, (n,), generator=gen)]

    near = random_points(1024)
    rank = torch.randint(1, 5, (1024,), generator=gen)
    neighbours = torch.cat([
        g[torch.cdist(chunk, g).topk(5, largest=False).indices[torch.arange(len(chunk)), r]]
        for chunk, r in zip(near.split(256), rank.split(256))])
    midpoints = (near + neighbours) / 2
    zeroed = randn(2048) * (torch.rand(2048, 8, generator=gen) > 0.4)
    quarter = torch.randint(-12, 13, (2048, 8), generator=gen).to(torch.float64) / 4
    return torch.cat([
        randn(4096, 0.5), randn(4096, 1.03), randn(4096, 2.0), randn(1024, 4.0),
        random_points(2048) + randn(2048, 1e-6),
        midpoints, midpoints + randn(1024, 1e-9),
        zeroed, quarter,
    ])


@pytest.fixture(scope="module")
def exact_dist2(hard_vectors):
    return classwise_min_dist2(hard_vectors)


def test_classwise_reference_matches_full_scan(hard_vectors, exact_dist2, grid):
    subset = torch.arange(0, len(hard_vectors), 10)
    full_scan = brute_force_min_dist2(hard_vectors[subset], grid)
    assert (full_scan - exact_dist2[subset]).abs().max().item() <= 1e-9


def test_quantizer_is_exact_float64(cb, hard_vectors, exact_dist2):
    assert len(hard_vectors) >= 20000
    X_hat, idx = cb.quantize(hard_vectors)
    dist2 = ((hard_vectors - X_hat) ** 2).sum(dim=1)
    assert (dist2 - exact_dist2).abs().max().item() <= 1e-9
    assert torch.equal(cb.decode(idx).to(torch.float64), X_hat)


def test_quantizer_is_exact_float32(cb, hard_vectors):
    x = hard_vectors.to(torch.float32)
    exact = x.to(torch.float64)
    X_hat, idx = cb.quantize(x)
    assert X_hat.dtype == torch.float32
    dist2 = ((exact - X_hat.to(torch.float64)) ** 2).sum(dim=1)
    reference = classwise_min_dist2(exact)
    assert ((dist2 - reference).abs() <= 1e-5 * (1 + reference)).all()
    assert torch.equal(cb.decode(idx), X_hat)


@pytest.mark.parametrize("scale, low, high", [(1.03, 0.088, 0.095), (0.9, 0.096, 0.102)])
def test_gaussian_mse(cb, scale, low, high):
    x = torch.randn(1 << 15, 8, generator=torch.Generator().manual_seed(1))
    X_hat, _ = cb.quantize(x * scale)
    mse = ((X_hat / scale - x) ** 2).mean().item()
    assert low <= mse <= high


@pytest.mark.parametrize("shape", [(16,), (3, 8), (2, 3, 24), (2, 1, 4, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_quantize_shapes_and_dtypes(cb, shape, dtype):
    X = torch.randn(shape).to(dtype)
    X_hat, idx = cb.quantize(X)
    assert X_hat.shape == X.shape and X_hat.dtype == dtype
    assert idx.shape == (*shape[:-1], shape[-1] // 8) and idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < 65536)).all()
    assert torch.equal(cb.decode(idx).to(dtype), X_hat)


def test_quantize_takes_no_gradient(cb):
    X = torch.randn(4, 16, requires_grad=True)
    X_hat, _ = cb.quantize(X)
    assert not X_hat.requires_grad


def test_quantize_empty(cb):
    X_hat, idx = cb.quantize(torch.zeros(0, 16))
    assert X_hat.shape == (0, 16) and idx.shape == (0, 2)


@pytest.mark.parametrize("bad", [torch.zeros(4, 12), torch.zeros(7), torch.tensor(1.0)])
def test_quantize_rejects_bad_last_dim(cb, bad):
    with pytest.raises(UserInputError, match="shape"):
        cb.quantize(bad)


def test_quantize_rejects_integer_input(cb):
    with pytest.raises(UserInputError):
        cb.quantize(torch.zeros(2, 8, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("name", CODEBOOKS)
def test_quantize_cuda_matches_cpu(name):
    """Every codebook: same distances on CUDA as on CPU, decode reproduces quantize on
    both devices (the residual codebooks' tables are bit-identical across devices)."""
    cb = get_codebook(name)
    X = torch.randn(1 << 16, 8, generator=torch.Generator().manual_seed(2))
    X_hat_cpu, idx_cpu = cb.quantize(X)
    X_hat, idx = cb.quantize(X.cuda())
    assert idx.device.type == "cuda"
    d_cpu = ((X - X_hat_cpu) ** 2).sum(dim=1)
    d_gpu = ((X - X_hat.cpu()) ** 2).sum(dim=1)
    assert torch.allclose(d_cpu, d_gpu, atol=1e-5)
    assert torch.equal(cb.decode(idx).cpu(), X_hat.cpu())
    assert torch.equal(cb.decode(idx_cpu.cuda()).cpu(), X_hat_cpu)


@pytest.mark.gpu
def test_triton_search_matches_the_addmm_argmax():
    """The fused Triton search picks a candidate with the same score as torch's
    addmm + argmax (indices may differ only on exact or last-ulp ties)."""
    from lib.codebook import triton_search
    from lib.codebook.e8p12 import search_candidates
    points, _ = search_candidates()
    ut = (2 * points).T.contiguous().float().cuda()
    bias = -(points * points).sum(dim=1).float().cuda()
    z = (torch.randn(200_000, 8, generator=torch.Generator().manual_seed(5)) * 1.5).abs().cuda()
    assert triton_search.available(z)
    ours = triton_search.argmax_scores(z, ut, bias)
    scores = torch.addmm(bias, z, ut)
    ref = scores.argmax(dim=1)
    torch.testing.assert_close(scores.gather(1, ours[:, None]), scores.gather(1, ref[:, None]),
                               atol=1e-4, rtol=0)
    assert (ours == ref).float().mean() > 0.999
