"""Zero-shot accuracy of a quantized export or a base model, through lm-evaluation-harness.

Protocol: lm-eval's own task definitions and scoring (`lm_eval.simple_evaluate`)
on our already-loaded model, wrapped in lm-eval's HFLM. A multiple-choice task
scores each choice as a continuation of the query: acc picks the choice with
the highest log-likelihood, acc_norm the highest log-likelihood per character
of the choice; stderr is the standard error of the mean over the evaluated
documents.

The default tasks are the HARP paper's (arc_challenge, arc_easy, piqa,
winogrande; 0-shot); lm-eval downloads their data from the Hugging Face hub.

Offline tasks (no hub; data shipped in harp_data, task definitions in
eval/tasks/*.yaml, scored exactly like the lm-eval task of the same name
without "_offline"):
  arc_challenge_offline  ARC-Challenge, VALIDATION split (299; lm-eval's
                         arc_challenge uses the test split, 1,172)
  arc_easy_offline       ARC-Easy, VALIDATION split (570; lm-eval's arc_easy
                         uses the test split, 2,376)
  piqa_offline           PIQA validation (1,838), as lm-eval's piqa
  winogrande_offline     WinoGrande xl validation (1,267), as lm-eval's winogrande
  hellaswag_offline      HellaSwag validation (10,042), as lm-eval's hellaswag
The first four are the offline stand-in for the paper's tasks; the ARC numbers
are on a different split than the hub tasks and not directly comparable.

    python -m eval.eval_zeroshot --hf_path smollm2-135m --limit 200 \\
        --tasks arc_challenge_offline,arc_easy_offline,piqa_offline,winogrande_offline
"""
import argparse
import importlib.metadata
import time
from datetime import datetime, timezone
from pathlib import Path

import glog
import torch
import transformers
from packaging import version

from eval.cli_common import add_device_arguments, gpu_name, resolve_device, resolve_dtype
from lib.utils.errors import UserInputError, run_cli
from lib.utils.io import atomic_write_json
from lib.utils.model_loading import DEFAULT_MODEL, is_quantized_checkpoint, load_model_for_eval
from lib.utils.reuse import finished_output, model_fingerprint

