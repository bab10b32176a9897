"""HARP rotation and processor: structure, exactness, fitting (spec section 6)."""
import math
from types import SimpleNamespace

import pytest
import torch

from fixtures_real_model import smollm2  # noqa: F401
from lib.algo.quip import QuantizeOptions, quantize_linear
from lib.codebook import get_codebook
from lib.incoherence import empty_processor, make_processor
from lib.incoherence.harp import (FitOptions, HARPProcessor, RotationOptions, StructuredRotation,
                                  VectorCodebookTarget, early_stop, make_mixer, radix_schedule)
from lib.incoherence.rht import HadamardRotation
from lib.utils.errors import UserInputError
from lib.utils.hadamard import hadamard_matrix
from lib.utils.hessian import regularize_hessian
from model.decoder import site_weights


def random_rotation(n, seed=0, **kwargs):
    return StructuredRotation(n, theta_init_scale=0.5, generator=torch.Generator().manual_seed(seed),
                              **kwargs)


@pytest.mark.parametrize("n,expected", [
    (4096, [8, 8, 8, 8]), (576, [8, 8, 3, 3]), (960, [8, 8, 5, 3]), (1536, [8, 8, 8, 3]),
    (3072, [8, 8, 8, 6]), (11008, [8, 8, 4, 43]), (22016, [8, 8, 8, 43]),
    (13824, [8, 8, 8, 3, 3, 3]), (28672, [8, 8, 8, 8, 7]), (1, [1]), (43, [43])])
def test_radix_schedule_matches_the_reference_rule(n, expected):
    assert radix_schedule(n) == expected


