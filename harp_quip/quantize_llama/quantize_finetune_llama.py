"""Quantize every decoder layer of a Llama model with QuIP# (no fine-tuning).

For each layer and each site (qkv, o, up, down, in this order): the FP weights
(fused where the input is shared), the site's Hessian, incoherence processing
(`--incoh_mode had|kron|harp`; harp fits its rotations first, `--harp_*` flags),
block LDLQ with the codebook. The signs are drawn from a torch generator seeded with
the layer index (+ 1000003 * --seed) at the start of the layer, SU then SV per
linear. The same site of `--layer_batch` layers is processed as one batch (same
results, far fewer kernel launches). Under torchrun (one process per GPU, README
"Multi-GPU") each process claims the next unclaimed group of `--layer_batch` layers
when it is free; the layer files are the same as a one-process run's. Outputs in
--save_path:

  quant_config.json      the run's settings (a rerun with other settings is refused)
  layer_{i:03d}.pt       codes + processor state of the 4 sites + the layer's norms
                         (written atomically last: the layer is done iff it exists)
  layer_{i:03d}.json     per site: proxy loss, relative error, seconds (amortized over
                         the batch), the HARP fit (losses at the start and the end)

A rerun skips finished layers.
"""
import argparse
import math
import time
from dataclasses import asdict
from pathlib import Path

import glog

from lib.algo.finetune import FinetuneOptions
from lib.algo.quip import QuantizeOptions
from lib.codebook import CLI_DEFAULTS, add_codebook_arguments, codebook_flags, codebook_from_flags
from lib.incoherence import check_mode
from lib.incoherence.harp import FitOptions, RotationOptions
from lib.utils import distributed
from lib.utils.errors import UserInputError, run_cli
from lib.utils.hadamard import hadamard_factor
from lib.utils.hessian import SITES, hessian_file, load_hessian_and_count
from lib.utils.io import check_or_write_config, remove_stale_tmp
from lib.utils.model_loading import DEFAULT_MODEL, default_device, load_base_model, parse_dtype
from model.decoder import site_weights
from quantize_llama.finetune_layers import run_finetuned_layers
from quantize_llama.layers import layer_complete, run_layers, summarize


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", default=DEFAULT_MODEL,
                   help="HF hub id, local HF directory, .gguf file, or the alias smollm2-135m")
    p.add_argument("--hessian_path", required=True, help="folder written by hessian_offline_llama")
    p.add_argument("--save_path", required=True, help="folder for the quantized layers")
    add_codebook_arguments(p)
    p.add_argument("--incoh_mode", default="had", help="had (randomized Hadamard) or kron")
    p.add_argument("--scale_override", type=float, default=-1.0,
                   help="RMS of the scaled weights seen by the codebook (QTIP: in units of the code's "
                        "RMS); <= 0: the codebook's default")
    p.add_argument("--sigma_reg", type=float, default=0.01, help="diagonal damping of the normalized H")
    p.add_argument("--quip_tune_iters", type=int, default=10, help="extra LDLQ coordinate-descent passes")
    p.add_argument("--use_fp64", action="store_true", help="quantize in float64 (default float32)")
    p.add_argument("--layer_idx", type=int, default=-1, help="quantize only this layer (-1: all)")
    p.add_argument("--resume_from_layer", type=int, default=0, help="first layer to quantize")
    p.add_argument("--stop_before_layer", type=int, default=None,
                   help="quantize layers before this one only (default: all)")
    p.add_argument("--seed", type=int, default=0, help="offsets the per-layer sign seeds")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--load_dtype", default="float32",
                   help="dtype the base model's weights are loaded in (float16 halves the RAM of big models)")
    p.add_argument("--layer_batch", type=int, default=8,
                   help="layers whose same site is fitted and quantized as one batch (GPU memory "
                        "grows with it; codes do not depend on it, scales may differ in the last bit)")
    p.add_argument("--num_workers", type=int, default=None, help=argparse.SUPPRESS)   # replaced by torchrun
    add_harp_arguments(p)
    add_finetune_arguments(p)
    p.set_defaults(**CLI_DEFAULTS)
    return p


