"""Collect per-layer input second moments (Hessians) of a Llama model.

Calibration sequences are embedded, then pushed through the FP model one decoder
layer at a time; forward pre-hooks on q_proj, o_proj, up_proj and down_proj
accumulate the inputs of the four sites (qkv, o, up, down) in float64, and the
layer's outputs feed the next layer. Each (layer, site) is saved atomically as
`{layer}_{site}.pt` (QuIP# format, see lib/utils/hessian.py); a rerun skips layers
whose four files exist (it still propagates through them).

Under torchrun (one process per GPU, README "Multi-GPU") each process takes a
contiguous share of the calibration sequences, made of whole `--batch_size` batches
(the batches of a one-process run), and pushes it through all layers; per layer and
site, rank 0 adds the processes' float64 sums in rank order and writes the files. The
Hessians equal a one-process run's up to the float64 summation order (a few float32
ulps at most after rounding; tests/test_distributed.py).
"""
import argparse
import time
from pathlib import Path

import glog
import torch
from tqdm import tqdm

from lib.utils import distributed
from lib.utils.data import get_calibration_sequences
from lib.utils.errors import UserInputError, run_cli
from lib.utils.hessian import SITES, SecondMomentAccumulator, hessian_file
from lib.utils.io import atomic_torch_save, check_or_write_config, remove_stale_tmp
from lib.utils.model_loading import DEFAULT_MODEL, default_device, load_base_model, parse_dtype
from model.decoder import SITE_INPUT_MODULE, run_layer


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
    p.add_argument("--holdout_size", type=int, default=0,
                   help="also save, under SAVE_PATH/holdout, the Hessians of this many held-out "
                        "sequences (HARP's --harp_holdout_path; the main files keep all sequences)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="forward dtype (default float16 on cuda, float32 on cpu)")
    return p


def check_args(args):
    for name in ("devset_size", "ctx_size", "batch_size"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.holdout_size < 0:
        raise UserInputError(f"--holdout_size must be >= 0, got {args.holdout_size}")


def layer_done(save_path, layer_idx, holdout_path=None):
    paths = [save_path] + ([holdout_path] if holdout_path is not None else [])
    return all(hessian_file(path, layer_idx, site).exists() for path in paths for site in SITES)


def collect_layer(model, layer, hidden, batch_size, device, holdout=None):
    """Run one layer over all sequences; returns (outputs, {site: accumulator},
    {site: accumulator of the held-out sequences} or None). `holdout`: a bool mask
    over the sequences."""
    accumulators, held, handles, current = {}, None if holdout is None else {}, [], {}

    def hook(site):
        def add(module, inputs):
            accumulators[site].add(inputs[0])
            if held is not None and current["mask"].any():
                held[site].add(inputs[0][current["mask"]])
        return add

    for site, name in SITE_INPUT_MODULE.items():
        module = layer.get_submodule(name)
        accumulators[site] = SecondMomentAccumulator(module.in_features, device)
        if held is not None:
            held[site] = SecondMomentAccumulator(module.in_features, device)
        handles.append(module.register_forward_pre_hook(hook(site)))

    def on_batch(start, stop):
        if holdout is not None:
            current["mask"] = holdout[start:stop].to(device)

    try:
        outputs = run_layer(model, layer, hidden, batch_size, device, on_batch)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, accumulators, held


def holdout_mask(args, save_path):
    """(mask over the calibration sequences, folder) of the held-out ones, or (None, None).
    Their Hessians go to save_path/holdout; the main files keep all sequences."""
    if args.holdout_size == 0:
        return None, None
    if args.holdout_size >= args.devset_size:
        raise UserInputError(f"--holdout_size {args.holdout_size} must be smaller than "
                             f"--devset_size {args.devset_size}")
    chosen = torch.randperm(args.devset_size, generator=torch.Generator().manual_seed(args.seed + 1))
    mask = torch.zeros(args.devset_size, dtype=torch.bool)
    mask[chosen[:args.holdout_size]] = True
    return mask, save_path / "holdout"


def prepare_folders(args, save_path, config, holdout, holdout_path, num_layers):
    """Rank 0, before any work: check or write the configs, remove the temporary files of
    a killed run; returns which layers are done."""
    save_path.mkdir(parents=True, exist_ok=True)
    check_or_write_config(save_path / "hessian_config.json", config, "Hessians")
    if holdout is not None:
        check_or_write_config(holdout_path / "holdout_config.json",
                              {"holdout_size": args.holdout_size,
                               "sequences": torch.nonzero(holdout).flatten().tolist()}, "held-out Hessians")
    for folder in (save_path, holdout_path):
        stale = remove_stale_tmp(folder) if folder is not None else []
        if stale:
            glog.info(f"removed {len(stale)} temporary file(s) of a killed run: {stale}")
    return [layer_done(save_path, i, holdout_path) for i in range(num_layers)]


def gather_accumulator(ranks, acc):
    """Rank 0: the accumulator over every rank's sequences (sums added in rank order);
    the other ranks: None. One process: `acc` itself."""
    S, s = ranks.sum_to_main(acc.S), ranks.sum_to_main(acc.s)
    ct = ranks.sum_to_main(torch.tensor([acc.ct], dtype=torch.int64, device=acc.S.device))
    if not ranks.is_main:
        return None
    acc.S, acc.s, acc.ct = S, s, int(ct.item())
    return acc


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    save_path = Path(args.save_path)
    with distributed.start(args.device or default_device()) as ranks:
        collect(args, save_path, ranks)


def collect(args, save_path, ranks):
    """Every layer's Hessians from this process's share of the sequences (all of them
    without torchrun); rank 0 writes the files."""
    device = ranks.device
    dtype = parse_dtype(args.dtype or ("float16" if device.startswith("cuda") else "float32"))

    model, tokenizer = load_base_model(args.base_model, dtype=dtype, device="cpu")
    devset, source = get_calibration_sequences(
        tokenizer, args.dataset, args.devset_size, args.ctx_size, seed=args.seed,
        dataset_path=args.dataset_path, source=args.data_source)
    config = {"base_model": args.base_model, "dataset": args.dataset, "dataset_path": args.dataset_path,
              "source": source, "devset_size": args.devset_size, "ctx_size": args.ctx_size,
              "seed": args.seed, "dtype": str(dtype).replace("torch.", "")}
    holdout, holdout_path = holdout_mask(args, save_path)
    layers = model.model.layers
    done = ranks.share("hessian_setup", lambda: prepare_folders(
        args, save_path, config, holdout, holdout_path, len(layers)))
    if ranks.is_main:
        glog.info(f"calibration: {args.devset_size} x {args.ctx_size} tokens from {source}")
    shard = distributed.batch_shard(args.devset_size, args.batch_size, ranks.rank, ranks.world_size)
    if ranks.world_size > 1:
        glog.info(f"rank {ranks.rank}: sequences [{shard.start}, {shard.stop}) on {device}")
    holdout = holdout[shard] if holdout is not None else None

    model.model.rotary_emb.to(device)
    with torch.no_grad():
        hidden = model.model.embed_tokens(devset[shard])
    start = time.time()
    for i in tqdm(range(len(layers)), desc="hessians", unit="layer", disable=not ranks.is_main):
        layer = layers[i].to(device)
        if done[i]:
            hidden = run_layer(model, layer, hidden, args.batch_size, device)
        else:
            hidden, accumulators, held = collect_layer(model, layer, hidden, args.batch_size, device,
                                                       holdout)
            for site, acc in accumulators.items():
                total = gather_accumulator(ranks, acc)
                if total is not None:
                    atomic_torch_save(total.to_file_dict(), hessian_file(save_path, i, site))
                if held is not None:
                    total = gather_accumulator(ranks, held[site])
                    if total is not None:
                        atomic_torch_save(total.to_file_dict(), hessian_file(holdout_path, i, site))
        layer.to("cpu")
    ranks.barrier("hessians_done")
    if ranks.is_main:
        glog.info(f"done: {len(layers)} layers x {len(SITE_INPUT_MODULE)} sites in "
                  f"{time.time() - start:.1f} s -> {save_path}")


if __name__ == "__main__":
    run_cli(main)