@pytest.mark.parametrize("n", [2, 3, 7, 8, 43, 64, 192, 576, 960])
def test_random_theta_rotation_is_orthogonal_dense(n):
    R = random_rotation(n)
    with torch.no_grad():
        M = R.transform(torch.eye(n, dtype=torch.float64))
        Mt = R.inverse_transform(torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(M.T @ M, torch.eye(n, dtype=torch.float64), atol=2e-6, rtol=0)
    torch.testing.assert_close(Mt, M.T, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [1536, 3072, 4096, 11008])
def test_random_theta_rotation_is_orthogonal_on_vectors(n):
    R = random_rotation(n, passes=2)
    x = torch.randn(4, n, dtype=torch.float64)
    with torch.no_grad():
        y = R.transform(x)
        torch.testing.assert_close(y @ y.T, x @ x.T, rtol=1e-5, atol=1e-5 * n)
        torch.testing.assert_close(R.inverse_transform(y), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [dict(use_givens_b2=True, b=2, max_b=2), dict(theta_clip=0.5),
                                     dict(fixed_mixer="identity"), dict(fixed_mixer="had_or_ident")])
def test_variants_stay_orthogonal(options):
    R = random_rotation(96, **options)
    with torch.no_grad():
        M = R.transform(torch.eye(96, dtype=torch.float64))
    torch.testing.assert_close(M.T @ M, torch.eye(96, dtype=torch.float64), atol=2e-6, rtol=0)


def test_theta_zero_power_of_two_is_the_normalized_sylvester_hadamard():
    for n in (8, 64, 512, 2048):
        with torch.no_grad():
            M = StructuredRotation(n).transform(torch.eye(n, dtype=torch.float64))
        torch.testing.assert_close(M, hadamard_matrix(n, torch.float64) / math.sqrt(n), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [576, 960, 1536, 3072])
def test_kron_fallback_starts_exactly_at_the_rht(n):
    harp, rht = StructuredRotation(n, kron_fallback=True), HadamardRotation(n)
    x = torch.randn(3, n)
    with torch.no_grad():
        torch.testing.assert_close(harp.transform(x), rht.transform(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(harp.inverse_transform(x), rht.inverse_transform(x), atol=1e-5, rtol=0)
    inner = n // harp.kron_k
    assert harp.num_skew_values() == sum(inner * (b - 1) // 2 for b in harp.schedule)


def test_same_signs_and_same_start_as_rht():
    """At theta = 0 (power-of-two sizes or the Kronecker fallback) the HARP processor
    draws the RHT's signs and gives the same processed W and H."""
    for kron in (False, True):
        m, n = (256, 128) if not kron else (960, 576)
        had = make_processor("had", m, n, torch.Generator().manual_seed(7))
        harp = make_processor("harp", m, n, torch.Generator().manual_seed(7),
                              RotationOptions(kron_fallback=kron))
        assert torch.equal(had.SU, harp.SU) and torch.equal(had.SV, harp.SV)
        W, H = torch.randn(m, n), torch.randn(n, n)
        with torch.no_grad():
            torch.testing.assert_close(harp.process_weight(W), had.process_weight(W), atol=1e-4, rtol=0)
            torch.testing.assert_close(harp.process_hessian(H), had.process_hessian(H), atol=1e-4, rtol=0)


def test_processor_inverse_and_inference_with_random_theta():
    m, n = 960, 576
    g = torch.Generator().manual_seed(1)
    proc = make_processor("harp", m, n, g, RotationOptions(theta_init_scale=0.3)).double()
    W = torch.randn(m, n, dtype=torch.float64)
    x = torch.randn(5, n, dtype=torch.float64)
    with torch.no_grad():
        Wp = proc.process_weight(W)
        torch.testing.assert_close(proc.restore_weight(Wp), W, atol=1e-5, rtol=0)
        y = proc.output_transform(proc.input_transform(x) @ Wp.T)
    torch.testing.assert_close(y, x @ W.T, atol=1e-4, rtol=0)


def test_gradient_reaches_every_theta():
    proc = make_processor("harp", 192, 96, torch.Generator().manual_seed(0),
                          RotationOptions(passes=2, theta_init_scale=0.1))
    W, X = torch.randn(192, 96), torch.randn(200, 96)
    loss = proc.process_weight(W).pow(4).sum() + proc.process_hessian(X.T @ X).pow(4).sum()
    loss.backward()
    thetas = list(proc.parameters())
    assert len(thetas) == 2 * 2 * 3
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in thetas)


def test_cached_blocks_match_and_config_round_trip():
    proc = make_processor("harp", 192, 96, torch.Generator().manual_seed(0),
                          RotationOptions(theta_init_scale=0.2))
    x = torch.randn(3, 96)
    with torch.no_grad():
        before = proc.input_transform(x)
        proc.freeze()
        torch.testing.assert_close(proc.input_transform(x), before)
        other = empty_processor(proc.config(), 192, 96)
        other.load_state_dict(proc.state_dict())
        torch.testing.assert_close(other.input_transform(x), before)


def test_int8_theta_stays_orthogonal_and_close():
    R = random_rotation(576, theta_clip=1.0)
    x = torch.randn(4, 576, dtype=torch.float64)
    with torch.no_grad():
        y_float = R.transform(x)
        float_bits = R.storage_bits()
        R.quantize_theta_()
        M = R.transform(torch.eye(576, dtype=torch.float64))
        torch.testing.assert_close(M.T @ M, torch.eye(576, dtype=torch.float64), atol=2e-6, rtol=0)
        assert ((R.transform(x) - y_float).norm() / y_float.norm()) < 0.05
    assert len(list(R.parameters())) == 0
    assert R.storage_bits() == 8 * R.num_skew_values() + 16 * R.num_blocks() < float_bits
    clone = StructuredRotation(576, **{**R.config()})
    clone.load_state_dict(R.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(clone.transform(x), R.transform(x))


def test_storage_count_matches_the_formula():
    assert StructuredRotation(4096).num_skew_values() == 4 * 4096 * 7 // 2
    assert StructuredRotation(4096).storage_bits() == 16 * 57344
    R = StructuredRotation(64, b=2, max_b=2, use_givens_b2=True)
    assert R.num_skew_values() == 6 * 32


def test_qr_mixer_is_deterministic_orthogonal_with_positive_r_diagonal():
    M = make_mixer(3, "had_or_qr")
    torch.testing.assert_close(M, make_mixer(3, "had_or_qr"))
    torch.testing.assert_close(M.T @ M, torch.eye(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(make_mixer(4, "had_or_qr"), hadamard_matrix(4) / 2)
    assert torch.equal(make_mixer(3, "had_or_ident"), torch.eye(3))
    g = torch.Generator().manual_seed(10007 * 3)
    Q, R0 = torch.linalg.qr(torch.randn(3, 3, generator=g))
    torch.testing.assert_close(M, Q * torch.sign(R0.diagonal()))


@pytest.mark.parametrize("kwargs,match", [
    (dict(stage_bs=[8, 8]), "multiplies to 64"), (dict(fixed_mixer="fft"), "mixer"),
    (dict(ordering_mode="bitrev"), "ordering_mode"), (dict(passes=0), "passes")])
def test_bad_rotation_options_fail_clearly(kwargs, match):
    with pytest.raises(UserInputError, match=match):
        StructuredRotation(576, **kwargs)


def test_bad_fit_options_fail_before_work():
    proc = make_processor("harp", 64, 64, torch.Generator().manual_seed(0))
    with pytest.raises(UserInputError, match="harp_steps"):
        proc.fit(torch.eye(64), torch.randn(64, 64), None, FitOptions(steps=-1))


def test_early_stop_rule():
    assert not early_stop([5, 4, 3, 2, 1], 0, 0.01)
    assert not early_stop([5, 4, 3], 3, 0.01)
    assert early_stop([5, 4, 3, 3, 3, 3], 3, 0.01)
    assert not early_stop([5, 4, 3, 2.5, 2, 1.5], 3, 0.01)


@pytest.fixture(scope="module")
def real_site(smollm2):  # noqa: F811
    """Layer 2's o_proj on 4 x 256 tokens of real text: W (RMS 1) and regularized H of
    all tokens, of the first three sequences (fit) and of the last one (held out)."""
    model, tokenizer = smollm2
    text = open(__file__).read() * 3
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :1024].reshape(4, 256)
    seen = []
    module = model.model.layers[2].self_attn.o_proj
    handle = module.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].double()))
    with torch.no_grad():
        model(ids, use_cache=False)
    handle.remove()
    X = seen[0]

    def second_moment(rows):
        Z = rows.reshape(-1, 576)
        return regularize_hessian(Z.T @ Z / Z.shape[0], 0.01)

    W = site_weights(model.model.layers[2], "o")[0].double()
    return SimpleNamespace(W=W / W.square().mean().sqrt(), H=second_moment(X),
                           H_fit=second_moment(X[:3]), H_valid=second_moment(X[3:]))


@pytest.mark.slow
def test_fit_lowers_the_proxy_on_a_real_layer(real_site):
    W, H = real_site.W, real_site.H
    proc = HARPProcessor(576, 576, torch.ones(576), torch.ones(576))
    target = VectorCodebookTarget(get_codebook("E8P12"), 0.9)
    result = proc.fit(H, W, target, FitOptions(steps=25))
    assert result.steps_run == 25 and len(result.losses) == 25
    assert result.proxy_end < 0.95 * result.proxy_start
    assert result.losses[-1] < result.losses[0]


@pytest.mark.slow
def test_harp_linear_quantization_on_a_real_layer(real_site):
    """quantize_linear with harp: the exported linear computes x W^T of its own
    dequantized W^, and its LDLQ proxy is in the RHT's range."""
    W, H = real_site.W, real_site.H
    base = dict(scale_override=0.9, quip_tune_iters=1)
    _, had = quantize_linear([W], H, QuantizeOptions(incoh_mode="had", **base), torch.Generator().manual_seed(0))
    opts = QuantizeOptions(incoh_mode="harp", **base)
    opts.harp_fit = FitOptions(steps=10)
    linear, harp = quantize_linear([W], H, opts, torch.Generator().manual_seed(0))
    assert harp["harp"]["steps_run"] == 10 and harp["harp"]["proxy_end"] < harp["harp"]["proxy_start"]
    assert harp["proxy_loss"] < 1.2 * had["proxy_loss"]
    x = torch.randn(3, 576)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), x @ linear.dequantize().T, atol=1e-4, rtol=1e-4)


