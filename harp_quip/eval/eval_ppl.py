"""Perplexity of a quantized export or a base model.

Protocol (upstream QuIP# eval/eval_ppl.py): the evaluation text is tokenized
once and cut into non-overlapping windows of `seqlen` tokens; each window is
one forward pass without KV cache or attention mask; its loss is the mean
token cross entropy over the seqlen - 1 shifted targets; perplexity is
exp(mean window loss).

    python -m eval.eval_ppl --hf_path smollm2-135m --seqlen 2048 --limit 8
"""
import argparse
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import glog
import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

from eval.cli_common import add_device_arguments, gpu_name, resolve_device, resolve_dtype
from lib.utils.data import COMPRESSED_SUFFIXES, EVAL_DATASETS, SOURCES, get_eval_windows
from lib.utils.errors import UserInputError, run_cli
from lib.utils.io import atomic_write_json
from lib.utils.model_loading import DEFAULT_MODEL, is_quantized_checkpoint, load_model_for_eval
from lib.utils.reuse import finished_output, model_fingerprint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.eval_ppl", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_path", default=DEFAULT_MODEL,
                        help="quantized export directory, or a base model: alias, "
                             ".gguf file, HF directory or hub id (default %(default)s)")
    parser.add_argument("--seqlen", type=int, nargs="+", default=[4096],
                        help="window length(s) in tokens; several values are each "
                             "evaluated (default %(default)s)")
    parser.add_argument("--datasets", default=None,
                        help=f"comma list of {', '.join(EVAL_DATASETS)} (default wikitext2)")
    parser.add_argument("--dataset_path", default=None,
                        help="evaluate this local text file (.txt or .txt.xz/.gz/.bz2) "
                             "instead; reported under the file stem")
    parser.add_argument("--split", default="test", choices=["test", "validation"],
                        help="test (report) or validation (choose settings: for wikitext2 the "
                             "calibration text, for hellaswag held-out topics)")
    parser.add_argument("--data_source", default="auto", choices=SOURCES,
                        help="hub, shipped local copy, or hub when reachable (default)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N windows (quick runs)")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="windows per forward pass (default %(default)s)")
    add_device_arguments(parser)
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    parser.add_argument("--skip_done", action="store_true",
                        help="reuse --output when it was written for the same model files and "
                             "flags instead of evaluating again (eval/reuse.py)")
    parser.add_argument("--no_use_cuda_graph", action="store_true",
                        help="accepted for compatibility with the upstream script; "
                             "perplexity evaluation here never uses CUDA graphs")
    parser.add_argument("--seed", type=int, default=0,
                        help="torch.manual_seed; the windows do not depend on it")
    return parser


def window_losses(model, batch: torch.LongTensor) -> torch.Tensor:
    """Mean next-token cross entropy (float32) of each window in the batch."""
    logits = model(batch, use_cache=False).logits[:, :-1].float()
    targets = batch[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             reduction="none")
    return losses.view(targets.shape).mean(dim=1)


@torch.inference_mode()
def perplexity(model, windows: torch.LongTensor, batch_size: int = 1,
               device: str = "cpu") -> dict:
    """Perplexity over (nwin, seqlen) windows: exp of the mean window loss.

    Returns {"ppl", "mean_nll", "windows", "window_nll" (per window)}.
    """
    losses = []
    running_sum = 0.0
    progress = tqdm(total=windows.shape[0], desc="perplexity", unit="win")
    for batch in windows.split(batch_size):
        losses.append(window_losses(model, batch.to(device)).cpu())
        running_sum += losses[-1].double().sum().item()
        progress.update(batch.shape[0])
        progress.set_postfix(ppl=f"{math.exp(running_sum / progress.n):.3f}")
    progress.close()
    window_nll = torch.cat(losses)
    mean_nll = window_nll.double().mean().item()
    return {"ppl": math.exp(mean_nll), "mean_nll": mean_nll,
            "windows": window_nll.numel(), "window_nll": window_nll.tolist()}


