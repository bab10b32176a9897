"""Assemble quantized layers into a model directory that loads as a runnable Llama.

Reads --quantized_path (quant_config.json + layer_{i:03d}.pt from
quantize_finetune_llama), takes embeddings, final norm and lm_head from the base
model, and writes --hf_output_path: config.json (Llama config + quip_params),
model.safetensors, tokenizer files, export_log.json (bits per weight). Layers with
no quantized file stay in full precision (as after `--layer_idx`), with a warning.
The directory is written next to its target and renamed into place when complete.
With --skip_done an export made from the same quantized files and flags is kept
(lib/utils/reuse.py).
"""
import argparse
import json
import shutil
from pathlib import Path

import glog
import torch
from safetensors.torch import save_file

from lib.incoherence.harp import StructuredRotation
from lib.utils.errors import UserInputError, run_cli
from lib.utils.hessian import SITES
from lib.utils.io import atomic_write_json, read_json
from lib.utils.model_loading import is_quantized_checkpoint, load_base_model, parse_dtype
from lib.utils.reuse import finished_output, folder_fingerprint
from model.decoder import NORMS
from model.quantized_llama import WEIGHTS_FILE, install_layer, quantized_linears, quip_params_of
from quantize_llama.layers import layer_file


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantized_path", required=True, help="folder written by quantize_finetune_llama")
    p.add_argument("--hf_output_path", required=True, help="output model directory")
    p.add_argument("--base_model", default=None, help="default: the one recorded in quant_config.json")
    p.add_argument("--load_dtype", default="float32",
                   help="dtype of the non-quantized parts (embeddings, norms, lm_head) in the export")
    p.add_argument("--quantize_harp_theta", action="store_true",
                   help="store HARP's skew parameters as int8 with one fp16 scale per block")
    p.add_argument("--skip_done", action="store_true",
                   help="keep an existing export made from the same quantized files and flags")
    return p


def load_layer_records(quantized_path, num_layers):
    records = {}
    for i in range(num_layers):
        path = layer_file(quantized_path, i, "pt")
        if not path.exists():
            continue
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
            complete = set(record["linears"]) == set(SITES) and set(record["norms"]) == set(NORMS)
        except Exception as err:
            raise UserInputError(f"{path} is unreadable ({type(err).__name__}: {err}); rerun "
                                 f"quantize_finetune_llama with the same flags to redo that layer "
                                 f"(it redoes damaged layer files)") from err
        if not complete:
            raise UserInputError(f"{path} is not a complete quantized layer (sites "
                                 f"{sorted(record['linears'])}); rerun quantize_finetune_llama "
                                 f"with the same flags to redo that layer")
        records[i] = record
    return records


def bits_per_weight(model):
    """(code bits + HARP storage bits) / quantized weights, code bits = each linear's
    codebook's nominal bits per weight; SU, SV, norms (and QTIP's table) not counted."""
    linears = quantized_linears(model)
    weights = sum(lin.in_features * lin.out_features for lin in linears)
    code_bits = sum(lin.in_features * lin.out_features * lin.codebook.bits for lin in linears)
    harp_bits = sum(lin.processor.storage_bits() for lin in linears)
    return {"quantized_weights": weights, "code_bits": code_bits, "harp_bits": harp_bits,
            "code_bits_per_weight": code_bits / weights if weights else None,
            "harp_bits_per_weight": harp_bits / weights if weights else None,
            "bits_per_weight": (code_bits + harp_bits) / weights if weights else None}


def quantize_harp_theta(model):
    """int8 theta for every HARP rotation (see StructuredRotation.quantize_theta_)."""
    for linear in quantized_linears(model):
        for rotation in (linear.processor.right, linear.processor.left):
            if isinstance(rotation, StructuredRotation):
                rotation.quantize_theta_()
        linear.freeze()


def quantize_model(quantized_path, base_model=None, dtype=torch.float32):
    """The base model with every available quantized layer installed (in memory)."""
    quantized_path = Path(quantized_path)
    config_file = quantized_path / "quant_config.json"
    if not config_file.exists():
        raise UserInputError(f"{config_file} is missing: --quantized_path must be a folder "
                             f"written by quantize_finetune_llama")
    quant_config = read_json(config_file)
    model, tokenizer = load_base_model(base_model or quant_config["base_model"], dtype=dtype)
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


def check_output_path(out_path, inputs=()):
    """Before any work: `out_path` may be replaced as a whole, so it must not hold an
    input and, if it exists, must be empty or an earlier export (never another folder)."""
    out_path = Path(out_path).resolve()
    for path in inputs:
        path = Path(path).resolve()
        if path == out_path or out_path in path.parents:
            raise UserInputError(f"--hf_output_path {out_path} would replace the input {path}; "
                                 f"choose a separate output folder")
    if out_path.exists():
        if not out_path.is_dir() or (any(out_path.iterdir()) and not _is_export(out_path)):
            raise UserInputError(f"--hf_output_path {out_path} exists and is not an earlier quantized "
                                 f"export (it would be replaced as a whole); choose another path or "
                                 f"delete it yourself")


def _is_export(folder):
    try:
        return (folder / "export_log.json").is_file() or is_quantized_checkpoint(folder)
    except UserInputError:
        return False


def export(model, tokenizer, quant_config, out_path, log):
    """Write the directory as `<out>.partial`, then swap it in: `<out>` is renamed to
    `<out>.old`, `<out>.partial` to `<out>`, and `<out>.old` deleted. A process killed at
    any point leaves `<out>` either complete (old or new) or absent (between the two
    renames, with the old export intact in `<out>.old`), never half written; the next
    run puts such an old export back first and removes the other leftovers."""
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".partial")
    old = out_path.with_name(out_path.name + ".old")
    if old.exists() and not out_path.exists():
        old.rename(out_path)
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
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
        out_path.rename(old)
    tmp.rename(out_path)
    if old.exists():
        shutil.rmtree(old)


def export_request(args):
    """What the export depends on (lib/utils/reuse.py); the quantized folder's files are
    fingerprinted when it exists (quantize_model names a missing one)."""
    folder = Path(args.quantized_path)
    return {"quantized_files": folder_fingerprint(folder) if folder.is_dir() else None,
            "base_model": args.base_model, "load_dtype": args.load_dtype,
            "quantize_harp_theta": args.quantize_harp_theta}


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_output_path(args.hf_output_path, [args.quantized_path])
    request = export_request(args)
    if args.skip_done and finished_output(Path(args.hf_output_path) / "export_log.json", request):
        return
    model, tokenizer, quant_config, missing = quantize_model(args.quantized_path, args.base_model,
                                                             parse_dtype(args.load_dtype))
    if args.quantize_harp_theta:
        quantize_harp_theta(model)
    bpw = bits_per_weight(model)
    log = {"quantized_path": str(args.quantized_path), "fp_layers": missing, **bpw,
           "codebook": quant_config["codebook"], "incoh_mode": quant_config["incoh_mode"],
           "quantize_harp_theta": args.quantize_harp_theta, "request": request}
    export(model, tokenizer, quant_config, args.hf_output_path, log)
    glog.info(f"exported {len(quantized_linears(model))} quantized linears, "
              f"{bpw['quantized_weights']:,} weights: {bpw['code_bits_per_weight']:.4f} code bits + "
              f"{bpw['harp_bits_per_weight']:.4f} HARP bits ({bpw['harp_bits']:,}) = "
              f"{bpw['bits_per_weight']:.4f} bits per weight -> {args.hf_output_path}")


if __name__ == "__main__":
    run_cli(main)