def test_batched_fit_follows_each_processors_own_trajectory():
    """fit_processors on a batch == each processor fitted alone (Adam, clipping and
    early stopping act per processor)."""
    from lib.incoherence.harp import fit_processors
    cb = get_codebook("E8P12")
    target = VectorCodebookTarget(cb, 0.9)
    opts = FitOptions(steps=12, grad_clip=0.05, early_stop_window=3, early_stop_min_rel_improve=0.12)
    data = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(400, 96, generator=g) * torch.linspace(0.1, 2, 96)
        data.append((X.T @ X / 400 + 0.01 * torch.eye(96), torch.randn(64, 96, generator=g)))

    def fresh():
        return [make_processor("harp", 64, 96, torch.Generator().manual_seed(s)) for s in range(3)]

    batched = fresh()
    results = fit_processors(batched, [H for H, _ in data], [W for _, W in data], target, opts)
    for proc, result, (H, W), alone in zip(batched, results, data, fresh()):
        single = alone.fit(H, W, target, opts)
        assert result.steps_run == single.steps_run
        assert result.losses == pytest.approx(single.losses, rel=1e-4)
        for a, b in zip(proc.parameters(), alone.parameters()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert len({r.steps_run for r in results}) > 1 or results[0].steps_run < 12


@pytest.mark.slow
def test_ldlq_strategy_starts_at_the_real_ldlq_proxy_and_lowers_it(real_site):
    """strategy ldlq: the step-0 objective is the relative LDLQ error of W~ on H~
    (computed independently here), and fitting lowers it."""
    from lib.algo.harp_target import CodebookTarget
    from lib.algo.ldlq import ldlq
    W, H = real_site.W.float(), real_site.H.float()
    proc = make_processor("harp", 576, 576, torch.Generator().manual_seed(0))
    target = CodebookTarget(get_codebook("E8P12"), 0.9)
    with torch.no_grad():
        Wt, Ht = proc.process_weight(W), proc.process_hessian(H)
        s = target.scale(Wt)
        T, _ = ldlq(Wt / s, Ht, get_codebook("E8P12"))
        E = Wt / s - T
        expected = (torch.sum((E @ Ht) * E) / torch.sum(((Wt / s) @ Ht) * (Wt / s))).item()
    result = proc.fit(H, W, target, FitOptions(steps=12, strategy="ldlq", hbd_lambda=0,
                                                q_recompute_every=4))
    assert result.proxy_start == pytest.approx(expected, rel=1e-4)
    assert result.proxy_end < result.proxy_start


def test_shrink_to_diagonal():
    from lib.incoherence.harp import shrink_to_diagonal
    H = torch.randn(2, 5, 5)
    out = shrink_to_diagonal(H, 0.25)
    torch.testing.assert_close(out.diagonal(dim1=-2, dim2=-1), H.diagonal(dim1=-2, dim2=-1))
    off = ~torch.eye(5, dtype=torch.bool)
    torch.testing.assert_close(out[:, off], 0.75 * H[:, off])
    assert shrink_to_diagonal(H, 0) is H


@pytest.mark.slow
def test_full_shrink_makes_the_fit_blind_to_off_diagonal_h(real_site):
    """With a = 1 (and no block regularizer, whose H~ would still see them) two Hessians
    that differ only off the diagonal give the same fit."""
    W, H = real_site.W.float(), real_site.H.float()
    H2 = torch.diag_embed(H.diagonal()) + 0.3 * (H - torch.diag_embed(H.diagonal()))
    target = VectorCodebookTarget(get_codebook("E8P12"), 0.9)
    opts = FitOptions(steps=5, h_shrink=1.0, hbd_lambda=0)
    a = make_processor("harp", 576, 576, torch.Generator().manual_seed(0))
    b = make_processor("harp", 576, 576, torch.Generator().manual_seed(0))
    ra, rb = a.fit(H, W, target, opts), b.fit(H2, W, target, opts)
    assert ra.losses == pytest.approx(rb.losses, rel=1e-5)


@pytest.mark.slow
def test_validation_keeps_the_validation_best_theta(real_site):
    """valid_every: theta returned is the one with the lowest held-out objective seen."""
    from lib.incoherence.harp import fit_processors
    W, H_fit, H_valid = real_site.W.float(), real_site.H_fit.float(), real_site.H_valid.float()
    target = VectorCodebookTarget(get_codebook("E8P12"), 0.9)
    opts = FitOptions(steps=20, valid_every=5, lr_u=0.2, lr_v=0.2)
    proc = make_processor("harp", 576, 576, torch.Generator().manual_seed(0))
    result = fit_processors([proc], [H_fit], [W], target, opts, Hs_valid=[H_valid])[0]
    assert result.valid_best_step in (0, 5, 10, 15, 20)
    assert result.valid_best <= result.valid_start
    with torch.no_grad():
        Wt, Hv = proc.process_weight(W), proc.process_hessian(H_valid)
        h = Hv.diagonal().abs() / (Hv.diagonal().abs().mean() + 1e-8)
        s = target.scale(Wt)
        value = (h[None, :] * (Wt / s - target(Wt / s)).square()).mean().item()
    assert value == pytest.approx(result.valid_best, rel=1e-4)


@pytest.mark.slow
def test_guard_falls_back_to_the_start_when_harp_validates_worse(real_site):
    """--harp_guard keeps theta = 0 where the fitted rotations give a worse LDLQ proxy on
    the held-out Hessian (forced here by a huge learning rate)."""
    from lib.algo.quip import LinearJob, quantize_linears
    W, site = real_site.W, real_site
    opts = QuantizeOptions(incoh_mode="harp", scale_override=0.9, quip_tune_iters=0, harp_guard=True)
    opts.harp_fit = FitOptions(steps=6, lr_u=5.0, lr_v=5.0)
    job = LinearJob([W], site.H, torch.Generator().manual_seed(0), H_fit=site.H_fit, H_valid=site.H_valid)
    linear, stats = quantize_linears([job], opts)[0]
    guard = stats["harp"]["guard"]
    assert guard["valid_proxy_fitted"] > guard["valid_proxy_start"] and guard["kept"] == "start"
    assert all(float(t.detach().abs().max()) == 0 for t in linear.processor.parameters())
    assert stats["proxy_loss"] > 0
    opts.harp_fit = FitOptions(steps=0)
    _, start_stats = quantize_linears([LinearJob([W], site.H, torch.Generator().manual_seed(0),
                                                 H_fit=site.H_fit, H_valid=site.H_valid)], opts)[0]
    assert start_stats["harp"]["guard"]["valid_proxy_start"] == pytest.approx(guard["valid_proxy_start"])