def _check_args(args):
    for seqlen in args.seqlen:
        if seqlen < 2:
            raise UserInputError(f"--seqlen must be at least 2 (one target), got {seqlen}")
    if args.limit is not None and args.limit < 1:
        raise UserInputError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise UserInputError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.dataset_path is not None and args.datasets is not None:
        raise UserInputError("--dataset_path replaces --datasets; pass only one of them")


def _dataset_names(args) -> list[str]:
    if args.dataset_path is not None:
        path = Path(args.dataset_path)
        if path.suffix in COMPRESSED_SUFFIXES:
            path = path.with_suffix("")
        return [path.stem]
    names = [name.strip() for name in (args.datasets or "wikitext2").split(",") if name.strip()]
    unknown = [name for name in names if name not in EVAL_DATASETS]
    if unknown or not names:
        raise UserInputError(
            f"unknown --datasets {', '.join(unknown) or '(empty)'}; choose from "
            f"{', '.join(EVAL_DATASETS)} or evaluate a file with --dataset_path")
    return names


def evaluate(model, tokenizer, name: str, seqlen: int, args) -> dict:
    """One results row: windows of `seqlen` from dataset `name` (or --dataset_path)."""
    windows, source = get_eval_windows(tokenizer, name, seqlen, source=args.data_source,
                                       dataset_path=args.dataset_path, split=args.split)
    total = windows.shape[0]
    if args.limit is not None:
        windows = windows[:args.limit]
    glog.info(f"{name} @ {seqlen}: {windows.shape[0]} of {total} windows from {source}")
    start = time.perf_counter()
    result = perplexity(model, windows, args.batch_size, args.device)
    seconds = time.perf_counter() - start
    glog.info(f"{name} @ {seqlen}: ppl {result['ppl']:.4f} ({seconds:.1f} s)")
    return {"dataset": name, "split": args.split, "source": source, "seqlen": seqlen,
            "windows": result["windows"],
            "limit": args.limit, "ppl": result["ppl"], "mean_nll": result["mean_nll"],
            "seconds": seconds}


def summary_table(results: list[dict]) -> str:
    lines = [f"{'dataset':<16} {'seqlen':>7} {'windows':>8} {'ppl':>12} {'seconds':>9}"]
    lines += [f"{row['dataset']:<16} {row['seqlen']:>7} {row['windows']:>8} "
              f"{row['ppl']:>12.4f} {row['seconds']:>9.1f}" for row in results]
    return "\n".join(lines)


def request_of(args, names, dtype) -> dict:
    """Everything the numbers depend on (eval/reuse.py)."""
    data_file = None
    if args.dataset_path is not None:
        stat = Path(args.dataset_path).stat()
        data_file = [str(Path(args.dataset_path).resolve()), stat.st_size, stat.st_mtime_ns]
    return {"hf_path": args.hf_path, "model": model_fingerprint(args.hf_path), "datasets": names,
            "dataset_file": data_file, "seqlen": args.seqlen, "split": args.split,
            "data_source": args.data_source, "limit": args.limit, "batch_size": args.batch_size,
            "device": args.device, "dtype": str(dtype).removeprefix("torch.")}


def main(argv=None):
    args = build_parser().parse_args(argv)
    _check_args(args)
    names = _dataset_names(args)
    args.device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, args.device)
    request = request_of(args, names, dtype)
    previous = finished_output(args.output, request) if args.skip_done else None
    if previous is not None:
        print(summary_table(previous["results"]))
        return previous["results"]
    torch.manual_seed(args.seed)
    model_kind = "quantized" if is_quantized_checkpoint(args.hf_path) else "base"
    model, tokenizer = load_model_for_eval(args.hf_path, args.device, dtype)
    results = [evaluate(model, tokenizer, name, seqlen, args)
               for name in names for seqlen in args.seqlen]
    print(summary_table(results))
    if args.output is not None:
        atomic_write_json({
            "hf_path": args.hf_path, "model_kind": model_kind, "device": args.device,
            "dtype": str(dtype).removeprefix("torch."), "request": request, "results": results,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "gpu": gpu_name(args.device)}, args.output)
        glog.info(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    run_cli(main)
