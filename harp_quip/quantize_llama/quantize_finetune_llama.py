"""Quantize every decoder layer of a Llama model with QuIP# (no fine-tuning).

For each layer and each site (qkv, o, up, down, in this order): the FP weights
(fused where the input is shared), the site's Hessian, incoherence processing
(`--incoh_mode had|kron|harp`; harp fits its rotations first, `--harp_*` flags),
block LDLQ with the codebook. The signs are drawn from a torch generator seeded with
the layer index (+ 1000003 * --seed) at the start of the layer, SU then SV per
linear. The same site of `--layer_batch` layers is processed as one batch (same
results, far fewer kernel launches); `--num_workers` processes take groups of layers
(round robin over the GPUs). Outputs in --save_path:

  quant_config.json      the run's settings (a rerun with other settings is refused)
  layer_{i:03d}.pt       codes + processor state of the 4 sites + the layer's norms
                         (written atomically last: the layer is done iff it exists)
  layer_{i:03d}.json     per site: proxy loss, relative error, seconds (amortized over
                         the batch), the HARP fit (losses at the start and the end)

A rerun skips finished layers.
"""
import argparse
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import glog
import torch
import torch.multiprocessing as mp
from tqdm import tqdm

from lib.algo.quip import LinearJob, QuantizeOptions, quantize_linears
from lib.codebook import get_codebook
from lib.incoherence import check_mode
from lib.incoherence.harp import FitOptions, RotationOptions
from lib.utils.errors import UserInputError, run_cli
from lib.utils.hadamard import hadamard_factor
from lib.utils.hessian import SITES, load_hessian_and_count, without_tokens
from lib.utils.io import atomic_torch_save, atomic_write_json, check_or_write_config, read_json
from lib.utils.model_loading import DEFAULT_MODEL, default_device, load_base_model, parse_dtype
from model.decoder import NORMS, site_weights


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", default=DEFAULT_MODEL,
                   help="HF hub id, local HF directory, .gguf file, or the alias smollm2-135m")
    p.add_argument("--hessian_path", required=True, help="folder written by hessian_offline_llama")
    p.add_argument("--save_path", required=True, help="folder for the quantized layers")
    p.add_argument("--codebook", default="E8P12")
    p.add_argument("--incoh_mode", default="had", help="had (randomized Hadamard) or kron")
    p.add_argument("--scale_override", type=float, default=-1.0,
                   help="RMS of the scaled weights seen by the codebook; <= 0: the codebook's opt_scale")
    p.add_argument("--sigma_reg", type=float, default=0.01, help="diagonal damping of the normalized H")
    p.add_argument("--quip_tune_iters", type=int, default=10, help="extra LDLQ coordinate-descent passes")
    p.add_argument("--use_fp64", action="store_true", help="quantize in float64 (default float32)")
    p.add_argument("--layer_idx", type=int, default=-1, help="quantize only this layer (-1: all)")
    p.add_argument("--seed", type=int, default=0, help="offsets the per-layer sign seeds")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--load_dtype", default="float32",
                   help="dtype the base model's weights are loaded in (float16 halves the RAM of big models)")
    p.add_argument("--layer_batch", type=int, default=8,
                   help="layers whose same site is fitted and quantized as one batch (GPU memory "
                        "grows with it; results do not depend on it)")
    p.add_argument("--num_workers", type=int, default=1,
                   help="processes quantizing layers in parallel (GPUs are shared round robin)")
    add_harp_arguments(p)
    return p


