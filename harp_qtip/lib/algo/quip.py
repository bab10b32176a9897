"""QuIP#-style quantization of (possibly fused) linear layers with any codebook of the
pipeline contract (lib/codebook/base.py; QuIP#'s E8P/RVQ, QTIP's trellis).

Steps (QuIP# fact sheet, section 3): each sub-matrix divided by its own RMS and
stacked; H regularized; incoherence processing (W', H'), HARP fitted first in
`harp` mode; W' scaled to RMS c = codebook.weight_rms(--scale_override) (QuIP#:
the override or the codebook's opt_scale; QTIP: the code's RMS times the override);
block LDLQ + tune passes on H'; a linear whose H' is not PD in float32 is redone in
float64 with fresh signs (and a fresh fit). All output-side scales (Wscale,
per-sub-matrix RMS) are folded into SV.

`quantize_linears` takes several linears of the same shape (e.g. one site of several
layers) and runs the fit and LDLQ on them as one batch: the same results as one by
one, with the launches of one.
"""
import copy
from dataclasses import asdict, dataclass, field

import glog
import torch

from lib.algo.harp_target import CodebookTarget
from lib.algo.ldlq import CholeskyError, ldlq, proxy_loss
from lib.codebook import codebook_from_flags, default_codebook_flags
from lib.incoherence import make_processor
from lib.incoherence.harp import FitOptions, RotationOptions, fit_processors
from lib.linear.quantized_linear import QuantizedLinear
from lib.utils.errors import UserInputError
from lib.utils.hessian import regularize_hessian


@dataclass
class QuantizeOptions:
    """`codebook_flags`: the backend's codebook flags (lib.codebook.codebook_flags)."""
    codebook_flags: dict = field(default_factory=default_codebook_flags)
    incoh_mode: str = "had"
    scale_override: float = -1.0
    sigma_reg: float = 0.01
    quip_tune_iters: int = 10
    use_fp64: bool = False
    harp_rotation: RotationOptions = field(default_factory=RotationOptions)
    harp_fit: FitOptions = field(default_factory=FitOptions)
    harp_guard: bool = False


@dataclass
class LinearJob:
    """One linear to quantize: its weights (stacked in order), its Hessian (uncentered
    second moment), the generator its signs are drawn from and, optionally, the
    Hessians of the calibration tokens without / with only a held-out part (HARP fits on
    H_fit, validates on H_valid; LDLQ always uses H). `name` (e.g. "layer 3 up") prefixes
    the errors about this linear."""
    weights: list
    H: torch.Tensor
    generator: torch.Generator
    H_fit: torch.Tensor = None
    H_valid: torch.Tensor = None
    name: str = None


def _check_inputs(weights, H, codebook):
    if not weights or any(not torch.is_tensor(w) or w.ndim != 2 for w in weights):
        raise UserInputError(
            f"weights must be a non-empty list of 2-D (out x in) tensors; got shapes "
            f"{[tuple(getattr(w, 'shape', ())) for w in weights]}")
    n = weights[0].shape[1]
    if any(w.shape[1] != n for w in weights):
        raise UserInputError(
            f"fused weights must be 2-D with the same input size; got shapes "
            f"{[tuple(w.shape) for w in weights]}")
    if not torch.is_tensor(H) or H.shape != (n, n):
        raise UserInputError(f"Hessian shape {tuple(getattr(H, 'shape', ()))} does not match the "
                             f"weight's input size {n}: pass the n x n Hessian of this linear's inputs")
    codebook.check_shape(sum(w.shape[0] for w in weights), n)


def _named(job, err):
    """The same UserInputError, prefixed with the linear's name when it has one."""
    return UserInputError(f"{job.name}: {err}") if job.name else err


