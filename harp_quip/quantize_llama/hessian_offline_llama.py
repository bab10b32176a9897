"""Collect per-layer input second moments (Hessians) of a Llama model.

Calibration sequences are embedded, then pushed through the FP model one decoder
layer at a time; forward pre-hooks on q_proj, o_proj, up_proj and down_proj
accumulate the inputs of the four sites (qkv, o, up, down) in float64, and the
layer's outputs feed the next layer. Each (layer, site) is saved atomically as
`{layer}_{site}.pt` (QuIP# format, see lib/utils/hessian.py); a rerun skips layers
whose four files exist (it still propagates through them).
"""
import argparse
import time
from pathlib import Path

import glog
import torch
from tqdm import tqdm

from lib.utils.data import get_calibration_sequences
from lib.utils.errors import UserInputError, run_cli
from lib.utils.hessian import SITES, SecondMomentAccumulator, hessian_file
from lib.utils.io import atomic_torch_save, atomic_write_json, read_json
from lib.utils.model_loading import DEFAULT_MODEL, default_device, load_base_model, parse_dtype
from model.decoder import SITE_INPUT_MODULE, layer_forward


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", default=DEFAULT_MODEL,
                   help="HF hub id, local HF directory, .gguf file, or the alias smollm2-135m")
    p.add_argument("--save_path", required=True, help="folder for {layer}_{site}.pt files")
    p.add_argument("--devset_size", type=int, default=256, help="number of calibration sequences")
    p.add_argument("--ctx_size", type=int, default=4096, help="tokens per calibration sequence")
    p.add_argument("--dataset", default="wikitext2", choices=["wikitext2", "redpajama", "c4"],
                   help="calibration corpus (wikitext2 = its validation split, shipped offline)")
    p.add_argument("--dataset_path", default=None, help="calibration text file instead of --dataset")
    p.add_argument("--data_source", default="auto", choices=["auto", "hub", "local"])
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="forward dtype (default float16 on cuda, float32 on cpu)")
    return p


def check_args(args):
    for name in ("devset_size", "ctx_size", "batch_size"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be >= 1, got {getattr(args, name)}")


def check_or_write_run_config(save_path, run_config):
    """Refuse to mix Hessians of different models/data in one folder."""
    path = save_path / "hessian_config.json"
    if path.exists():
        old = read_json(path)
        if old != run_config:
            diff = {k: (old.get(k), v) for k, v in run_config.items() if old.get(k) != v}
            raise UserInputError(
                f"{save_path} holds Hessians of another run (differences {diff}); "
                f"use a new --save_path or delete the old files")
    else:
        atomic_write_json(run_config, path)


def layer_done(save_path, layer_idx):
    return all(hessian_file(save_path, layer_idx, site).exists() for site in SITES)


def collect_layer(model, layer, hidden, batch_size, device):
    """Run one layer over all sequences; returns (outputs, {site: accumulator})."""
    accumulators, handles = {}, []
    for site, name in SITE_INPUT_MODULE.items():
        module = layer.get_submodule(name)
        accumulators[site] = SecondMomentAccumulator(module.in_features, device)
        handles.append(module.register_forward_pre_hook(
            lambda mod, inputs, acc=accumulators[site]: acc.add(inputs[0])))
    try:
        outputs = run_layer(model, layer, hidden, batch_size, device)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, accumulators


@torch.no_grad()
def run_layer(model, layer, hidden, batch_size, device):
    outputs = torch.empty_like(hidden)
    for start in range(0, hidden.shape[0], batch_size):
        batch = hidden[start:start + batch_size].to(device)
        outputs[start:start + batch_size] = layer_forward(model, layer, batch).to(outputs.device)
    return outputs


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    save_path = Path(args.save_path)
    save_path.mkdir(parents=True, exist_ok=True)
    device = args.device or default_device()
    dtype = parse_dtype(args.dtype or ("float16" if device.startswith("cuda") else "float32"))

    model, tokenizer = load_base_model(args.base_model, dtype=dtype, device="cpu")
    devset, source = get_calibration_sequences(
        tokenizer, args.dataset, args.devset_size, args.ctx_size, seed=args.seed,
        dataset_path=args.dataset_path, source=args.data_source)
    check_or_write_run_config(save_path, {
        "base_model": args.base_model, "dataset": args.dataset, "dataset_path": args.dataset_path,
        "source": source, "devset_size": args.devset_size, "ctx_size": args.ctx_size,
        "seed": args.seed, "dtype": str(dtype).replace("torch.", "")})
    glog.info(f"calibration: {args.devset_size} x {args.ctx_size} tokens from {source}")

    model.model.rotary_emb.to(device)
    with torch.no_grad():
        hidden = model.model.embed_tokens(devset)
    start = time.time()
    layers = model.model.layers
    for i in tqdm(range(len(layers)), desc="hessians", unit="layer"):
        layer = layers[i].to(device)
        if layer_done(save_path, i):
            hidden = run_layer(model, layer, hidden, args.batch_size, device)
        else:
            hidden, accumulators = collect_layer(model, layer, hidden, args.batch_size, device)
            for site, acc in accumulators.items():
                atomic_torch_save(acc.to_file_dict(), hessian_file(save_path, i, site))
        layer.to("cpu")
    glog.info(f"done: {len(layers)} layers x {len(SITE_INPUT_MODULE)} sites in "
              f"{time.time() - start:.1f} s -> {save_path}")


if __name__ == "__main__":
    run_cli(main)
