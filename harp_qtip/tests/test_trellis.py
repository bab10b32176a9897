"""Tests for lib.codebook.trellis and BitshiftTrellis: transitions, the bitstream and
its int16 packing against the fact sheet's description, Viterbi against brute force
over all valid paths, tail-biting, and quantization MSE on Gaussian data."""
import pytest
import torch

from lib.codebook import BitshiftTrellis, TrellisSpec, build_hyb_tlut, get_code
from lib.codebook.trellis import (
    chunks_of, is_tailbiting, pack, predecessors, states_of, successors, unpack, viterbi,
    viterbi_tailbiting)
from lib.utils.errors import UserInputError

# (L, K, V, T) small enough to enumerate every path
SMALL_SPECS = [(6, 1, 1, 10), (8, 2, 1, 6), (6, 1, 2, 12), (7, 2, 2, 8), (8, 1, 1, 10)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_tailbiting(spec, n, seed=0):
    chunks = torch.randint(0, 1 << spec.KV, (n, spec.steps), generator=gen(seed))
    return states_of(chunks, spec)


def stream_bits(states, spec):
    """The sheet's bitstream as a '0'/'1' string: L bits of the first state, then the KV
    new bits of every later step, without the wrapped last L - KV bits."""
    s = states.tolist()
    bits = format(s[0], f"0{spec.L}b") + "".join(
        format(v & ((1 << spec.KV) - 1), f"0{spec.KV}b") for v in s[1:])
    return bits[:len(bits) - spec.overlap_bits]


def test_spec_validation():
    spec = TrellisSpec(16, 2, 2, 256)
    assert (spec.KV, spec.steps, spec.overlap_bits, spec.words) == (4, 128, 12, 32)
    assert [TrellisSpec(16, k, 1, 256).words for k in (2, 3, 4)] == [32, 48, 64]
    with pytest.raises(UserInputError, match="smaller than L"):
        TrellisSpec(8, 4, 2, 256)
    with pytest.raises(UserInputError, match="multiple of V"):
        TrellisSpec(16, 2, 2, 255)
    with pytest.raises(UserInputError, match="cannot hold"):
        TrellisSpec(16, 2, 1, 6)


@pytest.mark.parametrize("L,K,V", [(8, 2, 1), (6, 1, 2), (9, 4, 2)])
def test_transitions(L, K, V):
    spec = TrellisSpec(L, K, V, 16)
    states = torch.arange(1 << L)
    low = (1 << spec.overlap_bits) - 1
    succ, pred = successors(states, spec), predecessors(states, spec)
    assert succ.shape == pred.shape == (1 << L, 1 << spec.KV)
    assert ((succ >> spec.KV) == (states & low)[:, None]).all()     # share L - KV bits
    assert ((pred & low) == (states >> spec.KV)[:, None]).all()
    for s in range(0, 1 << L, 7):                                     # pred is the inverse of succ
        assert sorted(pred[s].tolist()) == sorted(p for p in range(1 << L) if s in succ[p].tolist())
    counts = torch.bincount(succ.flatten(), minlength=1 << L)
    assert (counts == 1 << spec.KV).all()


@pytest.mark.parametrize("L,K,V,T", [(16, 2, 2, 256), (16, 3, 1, 256), (16, 4, 2, 256), (6, 1, 1, 12)])
def test_bitstream_and_packing_match_sheet(L, K, V, T):
    spec = TrellisSpec(L, K, V, T)
    states = random_tailbiting(spec, 5, seed=L + K)
    assert is_tailbiting(states, spec).all()
    words = pack(states, spec)
    assert words.shape == (5, spec.words) and words.dtype == torch.int16
    for row, w in zip(states, words):
        bits = stream_bits(row, spec)
        assert len(bits) == T * K
        bits += "0" * (16 * spec.words - len(bits))
        expected = [int(bits[i:i + 16], 2) for i in range(0, len(bits), 16)]
        assert [v & 0xFFFF for v in w.tolist()] == expected
    assert torch.equal(unpack(words, spec), states)


def test_unpack_follows_sheet_and_is_bijective():
    """Unpack = append the first L - KV bits, read L-bit windows at offsets KV * i."""
    spec = TrellisSpec(12, 2, 2, 64)
    words = torch.randint(-(1 << 15), 1 << 15, (4, spec.words), dtype=torch.int16, generator=gen(1))
    states = unpack(words, spec)
    assert is_tailbiting(states, spec).all()
    for row, w in zip(states, words):
        bits = "".join(format(v & 0xFFFF, "016b") for v in w.tolist())
        bits += bits[:spec.overlap_bits]
        assert row.tolist() == [int(bits[spec.KV * i:spec.KV * i + spec.L], 2) for i in range(spec.steps)]
    assert torch.equal(pack(states, spec), words)
    assert torch.equal(chunks_of(states, spec), states >> spec.overlap_bits)
    with pytest.raises(UserInputError, match="words"):
        unpack(words[:, 1:], spec)


def test_is_tailbiting_detects_breaks():
    spec = TrellisSpec(8, 2, 1, 16)
    states = random_tailbiting(spec, 3)
    broken = states.clone()
    broken[0, 5] ^= 1            # low bit of step 5: breaks 5 -> 6
    broken[1, 0] ^= 1 << 7       # high bit of step 0: breaks the wrap 15 -> 0
    assert is_tailbiting(broken, spec).tolist() == [False, False, True]


def path_costs(x, lut, states):
    """(B, P) costs of P candidate paths (P, S) for each of the B sequences x (B, S, V)."""
    return ((x[:, None] - lut[states][None]) ** 2).sum(dim=(-1, -2))


def all_free_paths(spec):
    """Every valid path: a first state and S - 1 shifted-in chunks."""
    n_bits = spec.L + (spec.steps - 1) * spec.KV
    codes = torch.arange(1 << n_bits)
    paths = [codes >> ((spec.steps - 1) * spec.KV)]
    for t in range(1, spec.steps):
        new = (codes >> ((spec.steps - 1 - t) * spec.KV)) & ((1 << spec.KV) - 1)
        paths.append(((paths[-1] << spec.KV) & ((1 << spec.L) - 1)) | new)
    return torch.stack(paths, dim=1)


def all_tailbiting_paths(spec):
    """Every tail-biting path: the cyclic L-bit windows of every T*K-bit stream."""
    n = spec.steps * spec.KV
    codes = torch.arange(1 << n)
    doubled = (codes << n) | codes
    shifts = torch.tensor([2 * n - spec.KV * t - spec.L for t in range(spec.steps)])
    return (doubled[:, None] >> shifts) & ((1 << spec.L) - 1)


def small_problem(L, K, V, T, seed):
    spec = TrellisSpec(L, K, V, T)
    g = gen(seed)
    lut = get_code("1mad").table(L) if V == 1 else torch.randn(1 << L, V, generator=g)
    x = torch.randn(6, spec.steps, V, generator=g)
    return spec, lut, x


@pytest.mark.parametrize("L,K,V,T", SMALL_SPECS)
def test_viterbi_free_is_optimal(L, K, V, T):
    spec, lut, x = small_problem(L, K, V, T, seed=L * 100 + T)
    states = viterbi(x, lut, spec)
    assert ((states[:, :-1] & ((1 << spec.overlap_bits) - 1)) == states[:, 1:] >> spec.KV).all()
    best = path_costs(x, lut, all_free_paths(spec)).min(dim=1).values
    torch.testing.assert_close(path_costs(x, lut, states).diagonal(), best, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("L,K,V,T", SMALL_SPECS)
def test_viterbi_with_overlap_is_optimal(L, K, V, T):
    spec, lut, x = small_problem(L, K, V, T, seed=L * 100 + T + 1)
    paths = all_tailbiting_paths(spec)
    costs = path_costs(x, lut, paths)
    exact = torch.full((x.shape[0],), float("inf"))
    for o in range(1 << spec.overlap_bits):
        overlap = torch.full((x.shape[0],), o)
        states = viterbi(x, lut, spec, overlap=overlap)
        assert is_tailbiting(states, spec).all()
        assert ((states[:, 0] >> spec.KV) == o).all()
        best = costs[:, (paths[:, 0] >> spec.KV) == o].min(dim=1).values
        got = path_costs(x, lut, states).diagonal()
        torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-6)
        exact = torch.minimum(exact, got)
    # minimising over every overlap gives the exact tail-biting optimum
    torch.testing.assert_close(exact, costs.min(dim=1).values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("L,K,V,T", SMALL_SPECS)
def test_two_pass_tailbiting(L, K, V, T):
    """Two-pass result: a valid tail-biting path whose cost lies between the exact
    tail-biting optimum and the optimum of its own overlap (pass b)."""
    spec, lut, x = small_problem(L, K, V, T, seed=L * 100 + T + 2)
    states = viterbi_tailbiting(x, lut, spec)
    assert is_tailbiting(states, spec).all()
    paths = all_tailbiting_paths(spec)
    costs = path_costs(x, lut, paths)
    got = path_costs(x, lut, states).diagonal()
    assert (got >= costs.min(dim=1).values - 1e-5).all()
    own = (paths[None, :, 0] >> spec.KV) == (states[:, :1] >> spec.KV)
    torch.testing.assert_close(got, costs.masked_fill(~own, float("inf")).min(dim=1).values,
                               rtol=1e-5, atol=1e-6)


def test_two_pass_uses_overlap_of_rotated_pass():
    spec, lut, x = small_problem(8, 1, 1, 12, seed=5)
    shift = spec.steps // 2
    overlap = viterbi(torch.roll(x, shift, dims=1), lut, spec)[:, shift] >> spec.KV
    assert torch.equal(viterbi_tailbiting(x, lut, spec)[:, 0] >> spec.KV, overlap)


def test_quantize_decode_round_trip():
    code = get_code("1mad")
    q = BitshiftTrellis(10, 2, 1, code, T=64)
    X = torch.randn(2, 3, 64, dtype=torch.float64, generator=gen(0))
    X_hat, packed = q.quantize(X)
    assert X_hat.shape == X.shape and X_hat.dtype == torch.float64
    assert packed.shape == (2, 3, 8) and packed.dtype == torch.int16
    decoded = q.decode(packed)
    assert decoded.dtype == torch.float32 and torch.equal(decoded.double(), X_hat)
    states = unpack(packed.reshape(6, -1), q.spec)
    assert is_tailbiting(states, q.spec).all()
    assert torch.equal(code(states).reshape(X.shape).double(), X_hat)
    assert torch.equal(BitshiftTrellis(10, 2, 1, code, T=64, chunk_rows=4).quantize(X)[1], packed)
    with pytest.raises(UserInputError, match="T=64"):
        q.quantize(torch.randn(3, 32))
    with pytest.raises(UserInputError, match="not V=2"):
        BitshiftTrellis(10, 2, 2, code, T=64)


# Lloyd-Max scalar quantizer MSE of N(0, 1) at K = 1, 2, 3 bits
LLOYD_MAX = {1: 0.3634, 2: 0.1175, 3: 0.03454}
E8P12_MSE = 0.0914  # 2 bit, design/quip_sharp.md


@pytest.fixture(scope="module")
def gaussian_rows():
    return torch.randn(24, 256, generator=gen(7))


def normalized_mse(q, X):
    rms = q.code.rms(q.spec.L)
    X_hat, _ = q.quantize(X * rms)
    return ((X * rms - X_hat) ** 2).mean().item() / rms**2


def test_mse_on_gaussian_1mad(gaussian_rows):
    """Between the rate-distortion bound 2^(-2K) and the Lloyd-Max scalar quantizer,
    decreasing in K; at 2 bits also below E8P12 (L = 12, T = 256)."""
    mses = [normalized_mse(BitshiftTrellis(12, K, 1, get_code("1mad")), gaussian_rows)
            for K in (1, 2, 3)]
    for K, mse in zip((1, 2, 3), mses):
        assert 2.0 ** (-2 * K) * 0.97 < mse < LLOYD_MAX[K]
    assert mses[0] > mses[1] > mses[2]
    assert mses[1] < E8P12_MSE


def test_mse_on_gaussian_hyb(gaussian_rows):
    tlut = build_hyb_tlut(tlut_bits=8, seed=0, n_samples=1 << 14)
    mses = [normalized_mse(BitshiftTrellis(12, K, 2, get_code("quantlut_sym", tlut)), gaussian_rows)
            for K in (2, 3)]
    assert 2.0**-4 * 0.97 < mses[0] < E8P12_MSE
    assert 2.0**-6 * 0.97 < mses[1] < LLOYD_MAX[3]


@pytest.mark.gpu
def test_gpu_matches_cpu():
    code = get_code("3inst")
    q = BitshiftTrellis(14, 2, 1, code)
    X = torch.randn(40, 256, generator=gen(3)) * code.rms(14)
    X_hat_cpu, _ = q.quantize(X)
    X_hat_gpu, packed = q.quantize(X.cuda())
    assert torch.equal(q.decode(packed), X_hat_gpu)
    err_cpu = ((X - X_hat_cpu) ** 2).sum(dim=1)
    err_gpu = ((X.cuda() - X_hat_gpu) ** 2).sum(dim=1).cpu()
    torch.testing.assert_close(err_gpu, err_cpu, rtol=1e-4, atol=1e-5)
