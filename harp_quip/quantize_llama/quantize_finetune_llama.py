"""Quantize every decoder layer of a Llama model with QuIP# (no fine-tuning).

For each layer and each site (qkv, o, up, down, in this order): the FP weights
(fused where the input is shared), the site's Hessian, incoherence processing
(`--incoh_mode`), block LDLQ with the codebook. The signs are drawn from a torch
generator seeded with the layer index (+ 1000003 * --seed) at the start of the
layer, SU then SV per linear. Outputs in --save_path:

  quant_config.json      the run's settings (a rerun with other settings is refused)
  layer_{i:03d}.pt       codes + processor state of the 4 sites + the layer's norms
                         (written atomically last: the layer is done iff it exists)
  layer_{i:03d}.json     per-site proxy loss, relative error, seconds; layer seconds

A rerun skips finished layers.
"""
import argparse
import time
from dataclasses import asdict
from pathlib import Path

import glog
import torch
from tqdm import tqdm

from lib.algo.quip import QuantizeOptions, quantize_linear
from lib.codebook import get_codebook
from lib.incoherence import check_mode
from lib.utils.errors import UserInputError, run_cli
from lib.utils.hessian import SITES, load_hessian
from lib.utils.io import atomic_torch_save, atomic_write_json, read_json
from lib.utils.model_loading import DEFAULT_MODEL, default_device, load_base_model
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
    return p


def quantize_options(args):
    return QuantizeOptions(codebook=args.codebook, incoh_mode=args.incoh_mode,
                           scale_override=args.scale_override, sigma_reg=args.sigma_reg,
                           quip_tune_iters=args.quip_tune_iters, use_fp64=args.use_fp64)


def check_args(args):
    get_codebook(args.codebook)
    check_mode(args.incoh_mode)
    if args.quip_tune_iters < 0:
        raise UserInputError(f"--quip_tune_iters must be >= 0, got {args.quip_tune_iters}")
    if args.sigma_reg < 0:
        raise UserInputError(f"--sigma_reg must be >= 0, got {args.sigma_reg}")
    if not Path(args.hessian_path).is_dir():
        raise UserInputError(f"--hessian_path {args.hessian_path} does not exist; "
                             f"run hessian_offline_llama first")


def check_or_write_run_config(save_path, run_config):
    path = save_path / "quant_config.json"
    if path.exists():
        old = read_json(path)
        diff = {k: (old.get(k), v) for k, v in run_config.items() if old.get(k) != v}
        if diff:
            raise UserInputError(
                f"{save_path} holds layers quantized with other settings ({diff}); "
                f"use a new --save_path or delete the old layers")
    else:
        atomic_write_json(run_config, path)


def layer_file(save_path, layer_idx, suffix):
    return Path(save_path) / f"layer_{layer_idx:03d}.{suffix}"


def quantize_layer(layer, layer_idx, args, opts, device):
    """Quantize the 4 sites of one decoder layer; returns (record, log)."""
    generator = torch.Generator().manual_seed(layer_idx + 1000003 * args.seed)
    layer_start = time.time()
    record = {"layer_idx": layer_idx, "linears": {},
              "norms": {name: getattr(layer, name).weight.detach().float().cpu().clone()
                        for name in NORMS}}
    log = {"layer_idx": layer_idx, "sites": {}}
    for site in SITES:
        start = time.time()
        weights = site_weights(layer, site)
        H = load_hessian(args.hessian_path, layer_idx, site, weights[0].shape[1])
        linear, stats = quantize_linear(weights, H, opts, generator, device=device)
        record["linears"][site] = {"config": linear.config(), "state": linear.state_dict()}
        stats["seconds"] = time.time() - start
        log["sites"][site] = stats
    log["layer_seconds"] = time.time() - layer_start
    return record, log


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
    opts = quantize_options(args)
    save_path = Path(args.save_path)
    save_path.mkdir(parents=True, exist_ok=True)
    device = args.device or default_device()
    check_or_write_run_config(save_path, {
        "base_model": args.base_model, "hessian_path": str(Path(args.hessian_path).resolve()),
        "seed": args.seed, **asdict(opts)})

    model, _ = load_base_model(args.base_model, dtype=torch.float32, device="cpu")
    num_layers = len(model.model.layers)
    if args.layer_idx >= num_layers:
        raise UserInputError(f"--layer_idx {args.layer_idx} is out of range: the model has "
                             f"{num_layers} layers (0..{num_layers - 1})")
    todo = [args.layer_idx] if args.layer_idx >= 0 else list(range(num_layers))
    pending = [i for i in todo if not layer_file(save_path, i, "pt").exists()]
    if len(pending) < len(todo):
        glog.info(f"resuming: {len(todo) - len(pending)} of {len(todo)} layers already done")
    start = time.time()
    for i in tqdm(pending, desc="quantize", unit="layer"):
        record, log = quantize_layer(model.model.layers[i], i, args, opts, device)
        atomic_write_json(log, layer_file(save_path, i, "json"))
        atomic_torch_save(record, layer_file(save_path, i, "pt"))
    summarize(save_path, todo)
    glog.info(f"quantized {len(pending)} layers in {time.time() - start:.1f} s -> {save_path}")


if __name__ == "__main__":
    run_cli(main)
