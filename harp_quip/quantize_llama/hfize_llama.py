"""Assemble quantized layers into a model directory that loads as a runnable Llama.

Reads --quantized_path (quant_config.json + layer_{i:03d}.pt from
quantize_finetune_llama), takes embeddings, final norm and lm_head from the base
model, and writes --hf_output_path: config.json (Llama config + quip_params),
model.safetensors, tokenizer files, export_log.json (bits per weight). Layers with
no quantized file stay in full precision (as after `--layer_idx`), with a warning.
The directory is written next to its target and renamed into place when complete.
"""
import argparse
import json
import shutil
from pathlib import Path

import glog
import torch
from safetensors.torch import save_file

from lib.codebook import get_codebook
from lib.utils.errors import UserInputError, run_cli
from lib.utils.io import atomic_write_json, read_json
from lib.utils.model_loading import load_base_model
from model.quantized_llama import WEIGHTS_FILE, install_layer, quantized_linears, quip_params_of
from quantize_llama.quantize_finetune_llama import layer_file


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantized_path", required=True, help="folder written by quantize_finetune_llama")
    p.add_argument("--hf_output_path", required=True, help="output model directory")
    p.add_argument("--base_model", default=None, help="default: the one recorded in quant_config.json")
    return p


def load_layer_records(quantized_path, num_layers):
    records = {}
    for i in range(num_layers):
        path = layer_file(quantized_path, i, "pt")
        if not path.exists():
            continue
        try:
            records[i] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UserInputError(f"{path} is unreadable ({err}); delete it and rerun "
                                 f"quantize_finetune_llama to redo that layer") from err
    return records


def bits_per_weight(model, codebook_bits):
    """Nominal code bits over all quantized weights (SU, SV and norms not counted)."""
    weights = sum(lin.in_features * lin.out_features for lin in quantized_linears(model))
    return {"quantized_weights": weights, "code_bits": weights * codebook_bits,
            "bits_per_weight": codebook_bits if weights else None}


def quantize_model(quantized_path, base_model=None):
    """The base model with every available quantized layer installed (in memory)."""
    quantized_path = Path(quantized_path)
    config_file = quantized_path / "quant_config.json"
    if not config_file.exists():
        raise UserInputError(f"{config_file} is missing: --quantized_path must be a folder "
                             f"written by quantize_finetune_llama")
    quant_config = read_json(config_file)
    model, tokenizer = load_base_model(base_model or quant_config["base_model"], dtype=torch.float32)
    num_layers = len(model.model.layers)
    records = load_layer_records(quantized_path, num_layers)
    if not records:
        raise UserInputError(f"no quantized layers in {quantized_path}; run quantize_finetune_llama")
    missing = [i for i in range(num_layers) if i not in records]
    if missing:
        glog.warning(f"layers {missing} have no quantized file and stay in full precision")
    for i, record in records.items():
        install_layer(model, i, record)
    return model, tokenizer, quant_config, missing


def export(model, tokenizer, quant_config, out_path, log):
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    base = {"codebook": quant_config["codebook"], "incoh_mode": quant_config["incoh_mode"]}
    config = model.config.to_dict()
    config["quip_params"] = quip_params_of(model, base)
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, tmp / WEIGHTS_FILE)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(log, tmp / "export_log.json")
    if out_path.exists():
        shutil.rmtree(out_path)
    tmp.rename(out_path)


def main(argv=None):
    args = build_parser().parse_args(argv)
    model, tokenizer, quant_config, missing = quantize_model(args.quantized_path, args.base_model)
    bpw = bits_per_weight(model, get_codebook(quant_config["codebook"]).bits)
    log = {"quantized_path": str(args.quantized_path), "fp_layers": missing, **bpw,
           "codebook": quant_config["codebook"], "incoh_mode": quant_config["incoh_mode"]}
    export(model, tokenizer, quant_config, args.hf_output_path, log)
    glog.info(f"exported {len(quantized_linears(model))} quantized linears "
              f"({bpw['quantized_weights']:,} weights, {bpw['bits_per_weight']} bits per weight) "
              f"-> {args.hf_output_path}")


if __name__ == "__main__":
    run_cli(main)