def _prepare(job, opts, codebook, device):
    """(W normalized and stacked, per-row RMS scale, {H, H_fit, H_valid} regularized), float64."""
    try:
        _check_inputs(job.weights, job.H, codebook)
        weights = [w.to(device=device, dtype=torch.float64) for w in job.weights]
        rms = [w.square().mean().sqrt() for w in weights]
        if not all(torch.isfinite(r) and r > 0 for r in rms):
            raise UserInputError("a weight matrix is all zero or holds NaN/Inf; cannot quantize it "
                                 "(check the base model's weights)")
        W = torch.cat([w / r for w, r in zip(weights, rms)])
        row_scale = torch.cat([r.expand(w.shape[0]) for w, r in zip(weights, rms)])
        hessians = {name: regularize_hessian(H.to(device=device, dtype=torch.float64), opts.sigma_reg)
                    for name, H in (("H", job.H), ("H_fit", job.H_fit), ("H_valid", job.H_valid))
                    if H is not None}
    except UserInputError as err:
        raise _named(job, err) from None
    return W, row_scale, hessians


def _fit_summary(fit):
    """What the per-layer log keeps of a HARP fit (loss curve: at most ~100 points)."""
    every = max(1, len(fit.losses) // 100)
    summary = {k: v for k, v in asdict(fit).items() if k != "losses"}
    summary["loss_curve_every"] = every
    summary["loss_curve"] = fit.losses[::every]
    return summary


def _fit(processors, Ws, hessians, codebook, opts):
    """Fit HARP on H_fit (else H), validating on H_valid when given; fit summaries."""
    target = CodebookTarget(codebook, opts.scale_override, opts.harp_fit.chunk_size)
    fit_on = [h.get("H_fit", h["H"]) for h in hessians]
    valid = [h["H_valid"] for h in hessians] if all("H_valid" in h for h in hessians) else None
    fits = fit_processors(processors, fit_on, Ws, target, opts.harp_fit, log=glog.info, Hs_valid=valid)
    for proc in processors:
        proc.requires_grad_(False)
    return [_fit_summary(f) for f in fits]


def _ldlq(processors, Ws, Hs, codebook, opts, dtype):
    """LDLQ of the processed weights: per linear (codes, Wscale, W_hat) or None where
    the processed H is not positive definite."""
    c = codebook.weight_rms(opts.scale_override)
    with torch.no_grad():
        Hp = torch.stack([p.process_hessian(H.to(dtype)) for p, H in zip(processors, Hs)])
        Wp = torch.stack([p.process_weight(W.to(dtype)) for p, W in zip(processors, Ws)])
        Wscale = Wp.square().mean(dim=(-2, -1), keepdim=True).sqrt() / c
        keep = list(range(len(Ws)))
        try:
            Wq, codes = ldlq(Wp / Wscale, Hp, codebook, opts.quip_tune_iters)
        except CholeskyError as err:
            keep = [i for i in keep if i not in err.failed]
            Wq, codes = (ldlq(Wp[keep] / Wscale[keep], Hp[keep], codebook, opts.quip_tune_iters)
                         if keep else (None, None))
        out = [None] * len(Ws)
        for row, i in enumerate(keep):
            out[i] = (codes[row], Wscale[i], processors[i].restore_weight(Wq[row] * Wscale[i]))
    return out


def _at_start(processor):
    """A copy of a fitted HARP processor with theta = 0 (its starting rotations)."""
    start = copy.deepcopy(processor)
    with torch.no_grad():
        for theta in start.parameters():
            theta.zero_()
    return start


def _guard(processors, quantized, Ws, hessians, codebook, opts, dtype):
    """`--harp_guard`: per linear keep HARP only if its LDLQ proxy on the held-out
    Hessian beats the start's (theta = 0; the RHT itself with --harp_kron_fallback)."""
    starts = [_at_start(p) for p in processors]
    baseline = _ldlq(starts, Ws, [h["H"] for h in hessians], codebook, opts, dtype)
    decisions = []
    for i, (W, h) in enumerate(zip(Ws, hessians)):
        fitted = proxy_loss(W, quantized[i][2].to(W.dtype), h["H_valid"]) if quantized[i] else None
        start = proxy_loss(W, baseline[i][2].to(W.dtype), h["H_valid"]) if baseline[i] else None
        keep = fitted is not None and (start is None or fitted < start)
        if not keep and start is not None:
            processors[i], quantized[i] = starts[i], baseline[i]
        decisions.append({"valid_proxy_fitted": fitted, "valid_proxy_start": start,
                          "kept": "fitted" if keep else "start"})
    return decisions


def _quantize_batch(Ws, hessians, generators, codebook, opts, dtype, device):
    """Processors, HARP fit, LDLQ for same-shape linears. Returns one entry per linear:
    (processor, codes, Wscale, W_hat, extra stats), or None where H' is not PD."""
    m, n = Ws[0].shape
    processors = [make_processor(opts.incoh_mode, m, n, g, opts.harp_rotation).to(device)
                  for g in generators]
    extras = [{} for _ in Ws]
    if opts.incoh_mode == "harp":
        for extra, fit in zip(extras, _fit(processors, Ws, hessians, codebook, opts)):
            extra["harp"] = fit
    quantized = _ldlq(processors, Ws, [h["H"] for h in hessians], codebook, opts, dtype)
    if opts.incoh_mode == "harp" and opts.harp_guard:
        for extra, decision in zip(extras, _guard(processors, quantized, Ws, hessians, codebook, opts,
                                                  dtype)):
            extra["harp"]["guard"] = decision
    return [None if q is None else (p, *q, extra) for p, q, extra in zip(processors, quantized, extras)]


def quantize_linears(jobs, opts, device="cpu"):
    """Quantize same-shape linears (list of LinearJob) as one batch. Signs come from
    each job's generator (SU, then SV, per linear). Returns [(QuantizedLinear on CPU,
    stats)] in job order."""
    codebook = codebook_from_flags(opts.codebook_flags)
    prepared = [_prepare(job, opts, codebook, device) for job in jobs]
    if len({tuple(W.shape) for W, _, _ in prepared}) != 1:
        raise ValueError("quantize_linears needs linears of one shape; group them by site")
    Ws = [W for W, _, _ in prepared]
    hessians = [h for _, _, h in prepared]
    dtype = torch.float64 if opts.use_fp64 else torch.float32
    results = _quantize_batch(Ws, hessians, [job.generator for job in jobs], codebook, opts, dtype, device)
    for i, result in enumerate(results):
        if result is None and dtype == torch.float32:
            results[i] = _quantize_batch([Ws[i]], [hessians[i]], [jobs[i].generator], codebook, opts,
                                         torch.float64, device)[0]
        if results[i] is None:
            raise _named(jobs[i], UserInputError(
                "the Hessian is not positive definite (a negative eigenvalue beyond --sigma_reg "
                "damping; Cholesky fails even in float64 with jitter): it is not a second moment "
                "of real activations; recompute the Hessians or raise --sigma_reg"))
    return [_package(result, W, row_scale, h["H"], job, opts)
            for result, (W, row_scale, h), job in zip(results, prepared, jobs)]


def _package(result, W, row_scale, H, job, opts):
    processor, codes, Wscale, W_hat, extra = result
    W_hat = W_hat.to(torch.float64)
    processor.SV = (processor.SV.to(torch.float64) * Wscale.to(torch.float64).flatten() * row_scale).float()
    processor.SU = processor.SU.float()
    m, n = W.shape
    linear = QuantizedLinear(n, m, codebook_from_flags(opts.codebook_flags).config(), processor.config())
    linear.load_quantized(codes, processor)
    stats = {
        "proxy_loss": proxy_loss(W, W_hat, H),
        "rel_fro_err": ((W - W_hat).norm() / W.norm()).item(),
        "Wscale": Wscale.item(),
        "dtype": str(Wscale.dtype).replace("torch.", ""),
        "shape": [m, n],
        "split": [w.shape[0] for w in job.weights],
        **extra,
    }
    return linear.cpu(), stats


def quantize_linear(weights, H, opts, generator, device="cpu"):
    """Quantize one linear: the row-stack of `weights` (list of m_i x n) with Hessian H
    (n x n, uncentered second moment). Returns (QuantizedLinear on CPU, stats dict)."""
    return quantize_linears([LinearJob(weights, H, generator)], opts, device)[0]
