"""End-to-end fine-tuning of an exported quantized model (QuIP#, after hfize).

Tunes the quantized linears' SU/SV (`--ft_susv_lr`), HARP's theta when
`--ft_harp_lr` > 0, every RMSNorm including the final one, and the lm_head
(`--ft_lr`; left frozen when it is tied to the frozen embeddings) so that the
quantized model's next-token distribution matches the FP model's: the loss is the
cross entropy against the FP softmax over positions 0..ctx-2 of the devset, the FP
logits computed on the fly. The best validation state (the initial one included) is
exported to --hf_output_path as a new model directory.
"""
import argparse
import time
from pathlib import Path

import glog
import torch
import torch.nn.functional as F

from lib.algo.finetune import FinetuneOptions, finetune, split_batches
from lib.utils.data import get_calibration_sequences
from lib.utils.errors import UserInputError, run_cli
from lib.utils.model_loading import default_device, is_quantized_checkpoint, load_base_model
from model.quantized_llama import load_quantized_model, quantized_linears
from quantize_llama.hfize_llama import bits_per_weight, check_output_path, export


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", required=True, help="the FP model the export was quantized from")
    p.add_argument("--hf_path", required=True, help="quantized export directory (hfize_llama)")
    p.add_argument("--hf_output_path", required=True, help="where the fine-tuned export goes")
    p.add_argument("--devset_size", type=int, default=64)
    p.add_argument("--ctx_size", type=int, default=4096)
    p.add_argument("--ft_valid_size", type=int, default=8, help="last devset sequences used to validate")
    p.add_argument("--ft_lr", type=float, default=1e-5, help="norms and lm_head")
    p.add_argument("--ft_susv_lr", type=float, default=1e-4)
    p.add_argument("--ft_harp_lr", type=float, default=0.0, help="HARP theta (trains only if > 0)")
    p.add_argument("--ft_bs", type=int, default=8)
    p.add_argument("--ft_update_freq", type=int, default=1)
    p.add_argument("--ft_epochs", type=int, default=1)
    p.add_argument("--ft_early_stop", type=int, default=3)
    p.add_argument("--dataset", default="wikitext2", choices=["wikitext2", "redpajama", "c4"])
    p.add_argument("--dataset_path", default=None)
    p.add_argument("--data_source", default="auto", choices=["auto", "hub", "local"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    return p


def make_trainable(model):
    """Norms (and an untied lm_head) train; everything else of the FP parts is frozen."""
    model.requires_grad_(False)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.weight.requires_grad_(True)
    if not model.config.tie_word_embeddings:
        model.lm_head.weight.requires_grad_(True)
    else:
        glog.info("lm_head is tied to the (frozen) embeddings and stays frozen")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not is_quantized_checkpoint(args.hf_path):
        raise UserInputError(f"--hf_path {args.hf_path} is not a quantized export; run hfize_llama first")
    check_output_path(args.hf_output_path)
    opts = FinetuneOptions(epochs=args.ft_epochs, lr=args.ft_lr, susv_lr=args.ft_susv_lr,
                           harp_lr=args.ft_harp_lr, bs=args.ft_bs, update_freq=args.ft_update_freq,
                           valid_size=args.ft_valid_size, early_stop=args.ft_early_stop)
    opts.check(args.devset_size)
    device = args.device or default_device()
    model, tokenizer = load_quantized_model(args.hf_path, device=device, dtype=torch.float32)
    fp_dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    fp_model, _ = load_base_model(args.base_model, dtype=fp_dtype, device=device)
    devset, source = get_calibration_sequences(tokenizer, args.dataset, args.devset_size, args.ctx_size,
                                               seed=args.seed, dataset_path=args.dataset_path,
                                               source=args.data_source)
    glog.info(f"end-to-end fine-tuning on {args.devset_size} x {args.ctx_size} tokens from {source}")

    def loss_fn(index):
        ids = devset[index].to(device)
        with torch.no_grad():
            target = F.softmax(fp_model(ids, use_cache=False).logits[:, :-1].float(), dim=-1)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()

    make_trainable(model)
    start = time.time()
    train, valid = split_batches(args.devset_size, opts.bs, opts.valid_size)
    result = finetune(model, loss_fn, train, valid, opts, device)
    for linear in quantized_linears(model):
        linear.freeze()
    params = model.config.quip_params
    log = {"hf_path": str(args.hf_path), "finetune_e2e": result, "seconds": time.time() - start,
           **bits_per_weight(model)}
    export(model.cpu(), tokenizer, params, Path(args.hf_output_path), log)
    glog.info(f"validation loss {result['valid_start']:.4f} -> {result['valid_best']:.4f} "
              f"(best epoch {result['best_epoch']}) -> {args.hf_output_path}")


if __name__ == "__main__":
    run_cli(main)