DEFAULT_TASKS = "arc_challenge,arc_easy,piqa,winogrande"
# The paper's tasks from the shipped data (ARC on its validation split, see above).
OFFLINE_PAPER_TASKS = "arc_challenge_offline,arc_easy_offline,piqa_offline,winogrande_offline"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# Our task YAMLs are named after their task.
OFFLINE_TASKS = tuple(sorted(path.stem for path in TASKS_DIR.glob("*.yaml")))
MIN_LM_EVAL = "0.4.10"
LM_EVAL_PIP = f'pip install "lm-eval>={MIN_LM_EVAL}"'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.eval_zeroshot", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_path", default=DEFAULT_MODEL,
                        help="quantized export directory, or a base model: alias, "
                             ".gguf file, HF directory or hub id (default %(default)s)")
    parser.add_argument("--tasks", default=DEFAULT_TASKS,
                        help="comma list of lm-eval task names (default %(default)s, from "
                             f"the hub); offline: {', '.join(OFFLINE_TASKS)}; the paper's "
                             f"tasks offline: {OFFLINE_PAPER_TASKS} (ARC on its validation "
                             "split, lm-eval's arc_* use test)")
    parser.add_argument("--num_fewshot", type=int, default=0,
                        help="in-context examples per question (default %(default)s)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N documents of each task (quick runs)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="requests per forward pass (default %(default)s)")
    add_device_arguments(parser)
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    parser.add_argument("--skip_done", action="store_true",
                        help="reuse --output when it was written for the same model files and "
                             "flags instead of evaluating again (eval/reuse.py)")
    return parser


def _check_args(args):
    if args.limit is not None and args.limit < 1:
        raise UserInputError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise UserInputError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.num_fewshot < 0:
        raise UserInputError(f"--num_fewshot must be 0 or more, got {args.num_fewshot}")


def parse_tasks(text: str) -> list[str]:
    """Task names of a comma list, in order, without repeats."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise UserInputError(
            f"--tasks is empty; pass lm-eval task names such as {DEFAULT_TASKS}")
    return names


def import_lm_eval():
    """The lm_eval package, or UserInputError when missing or too old.

    The offline tasks need `custom_dataset` (lm-eval >= 0.4.9); 0.4.9 itself
    does not import with transformers 5.
    """
    try:
        import lm_eval
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError as err:
        raise UserInputError(
            f"zero-shot evaluation needs lm-evaluation-harness ({err}); "
            f"install it with: {LM_EVAL_PIP}") from err
    installed = importlib.metadata.version("lm-eval")
    if version.parse(installed) < version.parse(MIN_LM_EVAL):
        raise UserInputError(
            f"lm-eval {installed} is too old (need >= {MIN_LM_EVAL}); "
            f"upgrade with: {LM_EVAL_PIP}")
    return lm_eval


def task_manager(lm_eval, names: list[str]):
    """An lm-eval TaskManager that knows our offline tasks and checks `names`.

    lm-eval's own task index (~15 s to build on a small CPU) is only scanned
    when some requested task is not one of ours.
    """
    include_defaults = not set(names) <= set(OFFLINE_TASKS)
    manager = lm_eval.tasks.TaskManager(include_path=str(TASKS_DIR),
                                        include_defaults=include_defaults)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise UserInputError(
            f"unknown lm-eval task(s) {', '.join(unknown)}; list the known ones with "
            f"`lm-eval ls tasks`, or use the offline task(s) {', '.join(OFFLINE_TASKS)}")
    return manager


def run_harness(lm_eval, manager, model, tokenizer, names: list[str], args) -> dict:
    """lm-eval's results dict for `names` on the loaded model.

    Task data are loaded inside simple_evaluate; a ConnectionError there means a
    task needs the hub (the `datasets` offline mode raises it at once).
    """
    lm = lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer,
                                         batch_size=args.batch_size)
    try:
        return lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=args.num_fewshot, limit=args.limit,
            task_manager=manager, log_samples=False)
    except ConnectionError as err:
        hub_tasks = [name for name in names if name not in OFFLINE_TASKS]
        raise UserInputError(
            f"cannot load the data of lm-eval task(s) {', '.join(hub_tasks)} from the "
            f"Hugging Face hub ({err}); they need hub access (connect, and unset "
            f"HF_DATASETS_OFFLINE/HF_HUB_OFFLINE if set), or evaluate offline with "
            f"--tasks {','.join(OFFLINE_TASKS)}") from err


def _stderr(value) -> float | None:
    """lm-eval reports "N/A" when a stderr cannot be computed (e.g. one document)."""
    return float(value) if isinstance(value, (int, float)) else None


def metric_rows(results: dict) -> list[dict]:
    """One row per (task, metric, filter) of lm-eval's results["results"]."""
    rows = []
    for task, metrics in results["results"].items():
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr"):
                continue
            rows.append({"task": task, "metric": metric, "filter": filter_name,
                         "value": float(value), "samples": samples,
                         "stderr": _stderr(metrics.get(f"{metric}_stderr,{filter_name}"))})
    return rows


def summary_table(rows: list[dict]) -> str:
    width = max([20] + [len(row["task"]) for row in rows])
    lines = [f"{'task':<{width}} {'metric':<14} {'value':>8} {'stderr':>8} {'samples':>8}"]
    for row in rows:
        metric = row["metric"] if row["filter"] == "none" else f"{row['metric']},{row['filter']}"
        stderr = "n/a" if row["stderr"] is None else f"{row['stderr']:.4f}"
        samples = "" if row["samples"] is None else row["samples"]
        lines.append(f"{row['task']:<{width}} {metric:<14} {row['value']:>8.4f} {stderr:>8} "
                     f"{samples:>8}")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    _check_args(args)
    names = parse_tasks(args.tasks)
    lm_eval = import_lm_eval()
    manager = task_manager(lm_eval, names)
    args.device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, args.device)
    request = {"hf_path": args.hf_path, "model": model_fingerprint(args.hf_path), "tasks": names,
               "num_fewshot": args.num_fewshot, "limit": args.limit, "batch_size": args.batch_size,
               "device": args.device, "dtype": str(dtype).removeprefix("torch.")}
    previous = finished_output(args.output, request) if args.skip_done else None
    if previous is not None:
        print(summary_table(previous["results"]))
        return previous["results"]
    model_kind = "quantized" if is_quantized_checkpoint(args.hf_path) else "base"
    model, tokenizer = load_model_for_eval(args.hf_path, args.device, dtype)
    start = time.perf_counter()
    results = run_harness(lm_eval, manager, model, tokenizer, names, args)
    seconds = time.perf_counter() - start
    rows = metric_rows(results)
    glog.info(f"{', '.join(names)}: {seconds:.1f} s")
    print(summary_table(rows))
    if args.output is not None:
        atomic_write_json({
            "hf_path": args.hf_path, "model_kind": model_kind, "device": args.device,
            "dtype": str(dtype).removeprefix("torch."), "tasks": names,
            "num_fewshot": args.num_fewshot, "limit": args.limit,
            "batch_size": args.batch_size, "request": request, "results": rows,
            "task_versions": results.get("versions", {}), "seconds": seconds,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": importlib.metadata.version("lm-eval"),
            "gpu": gpu_name(args.device)}, args.output)
        glog.info(f"wrote {args.output}")
    return rows


if __name__ == "__main__":
    run_cli(main)