def add_finetune_arguments(p):
    g = p.add_argument_group("intra-layer fine-tuning (QuIP#; off by default: --ft_epochs 0)")
    g.add_argument("--ft_epochs", type=int, default=0,
                   help="after quantizing qkv, o, up: tune the layer's remaining weights, norms and "
                        "the quantized linears' SU/SV to match the FP layer's outputs (0: off)")
    g.add_argument("--ft_lr", type=float, default=5e-5, help="unquantized weights and norms")
    g.add_argument("--ft_susv_lr", type=float, default=5e-4, help="SU/SV of the quantized linears")
    g.add_argument("--ft_harp_lr", type=float, default=5e-7, help="HARP theta (trains only if > 0)")
    g.add_argument("--ft_bs", type=int, default=4, help="sequences per step")
    g.add_argument("--ft_update_freq", type=int, default=2, help="gradient accumulation steps")
    g.add_argument("--ft_valid_size", type=int, default=128, help="last devset sequences used to validate")
    g.add_argument("--ft_early_stop", type=int, default=3, help="epochs without improvement before stopping")
    g.add_argument("--ft_train_mode", action="store_true",
                   help="decode the codes once per linear and keep them (faster, more memory)")
    g.add_argument("--devset_size", type=int, default=384, help="fine-tuning sequences")
    g.add_argument("--ctx_size", type=int, default=4096, help="tokens per fine-tuning sequence")
    g.add_argument("--ft_dataset", default="wikitext2", choices=["wikitext2", "redpajama", "c4"],
                   help="fine-tuning text (wikitext2 = its validation split, shipped offline)")
    g.add_argument("--ft_dataset_path", default=None, help="fine-tuning text file instead")
    g.add_argument("--ft_data_source", default="auto", choices=["auto", "hub", "local"])


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
        raise UserInputError(f"--harp_holdout_path {args.harp_holdout_path} does not exist; run "
                             f"hessian_offline_llama with --holdout_size and pass its SAVE_PATH/holdout")
    return QuantizeOptions(codebook_flags=codebook_flags(args), incoh_mode=args.incoh_mode,
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
    """Fail before any work when the codebook or a transform does not fit this model."""
    codebook = codebook_from_flags(opts.codebook_flags)
    for site in SITES:
        weights = site_weights(model.model.layers[0], site)
        codebook.check_shape(sum(w.shape[0] for w in weights), weights[0].shape[1])
    codebook.prepare()
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
    for name, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserInputError(f"--{name} must be a finite number, got {value}")
    codebook_flags(args)
    check_mode(args.incoh_mode)
    if args.quip_tune_iters < 0:
        raise UserInputError(f"--quip_tune_iters must be >= 0, got {args.quip_tune_iters}")
    if args.layer_batch < 1:
        raise UserInputError(f"--layer_batch must be >= 1, got {args.layer_batch}")
    if args.num_workers is not None:
        raise UserInputError(
            f"--num_workers was replaced by torchrun: `torchrun --standalone --nproc_per_node "
            f"{args.num_workers} -m quantize_llama.quantize_finetune_llama ...` runs one process per GPU "
            f"(README, Multi-GPU)")
    if args.sigma_reg < 0:
        raise UserInputError(f"--sigma_reg must be >= 0, got {args.sigma_reg}")
    if args.resume_from_layer < 0:
        raise UserInputError(f"--resume_from_layer must be >= 0, got {args.resume_from_layer}")
    if args.layer_idx < -1:
        raise UserInputError(f"--layer_idx must be a layer index >= 0 (or -1 for all layers), "
                             f"got {args.layer_idx}")
    if args.layer_idx >= 0 and (args.resume_from_layer or args.stop_before_layer is not None):
        raise UserInputError("--layer_idx selects one layer; drop --resume_from_layer/--stop_before_layer")
    if args.ft_epochs < 0:
        raise UserInputError(f"--ft_epochs must be >= 0, got {args.ft_epochs}")
    if args.ft_epochs > 0 and distributed.launched_by_torchrun():
        raise UserInputError("--ft_epochs > 0 runs in one process (each layer's fine-tuning data "
                             "flows through all the layers before it): start it with python -m, "
                             "not torchrun")
    if not Path(args.hessian_path).is_dir():
        raise UserInputError(f"--hessian_path {args.hessian_path} does not exist; "
                             f"run hessian_offline_llama first")


def finetune_options(args):
    opts = FinetuneOptions(epochs=args.ft_epochs, lr=args.ft_lr, susv_lr=args.ft_susv_lr,
                           harp_lr=args.ft_harp_lr, bs=args.ft_bs, update_freq=args.ft_update_freq,
                           valid_size=args.ft_valid_size, early_stop=args.ft_early_stop,
                           train_mode=args.ft_train_mode)
    opts.check(args.devset_size)
    if args.ft_train_mode and args.incoh_mode == "harp" and args.ft_harp_lr > 0:
        glog.info("--ft_train_mode caches decoded codes only; HARP's rotations still run per step")
    return opts


def layers_to_do(args, num_layers):
    if args.layer_idx >= num_layers:
        raise UserInputError(f"--layer_idx {args.layer_idx} is out of range: the model has "
                             f"{num_layers} layers (0..{num_layers - 1})")
    if args.layer_idx >= 0:
        return [args.layer_idx]
    stop = num_layers if args.stop_before_layer is None else min(args.stop_before_layer, num_layers)
    if args.resume_from_layer >= stop:
        raise UserInputError(f"no layer in [--resume_from_layer {args.resume_from_layer}, "
                             f"--stop_before_layer {stop}) of the model's {num_layers} layers")
    return list(range(args.resume_from_layer, stop))


def check_hessians(args, model, layers):
    """Before anything is written: every Hessian file the layers need exists, and those of
    the first one load and match the model's sizes (a missing or foreign file fails
    here, not after hours of work)."""
    folders = [args.hessian_path] + ([args.harp_holdout_path] if args.harp_holdout_path else [])
    missing = [hessian_file(folder, i, site) for folder in folders for i in layers for site in SITES
               if not hessian_file(folder, i, site).exists()]
    if missing:
        raise UserInputError(
            f"{len(missing)} Hessian file(s) are missing, e.g. {missing[0]}: run (or rerun, it resumes) "
            f"`python -m quantize_llama.hessian_offline_llama` for this model, or point "
            f"--hessian_path at the folder that holds them")
    if layers:
        for site in SITES:
            n = site_weights(model.model.layers[layers[0]], site)[0].shape[1]
            for folder in folders:
                load_hessian_and_count(folder, layers[0], site, n)


def run_config_of(args, opts, ft_opts):
    """The settings that determine the quantized layers (a rerun must match them)."""
    config = {"base_model": args.base_model, "hessian_path": str(Path(args.hessian_path).resolve()),
              "seed": args.seed, **asdict(opts), "harp_holdout_path": args.harp_holdout_path}
    config.update(config.pop("codebook_flags"))
    if opts.incoh_mode != "harp":
        for key in ("harp_rotation", "harp_fit", "harp_guard", "harp_holdout_path"):
            del config[key]
    if ft_opts is not None:
        config["finetune"] = {**asdict(ft_opts), "devset_size": args.devset_size, "ctx_size": args.ctx_size,
                              "dataset": args.ft_dataset, "dataset_path": args.ft_dataset_path}
    return config


def prepare_folder(args, opts, ft_opts, model, save_path, todo):
    """Rank 0, before any work: the layers still to do, their Hessians checked, the
    folder's config checked or written, temporary files of a killed run removed."""
    pending = [i for i in todo if not layer_complete(save_path, i)]
    check_hessians(args, model, pending)
    save_path.mkdir(parents=True, exist_ok=True)
    check_or_write_config(save_path / "quant_config.json", run_config_of(args, opts, ft_opts),
                          "quantized layers")
    stale = remove_stale_tmp(save_path)
    if stale:
        glog.info(f"removed {len(stale)} temporary file(s) of a killed run: {stale}")
    if len(pending) < len(todo):
        glog.info(f"resuming: {len(todo) - len(pending)} of {len(todo)} layers already done")
    return pending


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    parse_dtype(args.load_dtype)
    opts = quantize_options(args)
    ft_opts = finetune_options(args) if args.ft_epochs > 0 else None
    save_path = Path(args.save_path)

    with distributed.start(args.device or default_device()) as ranks:
        device = ranks.device
        model, tokenizer = load_base_model(args.base_model, dtype=parse_dtype(args.load_dtype), device="cpu")
        check_dimensions(model, opts)
        todo = layers_to_do(args, len(model.model.layers))
        pending = ranks.share("quantize_setup",
                              lambda: prepare_folder(args, opts, ft_opts, model, save_path, todo))
        start = time.time()
        job = {"seed": args.seed, "hessian_path": args.hessian_path, "holdout_path": args.harp_holdout_path,
               "save_path": str(save_path), "opts": opts}
        if ft_opts is None:
            run_layers(model, pending, job, device, args.layer_batch, ranks)
        else:
            run_finetuned_layers(model, tokenizer, pending, job, device, ft_opts, args)
        ranks.barrier("quantize_done")
        if ranks.is_main:
            summarize(save_path, todo)
            glog.info(f"quantized {len(pending)} layers in {time.time() - start:.1f} s -> {save_path}")


if __name__ == "__main__":
    run_cli(main)
