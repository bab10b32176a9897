"""Tests for the residual codebooks E8P12RVQ3B and E8P12RVQ4B (lib.codebook.e8p12_rvq)."""
import json

import pytest
import torch

from lib.codebook import CODEBOOKS, get_codebook
from lib.codebook.e8p12_rvq import residual_points
from lib.utils.errors import UserInputError

RVQ = ("E8P12RVQ3B", "E8P12RVQ4B")
STAGE2_BITS = {"E8P12RVQ3B": 8, "E8P12RVQ4B": 16}
GAUSSIAN_VECTORS = 1 << 17


@pytest.fixture(scope="module")
def e8p():
    return get_codebook("E8P12")


@pytest.fixture(scope="module")
def gaussian():
    return torch.randn(GAUSSIAN_VECTORS, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def quantized(gaussian):
    """name -> (X_hat, idx) of the Gaussian vectors at the codebook's opt_scale."""
    return {name: get_codebook(name).quantize(gaussian * get_codebook(name).opt_scale)
            for name in ("E8P12",) + RVQ}


@pytest.fixture(scope="module")
def mse(gaussian, quantized):
    """name -> E (x - Q(s x)/s)^2 per element at s = opt_scale."""
    return {name: ((X_hat / get_codebook(name).opt_scale - gaussian) ** 2).mean().item()
            for name, (X_hat, _) in quantized.items()}


def e8_points_in_ball(max_norm2):
    """All points of E8 with squared norm <= max_norm2 (<= 2), as a set of tuples.

    Scans {-1, -1/2, 0, 1/2, 1}^8 (every coordinate of such a point lies there)
    keeping v with 2v all even or all odd and sum(v) even.
    """
    values = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    v = torch.cartesian_prod(*[values] * 8)
    twice = (2 * v).to(torch.int64)
    same_coset = ((twice % 2 == 0).all(dim=1)) | ((twice % 2 == 1).all(dim=1))
    even_sum = v.sum(dim=1).remainder(2) == 0
    small = (v * v).sum(dim=1) <= max_norm2
    return {tuple(p) for p in v[same_coset & even_sum & small].tolist()}


# ---------------------------------------------------------------- registry

@pytest.mark.parametrize("name, bits, opt_scale, resid, num_codes", [
    ("E8P12RVQ3B", 3, 0.98, 2.04, 1 << 24), ("E8P12RVQ4B", 4, 1.03, 3.45, 1 << 32)])
def test_attributes_and_shared_instance(name, bits, opt_scale, resid, num_codes):
    cb = get_codebook(name)
    assert name in CODEBOOKS
    assert cb is get_codebook(name) is get_codebook(name, resid) is get_codebook(name, 0.0)
    assert (cb.name, cb.codesz, cb.bits, cb.opt_scale) == (name, 8, bits, opt_scale)
    assert cb.storage_dtype == torch.int32 and cb.num_codes == num_codes
    assert cb.resid_scale == resid
    assert cb.stage1 is get_codebook("E8P12")
    assert cb.config() == {"name": name, "resid_scale_override": resid}


def test_e8p12_config_ignores_resid_scale(e8p):
    assert e8p.config() == {"name": "E8P12"}
    assert get_codebook("E8P12", 2.5) is e8p
    assert get_codebook("E8P12", float("nan")) is e8p
    assert get_codebook(**e8p.config()) is e8p


def test_unknown_name_lists_all_codebooks():
    with pytest.raises(UserInputError, match="nope") as err:
        get_codebook("nope")
    for name in ("E8P12",) + RVQ:
        assert name in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_resid_scale_is_rejected(bad):
    with pytest.raises(UserInputError, match="resid_scale_override"):
        get_codebook("E8P12RVQ3B", bad)


# ---------------------------------------------------------------- residual ball

def test_residual_points_are_the_e8_ball_plus_15_axis_points():
    P = residual_points()
    assert P.shape == (256, 8) and P.dtype == torch.float64
    assert len(torch.unique(P, dim=0)) == 256
    ball = e8_points_in_ball(2)
    assert len(ball) == 241
    assert P[:241].tolist() == [list(p) for p in sorted(ball)]
    norm2 = (P * P).sum(dim=1)
    assert (norm2[:241] <= 2).all() and (norm2[241:] == 4).all()
    axis = [[2.0 * (j == i) for j in range(8)] for i in range(8)]
    axis += [[-2.0 * (j == i) for j in range(8)] for i in range(7)]
    assert P[241:].tolist() == axis
    assert not (P.signbit() & (P == 0)).any()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_stage2_of_rvq3b_is_the_exact_nearest_ball_point(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    r = torch.cat([torch.randn(8192, 8, generator=gen, dtype=torch.float64) * s
                   for s in (0.3, 0.6, 1.2, 3.0)])
    r = torch.cat([r, torch.randint(-4, 5, (4000, 8), generator=gen).to(torch.float64) / 4])
    codes = get_codebook("E8P12RVQ3B").stage2_codes(r.to(dtype))
    P = residual_points()
    brute = torch.cdist(r, P).square().amin(dim=1)
    chosen = (r - P[codes]).square().sum(dim=1)
    assert ((chosen - brute).abs() <= tol * (1 + brute)).all()


def test_rvq3b_quantize_rounds_the_scaled_residual_exactly(e8p):
    cb = get_codebook("E8P12RVQ3B")
    x = torch.randn(8192, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    X_hat, idx = cb.quantize(x)
    q1, codes1 = e8p.quantize(x)
    assert torch.equal(idx >> 8, codes1)
    r = (x - q1) * 2.04
    P = residual_points()
    chosen = (r - P[(idx & 0xFF).view(-1)]).square().sum(dim=1)
    assert (chosen - torch.cdist(r, P).square().amin(dim=1)).abs().max().item() <= 1e-12
    expected = q1 + P[(idx & 0xFF).view(-1)] / 2.04
    torch.testing.assert_close(X_hat, expected, atol=1e-6, rtol=0)


def test_rvq4b_quantize_is_e8p12_on_the_scaled_residual(e8p):
    cb = get_codebook("E8P12RVQ4B")
    x = torch.randn(8192, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    X_hat, idx = cb.quantize(x)
    q1, codes1 = e8p.quantize(x)
    q2, codes2 = e8p.quantize((x - q1) * 3.45)
    assert torch.equal(idx >> 16, codes1)
    assert torch.equal(idx & 0xFFFF, codes2)
    torch.testing.assert_close(X_hat, q1 + q2 / 3.45, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- MSE

def test_gaussian_mse(mse):
    assert 0.088 <= mse["E8P12"] <= 0.095, mse
    assert 0.027 <= mse["E8P12RVQ3B"] <= 0.032, mse
    assert 0.0088 <= mse["E8P12RVQ4B"] <= 0.0106, mse
    assert mse["E8P12RVQ3B"] < 0.4 * mse["E8P12"], mse
    assert mse["E8P12RVQ4B"] < 0.12 * mse["E8P12"], mse


# ---------------------------------------------------------------- codes and decode

@pytest.mark.parametrize("name", RVQ)
def test_decode_reproduces_quantize_and_code_layout(name, e8p, gaussian, quantized):
    cb = get_codebook(name)
    X_hat, idx = quantized[name]
    assert idx.shape == (GAUSSIAN_VECTORS, 1) and idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < cb.num_codes)).all()
    assert torch.equal(cb.decode(idx), X_hat)
    head = slice(0, 8192)
    _, codes1 = e8p.quantize(gaussian[head] * cb.opt_scale)
    assert torch.equal(idx[head] >> STAGE2_BITS[name], codes1)


@pytest.mark.parametrize("name", RVQ)
def test_int32_storage_round_trip(name, quantized):
    cb = get_codebook(name)
    gen = torch.Generator().manual_seed(4)
    idx = torch.cat([quantized[name][1].view(-1),
                     torch.randint(0, cb.num_codes, (50000,), generator=gen)]).view(-1, 8)
    stored = idx.to(cb.storage_dtype)
    if cb.num_codes > 1 << 31:
        assert (idx >= 1 << 31).any() and (stored < 0).any()
    assert torch.equal(cb.decode(stored), cb.decode(idx))
    assert cb.decode(idx).shape == (idx.shape[0], 64)
    assert cb.decode(idx).dtype == torch.float32


def test_rvq4b_top_codes_decode_from_both_stages(e8p):
    cb = get_codebook("E8P12RVQ4B")
    idx = torch.tensor([(0xFFFF << 16) | 0x0001, (0x8000 << 16) | 0xFFFF])
    grid = e8p.grid.to(torch.float64)
    expected = torch.stack([grid[0xFFFF] + grid[0x0001] / 3.45, grid[0x8000] + grid[0xFFFF] / 3.45])
    points = cb.decode(idx.to(torch.int32).view(-1, 1))
    torch.testing.assert_close(points.to(torch.float64), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- resid scale override

def test_resid_scale_override(gaussian):
    default = get_codebook("E8P12RVQ3B")
    cb = get_codebook("E8P12RVQ3B", 2.5)
    assert cb is not default and cb is get_codebook("E8P12RVQ3B", 2.5)
    assert cb.resid_scale == 2.5
    config = cb.config()
    assert config == {"name": "E8P12RVQ3B", "resid_scale_override": 2.5}
    assert get_codebook(**json.loads(json.dumps(config))) is cb
    assert get_codebook(**default.config()) is default
    x = gaussian[:4096].to(torch.float64)
    X_hat, idx = cb.quantize(x)
    X_default, idx_default = default.quantize(x)
    assert not torch.equal(X_hat, X_default)
    assert torch.equal(idx >> 8, idx_default >> 8)
    q1 = get_codebook("E8P12").decode(idx >> 8).view(-1, 8).to(torch.float64)
    expected = q1 + residual_points()[(idx & 0xFF).view(-1)] / 2.5
    torch.testing.assert_close(X_hat, expected, atol=1e-6, rtol=0)
    assert torch.equal(cb.decode(idx), X_hat.to(torch.float32))


def test_rvq4b_resid_scale_override(e8p):
    cb = get_codebook("E8P12RVQ4B", 4.0)
    assert cb is not get_codebook("E8P12RVQ4B")
    assert cb.config() == {"name": "E8P12RVQ4B", "resid_scale_override": 4.0}
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    X_hat, idx = cb.quantize(x)
    q1, _ = e8p.quantize(x)
    _, codes2 = e8p.quantize((x - q1) * 4.0)
    assert torch.equal(idx & 0xFFFF, codes2)


# ---------------------------------------------------------------- shapes, dtypes, errors

@pytest.mark.parametrize("name", RVQ)
@pytest.mark.parametrize("shape", [(16,), (2, 3, 24), (2, 1, 4, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantize_shapes_and_dtypes(name, shape, dtype):
    cb = get_codebook(name)
    X = torch.randn(shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    X_hat, idx = cb.quantize(X)
    assert X_hat.shape == X.shape and X_hat.dtype == dtype
    assert idx.shape == (*shape[:-1], shape[-1] // 8) and idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < cb.num_codes)).all()
    assert torch.equal(cb.decode(idx).to(dtype), X_hat)
    flat_hat, flat_idx = cb.quantize(X.reshape(-1, 8), chunk_rows=3)
    assert torch.equal(flat_idx.view(-1), idx.reshape(-1))
    assert torch.equal(flat_hat.reshape(X.shape), X_hat)


@pytest.mark.parametrize("name", RVQ)
@pytest.mark.parametrize("bad", [torch.zeros(4, 12), torch.zeros(2, 3, 7), torch.tensor(1.0)])
def test_quantize_rejects_bad_last_dim(name, bad):
    with pytest.raises(UserInputError, match="shape"):
        get_codebook(name).quantize(bad)


@pytest.mark.parametrize("name", RVQ)
def test_quantize_empty_and_no_gradient(name):
    cb = get_codebook(name)
    X_hat, idx = cb.quantize(torch.zeros(0, 16))
    assert X_hat.shape == (0, 16) and idx.shape == (0, 2)
    X = torch.randn(4, 16, requires_grad=True)
    assert not cb.quantize(X)[0].requires_grad


@pytest.mark.parametrize("name", RVQ)
def test_decode_rejects_float_codes(name):
    with pytest.raises(UserInputError):
        get_codebook(name).decode(torch.zeros(4))
