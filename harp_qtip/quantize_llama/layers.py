"""Quantizing decoder layers: the files of a quantized layer, the jobs of its sites,
and running groups of layers (batched by site) in this process or, under torchrun,
taken by each process from a shared queue."""
import time
from pathlib import Path

import glog
import torch
from tqdm import tqdm

from lib.algo.quip import LinearJob, quantize_linears
from lib.utils.distributed import Solo
from lib.utils.hessian import SITES, hessian_file, load_hessian_and_count, without_tokens
from lib.utils.io import atomic_torch_save, atomic_write_json, read_json
from model.decoder import NORMS, site_weights


def layer_file(save_path, layer_idx, suffix):
    return Path(save_path) / f"layer_{layer_idx:03d}.{suffix}"


def layer_complete(save_path, layer_idx):
    """A finished layer: its file exists and loads with all four sites. A damaged file
    (e.g. truncated by a full disk) is reported and the layer redone."""
    path = layer_file(save_path, layer_idx, "pt")
    if not path.exists():
        return False
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        if set(record["linears"]) == set(SITES):
            return True
    except Exception as err:
        glog.warning(f"{path} is damaged ({type(err).__name__}); redoing layer {layer_idx}")
        return False
    glog.warning(f"{path} lacks sites; redoing layer {layer_idx}")
    return False


def layer_inputs(layer):
    """What quantizing a layer needs from the FP model: site weights and norms (CPU)."""
    return {"weights": {site: [w.float().clone() for w in site_weights(layer, site)] for site in SITES},
            "norms": {name: getattr(layer, name).weight.detach().float().clone() for name in NORMS}}


def linear_job(weights, job, layer_idx, site, generator):
    """The LinearJob of a site: its Hessian and, with held-out Hessians, H_fit (the
    tokens not held out) and H_valid (the held-out ones)."""
    n = weights[0].shape[1]
    H, count = load_hessian_and_count(job["hessian_path"], layer_idx, site, n)
    name = f"layer {layer_idx} site {site} ({hessian_file(job['hessian_path'], layer_idx, site)})"
    if job["holdout_path"] is None:
        return LinearJob(weights, H, generator, name=name)
    H_valid, held_out = load_hessian_and_count(job["holdout_path"], layer_idx, site, n)
    return LinearJob(weights, H, generator, H_fit=without_tokens(H, count, H_valid, held_out),
                     H_valid=H_valid, name=name)


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
        write_layer(job["save_path"], i, records[i], logs[i])
    return [logs[i] for i, _ in group]


def write_layer(save_path, layer_idx, record, log):
    """The log, then the layer file (atomic; its presence marks the layer done)."""
    atomic_write_json(log, layer_file(save_path, layer_idx, "json"))
    atomic_torch_save(record, layer_file(save_path, layer_idx, "pt"))


def run_layers(model, pending, job, device, layer_batch, ranks=None):
    """Quantize the pending layers in groups of `layer_batch` (the same groups for any
    number of processes). `ranks` (lib.utils.distributed; default one process): under
    torchrun each process claims the next unclaimed group when it is free, so every
    group is quantized exactly once, by whichever process got to it first."""
    ranks = ranks or Solo(device)
    groups = [pending[k:k + layer_batch] for k in range(0, len(pending), layer_batch)]
    progress = tqdm(total=len(pending), desc="quantize", unit="layer", disable=ranks.world_size > 1)
    for g in ranks.claims("quantize", len(groups)):
        quantize_layer_group([(i, layer_inputs(model.model.layers[i])) for i in groups[g]], job, device)
        progress.update(len(groups[g]))
        if ranks.world_size > 1:
            glog.info(f"rank {ranks.rank} quantized layers {groups[g]} (group {g + 1} of {len(groups)})")
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