def schedule_list(text):
    try:
        return [int(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of radices") from None


def add_harp_arguments(p):
    g = p.add_argument_group("HARP (--incoh_mode harp): rotation structure and fitting")
    g.add_argument("--harp_b", type=int, default=8, help="preferred stage radix")
    g.add_argument("--harp_max_b", type=int, default=8, help="largest radix tried after --harp_b")
    g.add_argument("--harp_stage_bs", type=schedule_list, nargs="+", default=None,
                   help="explicit schedules, e.g. 8,8,9 (each used for the rotation size it multiplies to)")
    g.add_argument("--harp_passes", type=int, default=1, help="independent passes over the stages")
    g.add_argument("--harp_ordering_mode", default="stride", help="stage ordering (only: stride)")
    g.add_argument("--harp_fixed_mixer", default="had_or_qr",
                   help="fixed mixer per block: had_or_qr, had_or_ident, identity")
    g.add_argument("--harp_use_givens_b2", action="store_true", help="one angle per radix-2 block")
    g.add_argument("--harp_theta_init_scale", type=float, default=0.0, help="std of the initial theta")
    g.add_argument("--harp_theta_clip", type=float, default=None, help="theta -> clip * tanh(theta)")
    g.add_argument("--harp_kron_fallback", action="store_true",
                   help="non-power-of-two n = K n2: learn an n2 rotation, mix slices with H_K (starts at the RHT)")
    g.add_argument("--harp_steps", type=int, default=1200, help="Adam steps per linear")
    g.add_argument("--harp_strategy", default="proxy",
                   help="proxy (reference: independent rounding, diagonal H weights) or ldlq "
                        "(LDLQ-feedback target, full H~: the real proxy error)")
    g.add_argument("--harp_lr_u", type=float, default=0.03, help="learning rate of the output side")
    g.add_argument("--harp_lr_v", type=float, default=0.03, help="learning rate of the input side")
    g.add_argument("--harp_reg_theta", type=float, default=0.0, help="L2 weight on theta")
    g.add_argument("--harp_grad_clip", type=float, default=None, help="global gradient-norm clip")
    g.add_argument("--harp_hbd_lambda", type=float, default=0.1, help="Hessian block-diagonal regularizer")
    g.add_argument("--harp_hbd_block", type=int, default=8, help="block size of that regularizer")
    g.add_argument("--harp_chunk_size", type=int, default=131072,
                   help="codebook vectors quantized at once for the proxy target")
    g.add_argument("--harp_q_recompute_every", type=int, default=1, help="refresh the target every k steps")
    g.add_argument("--harp_early_stop_window", type=int, default=0, help="0: off")
    g.add_argument("--harp_early_stop_min_rel_improve", type=float, default=0.01)
    g = p.add_argument_group("HARP generalization (beyond the reference)")
    g.add_argument("--harp_h_shrink", type=float, default=0.0,
                   help="the fit sees (1 - a) H + a diag(H), a in [0, 1]")
    g.add_argument("--harp_holdout_path", default=None,
                   help="Hessians of held-out calibration tokens (hessian_offline_llama --holdout_size): "
                        "HARP then fits on the other tokens and validates on these")
    g.add_argument("--harp_valid_every", type=int, default=0,
                   help="every k steps the fit objective on the held-out Hessian; keep the "
                        "validation-best theta (needs --harp_holdout_path)")
    g.add_argument("--harp_guard", action="store_true",
                   help="keep HARP for a linear only if its LDLQ proxy on the held-out Hessian beats "
                        "the start's (theta = 0) (needs --harp_holdout_path)")


def quantize_options(args):
    rotation = RotationOptions(
        b=args.harp_b, max_b=args.harp_max_b, stage_bs=args.harp_stage_bs, passes=args.harp_passes,
        ordering_mode=args.harp_ordering_mode, fixed_mixer=args.harp_fixed_mixer,
        use_givens_b2=args.harp_use_givens_b2, theta_init_scale=args.harp_theta_init_scale,
        theta_clip=args.harp_theta_clip, kron_fallback=args.harp_kron_fallback)
    fit = FitOptions(
        steps=args.harp_steps, strategy=args.harp_strategy, lr_u=args.harp_lr_u, lr_v=args.harp_lr_v,
        reg_theta=args.harp_reg_theta, grad_clip=args.harp_grad_clip, hbd_lambda=args.harp_hbd_lambda,
        hbd_block=args.harp_hbd_block, chunk_size=args.harp_chunk_size,
        q_recompute_every=args.harp_q_recompute_every, early_stop_window=args.harp_early_stop_window,
        early_stop_min_rel_improve=args.harp_early_stop_min_rel_improve,
        h_shrink=args.harp_h_shrink, valid_every=args.harp_valid_every)
    rotation.check()
    fit.check()
    if (args.harp_valid_every > 0 or args.harp_guard) and args.harp_holdout_path is None:
        raise UserInputError("--harp_valid_every and --harp_guard need held-out Hessians: run "
                             "hessian_offline_llama with --holdout_size and pass --harp_holdout_path")
    if args.harp_holdout_path is not None and not Path(args.harp_holdout_path).is_dir():
        raise UserInputError(f"--harp_holdout_path {args.harp_holdout_path} does not exist")
    return QuantizeOptions(codebook=args.codebook, incoh_mode=args.incoh_mode,
                           scale_override=args.scale_override, sigma_reg=args.sigma_reg,
                           quip_tune_iters=args.quip_tune_iters, use_fp64=args.use_fp64,
                           harp_rotation=rotation, harp_fit=fit, harp_guard=args.harp_guard)


def rotation_sizes(model):
    """Every transform size of the model's quantized sites: inputs n and fused outputs m."""
    layer = model.model.layers[0]
    sizes = set()
    for site in SITES:
        weights = site_weights(layer, site)
        sizes.update({weights[0].shape[1], sum(w.shape[0] for w in weights)})
    return sorted(sizes)


def check_dimensions(model, opts):
    """Fail before any work when a transform cannot be built for this model."""
    sizes = rotation_sizes(model)
    if opts.incoh_mode == "had" or (opts.incoh_mode == "harp" and opts.harp_rotation.kron_fallback):
        for size in sizes:
            hadamard_factor(size)
    if opts.incoh_mode == "harp":
        inner = {opts.harp_rotation.stage_size(size) for size in sizes}
        for schedule in opts.harp_rotation.stage_bs or []:
            if math.prod(schedule) not in inner:
                raise UserInputError(
                    f"--harp_stage_bs {','.join(map(str, schedule))} multiplies to {math.prod(schedule)}, "
                    f"which is no rotation size of this model ({sorted(inner)})")


def check_args(args):
    get_codebook(args.codebook)
    check_mode(args.incoh_mode)
    if args.quip_tune_iters < 0:
        raise UserInputError(f"--quip_tune_iters must be >= 0, got {args.quip_tune_iters}")
    if args.layer_batch < 1:
        raise UserInputError(f"--layer_batch must be >= 1, got {args.layer_batch}")
    if args.num_workers < 1:
        raise UserInputError(f"--num_workers must be >= 1, got {args.num_workers}")
    if args.sigma_reg < 0:
        raise UserInputError(f"--sigma_reg must be >= 0, got {args.sigma_reg}")
    if not Path(args.hessian_path).is_dir():
        raise UserInputError(f"--hessian_path {args.hessian_path} does not exist; "
                             f"run hessian_offline_llama first")


def layer_file(save_path, layer_idx, suffix):
    return Path(save_path) / f"layer_{layer_idx:03d}.{suffix}"


def layer_inputs(layer):
    """What quantizing a layer needs from the FP model: site weights and norms (CPU)."""
    return {"weights": {site: [w.float().clone() for w in site_weights(layer, site)] for site in SITES},
            "norms": {name: getattr(layer, name).weight.detach().float().clone() for name in NORMS}}


def linear_job(weights, job, layer_idx, site, generator):
    """The LinearJob of a site: its Hessian and, with held-out Hessians, H_fit (the
    tokens not held out) and H_valid (the held-out ones)."""
    n = weights[0].shape[1]
    H, count = load_hessian_and_count(job["hessian_path"], layer_idx, site, n)
    if job["holdout_path"] is None:
        return LinearJob(weights, H, generator)
    H_valid, held_out = load_hessian_and_count(job["holdout_path"], layer_idx, site, n)
    return LinearJob(weights, H, generator, H_fit=without_tokens(H, count, H_valid, held_out),
                     H_valid=H_valid)


def quantize_layer_group(group, job, device):
    """Quantize the 4 sites of a group of layers [(layer_idx, inputs)], each site of all
    of them as one batch, and write each layer's files; returns their logs. Each layer's
    signs come from its own generator, in site order, as in a one-layer run."""
    generators = {i: torch.Generator().manual_seed(i + 1000003 * job["seed"]) for i, _ in group}
    records = {i: {"layer_idx": i, "linears": {}, "norms": inputs["norms"]} for i, inputs in group}
    logs = {i: {"layer_idx": i, "device": str(device), "batch": len(group), "sites": {}} for i, _ in group}
    group_start = time.time()
    for site in SITES:
        start = time.time()
        jobs = [linear_job(inputs["weights"][site], job, i, site, generators[i]) for i, inputs in group]
        results = quantize_linears(jobs, job["opts"], device)
        seconds = (time.time() - start) / len(group)
        for (i, _), (linear, stats) in zip(group, results):
            records[i]["linears"][site] = {"config": linear.config(), "state": linear.state_dict()}
            logs[i]["sites"][site] = {**stats, "seconds": seconds}
    for i, _ in group:
        logs[i]["layer_seconds"] = (time.time() - group_start) / len(group)
        atomic_write_json(logs[i], layer_file(job["save_path"], i, "json"))
        atomic_torch_save(records[i], layer_file(job["save_path"], i, "pt"))
    return [logs[i] for i, _ in group]


_WORKER = {}


def _init_worker(devices, threads):
    """Each pool process takes the next device of the shared queue."""
    _WORKER["device"] = devices.get()
    torch.set_num_threads(threads)


def _run_task(task):
    group, job = task
    return quantize_layer_group(group, job, _WORKER["device"])


def worker_devices(device, num_workers):
    """Round-robin over the visible GPUs (`--device cuda`), else the one device."""
    if device == "cuda" and torch.cuda.device_count() > 1:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(num_workers)]
    return [device] * num_workers


def run_layers(model, pending, job, device, num_workers, layer_batch):
    """Quantize the pending layers in groups of `layer_batch`, in this process or on a
    pool of `num_workers` processes (dynamic assignment: each takes the next group when
    it is free)."""
    groups = [pending[k:k + layer_batch] for k in range(0, len(pending), layer_batch)]
    tasks = (([(i, layer_inputs(model.model.layers[i])) for i in group], job) for group in groups)
    progress = tqdm(total=len(pending), desc="quantize", unit="layer")
    if num_workers <= 1:
        for group, _ in tasks:
            quantize_layer_group(group, job, device)
            progress.update(len(group))
    else:
        ctx = mp.get_context("spawn")
        devices = ctx.Queue()
        for name in worker_devices(device, num_workers):
            devices.put(name)
        threads = max(1, (os.cpu_count() or 1) // num_workers)
        with ctx.Pool(num_workers, initializer=_init_worker, initargs=(devices, threads)) as pool:
            for logs in pool.imap_unordered(_run_task, tasks):
                progress.update(len(logs))
    progress.close()


def summarize(save_path, layer_indices):
    logs = [read_json(layer_file(save_path, i, "json")) for i in layer_indices
            if layer_file(save_path, i, "json").exists()]
    if not logs:
        return
    glog.info(f"summary over {len(logs)} layers:")
    for site in SITES:
        proxy = [log["sites"][site]["proxy_loss"] for log in logs]
        secs = [log["sites"][site]["seconds"] for log in logs]
        glog.info(f"  {site:5s} mean proxy loss {sum(proxy) / len(proxy):.4f}   "
                  f"mean {sum(secs) / len(secs):.2f} s per linear")
    layer_secs = [log["layer_seconds"] for log in logs]
    glog.info(f"  mean {sum(layer_secs) / len(layer_secs):.2f} s per layer, "
              f"sum {sum(layer_secs):.1f} s")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    parse_dtype(args.load_dtype)
    opts = quantize_options(args)
    save_path = Path(args.save_path)
    device = args.device or default_device()
    run_config = {"base_model": args.base_model, "hessian_path": str(Path(args.hessian_path).resolve()),
                  "seed": args.seed, **asdict(opts), "harp_holdout_path": args.harp_holdout_path}
    if opts.incoh_mode != "harp":
        for key in ("harp_rotation", "harp_fit", "harp_guard", "harp_holdout_path"):
            del run_config[key]

    model, _ = load_base_model(args.base_model, dtype=parse_dtype(args.load_dtype), device="cpu")
    check_dimensions(model, opts)
    num_layers = len(model.model.layers)
    if args.layer_idx >= num_layers:
        raise UserInputError(f"--layer_idx {args.layer_idx} is out of range: the model has "
                             f"{num_layers} layers (0..{num_layers - 1})")
    save_path.mkdir(parents=True, exist_ok=True)
    check_or_write_config(save_path / "quant_config.json", run_config, "quantized layers")
    todo = [args.layer_idx] if args.layer_idx >= 0 else list(range(num_layers))
    pending = [i for i in todo if not layer_file(save_path, i, "pt").exists()]
    if len(pending) < len(todo):
        glog.info(f"resuming: {len(todo) - len(pending)} of {len(todo)} layers already done")
    start = time.time()
    job = {"seed": args.seed, "hessian_path": args.hessian_path, "holdout_path": args.harp_holdout_path,
           "save_path": str(save_path), "opts": opts}
    run_layers(model, pending, job, device, args.num_workers, args.layer_batch)
    summarize(save_path, todo)
    glog.info(f"quantized {len(pending)} layers in {time.time() - start:.1f} s -> {save_path}")


if __name__ == "__main__":
    run_cli(main)
