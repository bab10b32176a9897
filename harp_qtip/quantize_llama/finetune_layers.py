"""Quantization with intra-layer fine-tuning (QuIP#, `--ft_epochs > 0`).

The fine-tuning devset is embedded and pushed through the FP model layer by layer;
layer i learns from its FP inputs and FP outputs. Within a layer the sites are
quantized in order (qkv, o, up, down) and after each of qkv, o and up the layer's
remaining trainable state is tuned to match the FP outputs (MSE): the FP weights of
the sites still to come, both RMSNorms and the quantized linears' SU/SV (and HARP's
theta with --ft_harp_lr > 0). The later sites are quantized from the tuned weights.
Layers run one at a time (their inputs are FP activations, so any subset works).
"""
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lib.algo.finetune import finetune, split_batches
from lib.algo.quip import quantize_linears
from lib.utils.data import get_calibration_sequences
from lib.utils.hessian import SITES
from model.decoder import NORMS, layer_forward, run_layer, site_weights
from model.quantized_llama import install_site, site_linear
from quantize_llama.layers import linear_job, write_layer


def _make_fp_trainable(layer):
    for module in layer.modules():
        if isinstance(module, (nn.Linear,)) or type(module).__name__.endswith("RMSNorm"):
            module.weight.requires_grad_(True)


def quantize_finetune_layer(model, layer_idx, fp_layer, inputs, targets, job, device, ft_opts, batches):
    """Quantize and fine-tune one layer; writes its files and returns its log."""
    start = time.time()
    generator = torch.Generator().manual_seed(layer_idx + 1000003 * job["seed"])
    layer = copy.deepcopy(fp_layer).to(device=device, dtype=torch.float32).requires_grad_(False)
    train, valid = batches

    def loss_fn(index):
        out = layer_forward(model, layer, inputs[index].to(device=device, dtype=torch.float32))
        return F.mse_loss(out.float(), targets[index].to(device=device, dtype=torch.float32))

    log = {"layer_idx": layer_idx, "device": str(device), "batch": 1, "sites": {}, "finetune": {}}
    for site in SITES:
        site_start = time.time()
        weights = [w.detach().float().cpu() for w in site_weights(layer, site)]
        linear, stats = quantize_linears([linear_job(weights, job, layer_idx, site, generator)],
                                         job["opts"], device)[0]
        linear = linear.to(device)
        install_site(layer, site, linear)
        if ft_opts.train_mode:
            linear.cache_decoded()
        log["sites"][site] = {**stats, "seconds": time.time() - site_start}
        if site != "down":
            _make_fp_trainable(layer)
            log["finetune"][site] = finetune(layer, loss_fn, train, valid, ft_opts, device)
    record = {"layer_idx": layer_idx, "linears": {}, "norms": {}}
    for site in SITES:
        linear = site_linear(layer, site)
        linear.cache_decoded(False)
        linear.freeze()
        record["linears"][site] = {"config": linear.config(),
                                   "state": {k: v.cpu() for k, v in linear.state_dict().items()}}
    record["norms"] = {name: getattr(layer, name).weight.detach().float().cpu().clone() for name in NORMS}
    log["layer_seconds"] = time.time() - start
    write_layer(job["save_path"], layer_idx, record, log)
    return log


def run_finetuned_layers(model, tokenizer, pending, job, device, ft_opts, args):
    """Quantize + fine-tune the pending layers, propagating the devset through FP layers."""
    devset, _ = get_calibration_sequences(tokenizer, args.ft_dataset, args.devset_size, args.ctx_size,
                                          seed=args.seed, dataset_path=args.ft_dataset_path,
                                          source=args.ft_data_source)
    batches = split_batches(args.devset_size, ft_opts.bs, ft_opts.valid_size)
    model.model.rotary_emb.to(device)
    with torch.no_grad():
        hidden = model.model.embed_tokens(devset)
    for i in tqdm(range(max(pending) + 1), desc="quantize+finetune", unit="layer"):
        fp_layer = model.model.layers[i].to(device)
        targets = run_layer(model, fp_layer, hidden, ft_opts.bs, device)
        if i in pending:
            quantize_finetune_layer(model, i, fp_layer, hidden, targets, job, device, ft_opts, batches)
        fp_layer.to("cpu")
        hidden = targets
