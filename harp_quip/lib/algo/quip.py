"""QuIP# quantization of one (possibly fused) linear layer.

Steps (QuIP# fact sheet, section 3): each sub-matrix divided by its own RMS and
stacked; H regularized; incoherence processing (W', H'); W' scaled to RMS c
(`--scale_override` or the codebook's opt_scale); block LDLQ + tune passes on H';
a non-PD H' in float32 retries the whole linear in float64 with fresh signs. All
output-side scales (Wscale, per-sub-matrix RMS) are folded into SV.
"""
from dataclasses import asdict, dataclass, field

import glog
import torch

from lib.algo.ldlq import CholeskyError, ldlq, proxy_loss
from lib.codebook import get_codebook
from lib.incoherence import make_processor
from lib.incoherence.harp import FitOptions, RotationOptions, VectorCodebookTarget
from lib.linear.quantized_linear import QuantizedLinear
from lib.utils.errors import UserInputError
from lib.utils.hessian import regularize_hessian


@dataclass
class QuantizeOptions:
    codebook: str = "E8P12"
    incoh_mode: str = "had"
    scale_override: float = -1.0
    sigma_reg: float = 0.01
    quip_tune_iters: int = 10
    use_fp64: bool = False
    harp_rotation: RotationOptions = field(default_factory=RotationOptions)
    harp_fit: FitOptions = field(default_factory=FitOptions)


def _check_inputs(weights, H, codesz):
    n = weights[0].shape[1]
    if any(w.ndim != 2 or w.shape[1] != n for w in weights):
        raise UserInputError(
            f"fused weights must be 2-D with the same input size; got shapes "
            f"{[tuple(w.shape) for w in weights]}")
    if H.shape != (n, n):
        raise UserInputError(f"Hessian shape {tuple(H.shape)} does not match the weight's input size {n}")
    m = sum(w.shape[0] for w in weights)
    if n % codesz or m % 2:
        raise UserInputError(
            f"cannot quantize a {m} x {n} linear: the input size must be a multiple of the "
            f"codebook's vector size {codesz} and the output size even")


def _fit_summary(fit):
    """What the per-layer log keeps of a HARP fit (loss curve: at most ~100 points)."""
    every = max(1, len(fit.losses) // 100)
    summary = {k: v for k, v in asdict(fit).items() if k != "losses"}
    summary["loss_curve_every"] = every
    summary["loss_curve"] = fit.losses[::every]
    return summary


def _quantize_once(W, H, codebook, opts, generator, dtype):
    m, n = W.shape
    W, H = W.to(dtype), H.to(dtype)
    processor = make_processor(opts.incoh_mode, m, n, generator, opts.harp_rotation).to(device=W.device)
    fit = None
    c = opts.scale_override if opts.scale_override > 0 else codebook.opt_scale
    if opts.incoh_mode == "harp":
        target = VectorCodebookTarget(codebook, opts.scale_override, opts.harp_fit.chunk_size)
        fit = _fit_summary(processor.fit(H, W, target, opts.harp_fit, log=glog.info))
        processor.requires_grad_(False)
    with torch.no_grad():
        Hp = processor.process_hessian(H)
        Wp = processor.process_weight(W)
        Wscale = Wp.square().mean().sqrt() / c
        Wq, codes = ldlq(Wp / Wscale, Hp, codebook, opts.quip_tune_iters)
        W_hat = processor.restore_weight(Wq * Wscale)
    return processor, codes, Wscale, W_hat, fit


def quantize_linear(weights, H, opts, generator, device="cpu"):
    """Quantize the row-stack of `weights` (list of m_i x n) with Hessian H (n x n,
    uncentered second moment). Returns (QuantizedLinear on CPU, stats dict)."""
    codebook = get_codebook(opts.codebook)
    _check_inputs(weights, H, codebook.codesz)
    weights = [w.to(device=device, dtype=torch.float64) for w in weights]
    rms = [w.square().mean().sqrt() for w in weights]
    if not all(torch.isfinite(r) and r > 0 for r in rms):
        raise UserInputError("a weight matrix is all zero or holds NaN/Inf; cannot quantize it")
    W = torch.cat([w / r for w, r in zip(weights, rms)])
    H = regularize_hessian(H.to(device=device, dtype=torch.float64), opts.sigma_reg)

    dtype = torch.float64 if opts.use_fp64 else torch.float32
    try:
        processor, codes, Wscale, W_hat, fit = _quantize_once(W, H, codebook, opts, generator, dtype)
    except CholeskyError:
        if dtype == torch.float64:
            raise UserInputError("the processed Hessian is not positive definite even in float64 "
                                 "with jitter; recompute the Hessians or raise --sigma_reg")
        dtype = torch.float64
        processor, codes, Wscale, W_hat, fit = _quantize_once(W, H, codebook, opts, generator, dtype)

    W_hat = W_hat.to(torch.float64)
    row_scale = torch.cat([torch.full((w.shape[0],), float(r), dtype=torch.float64, device=device)
                           for w, r in zip(weights, rms)])
    processor.SV = (processor.SV.to(torch.float64) * Wscale.to(torch.float64) * row_scale).float()
    processor.SU = processor.SU.float()
    m, n = W.shape
    linear = QuantizedLinear(n, m, opts.codebook, processor.config())
    linear.load_quantized(codes, processor)
    stats = {
        "proxy_loss": proxy_loss(W, W_hat, H),
        "rel_fro_err": ((W - W_hat).norm() / W.norm()).item(),
        "Wscale": Wscale.item(),
        "dtype": str(dtype).replace("torch.", ""),
        "shape": [m, n],
        "split": [w.shape[0] for w in weights],
    }
    if fit is not None:
        stats["harp"] = fit
    return linear.cpu(), stats
