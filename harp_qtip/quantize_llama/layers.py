"""Quantizing decoder layers: the files of a quantized layer, the jobs of its sites,
and running groups of layers (batched by site) in this process or on worker processes."""
import os
import time
from pathlib import Path

import glog
import torch
import torch.multiprocessing as mp
from tqdm import tqdm

from lib.algo.quip import LinearJob, quantize_linears
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
