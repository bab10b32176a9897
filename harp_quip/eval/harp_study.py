"""Study HARP variants against the fixed RHT: quantize, evaluate, select, in one process.

Every (variant, seed) is quantized with `quantize_finetune_llama` into
RUN/<variant>/seed<k> (resumable by layer), installed in memory and evaluated at one
context length on every (dataset, split) of --eval (default: WikiText-2 test, the
out-of-domain HellaSwag text's test and validation halves, and the WikiText-2
validation text the Hessians were collected from). One JSON per run,
RUN/<variant>/seed<k>/study.json, written atomically: a killed study resumes where it
stopped, a second GPU call continues the first.

Variants come from a JSON file (default harp_scripts/study_variants.json):
{"name": {"family": str, "steps": int, "flags": [quantize flags], "note": str}, ...}
("{hessian_path}" in a flag is replaced by --hessian_path);
the variant "had" is the baseline every ratio is taken against (same seed, same
Hessians). Selection never looks at test texts: the selected variant is the
non-baseline one, run with every seed of the baseline, with the lowest mean ratio to
the RHT on --select_on (default the HellaSwag validation half).

    python -m eval.harp_study --hessian_path RUN/hessians --run_dir RUN/study \\
        --variants had,ref_200,guard_200 --seeds 0,1,2 --common_flags "--scale_override 0.9"

Writes RUN/study_summary.json (per variant: mean, min, max of each ppl and of its
ratio to the RHT, proxy geomean ratio, fit time) and, with --plot, a PNG of the ratio
in and out of domain against HARP steps, per family.
"""
import argparse
import math
import shlex
import time
from pathlib import Path

import glog
import torch

from eval.eval_ppl import perplexity
from lib.utils.data import get_eval_windows
from lib.utils.errors import UserInputError, run_cli
from lib.utils.io import atomic_write_json, read_json
from lib.utils.model_loading import DEFAULT_MODEL, default_device, load_base_model
from model.quantized_llama import set_dtype
from quantize_llama import hfize_llama, quantize_finetune_llama

BASELINE = "had"
DEFAULT_VARIANTS = Path(__file__).resolve().parents[1] / "harp_scripts" / "study_variants.json"
DEFAULT_EVAL = "wikitext2:test,hellaswag:test,hellaswag:validation,wikitext2:validation"


def build_parser():
    p = argparse.ArgumentParser(prog="python -m eval.harp_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", default=DEFAULT_MODEL)
    p.add_argument("--hessian_path", default=None, help="folder written by hessian_offline_llama")
    p.add_argument("--run_dir", required=True, help="folder for the runs and the summary")
    p.add_argument("--variants_file", default=str(DEFAULT_VARIANTS))
    p.add_argument("--variants", default=None, help="comma list of variant names (default: all in the file)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of --seed values")
    p.add_argument("--common_flags", default="", help="quantize flags shared by every run (one string)")
    p.add_argument("--eval", default=DEFAULT_EVAL, help="comma list of dataset:split")
    p.add_argument("--select_on", default="hellaswag:validation",
                   help="dataset:split the selection uses (never a test split)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--layer_batch", type=int, default=30, help="quantize_finetune_llama's --layer_batch")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows (quick runs)")
    p.add_argument("--device", default=None)
    p.add_argument("--time_budget", type=float, default=None,
                   help="stop starting new runs after this many seconds (the next call resumes)")
    p.add_argument("--plot", default=None, help="write the ratio-vs-steps PNG here")
    p.add_argument("--summary_only", action="store_true",
                   help="quantize and evaluate nothing: summarize the study.json files under --run_dir")
    return p


def parse_list(text, name):
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserInputError(f"{name} is empty")
    return items


def parse_eval(text):
    pairs = []
    for item in parse_list(text, "--eval"):
        dataset, _, split = item.partition(":")
        if split not in ("test", "validation"):
            raise UserInputError(f"--eval item {item!r} must be dataset:test or dataset:validation")
        pairs.append((dataset, split))
    return pairs


def load_variants(path, names):
    if not Path(path).is_file():
        raise UserInputError(f"--variants_file {path} does not exist")
    variants = read_json(path)
    if BASELINE not in variants:
        raise UserInputError(f"{path} must define the baseline variant {BASELINE!r}")
    names = list(variants) if names is None else parse_list(names, "--variants")
    unknown = [name for name in names if name not in variants]
    if unknown:
        raise UserInputError(f"unknown variant(s) {', '.join(unknown)}; {path} defines {', '.join(variants)}")
    if BASELINE not in names:
        names.insert(0, BASELINE)
    return {name: variants[name] for name in names}


def local_copy(model, tokenizer, folder):
    """The base model saved once as an HF folder: every run reloads it in ~1 s (a GGUF
    is dequantized on each load)."""
    if not (folder / "config.json").exists():
        tmp = folder.with_name(folder.name + ".partial")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    return folder


def run_path(run_dir, name, seed):
    return Path(run_dir) / name / f"seed{seed}"


def variant_flags(args, variant):
    """The variant's quantize flags with "{hessian_path}" resolved."""
    return [flag.replace("{hessian_path}", args.hessian_path) for flag in variant["flags"]]


def quantize(args, name, variant, seed):
    """Quantize (or resume) one run; returns its folder."""
    path = run_path(args.run_dir, name, seed)
    quantize_finetune_llama.main(
        ["--base_model", args.base_model, "--hessian_path", args.hessian_path, "--save_path", str(path),
         "--seed", str(seed), "--layer_batch", str(args.layer_batch)] + (["--device", args.device] if args.device else [])
        + shlex.split(args.common_flags) + variant_flags(args, variant))
    return path


def layer_stats(path):
    """{(layer, site): proxy loss}, quantize seconds, HARP fit seconds of a run folder."""
    proxy, total, fit = {}, 0.0, 0.0
    for log_file in sorted(path.glob("layer_*.json")):
        log = read_json(log_file)
        total += log["layer_seconds"]
        for site, stats in log["sites"].items():
            proxy[f"{log['layer_idx']}/{site}"] = stats["proxy_loss"]
            fit += stats.get("harp", {}).get("seconds", 0.0)
    return proxy, total, fit


def evaluate(model, windows, device):
    return {key: perplexity(model, w, batch_size=4, device=device)["ppl"] for key, w in windows.items()}


def run_one(args, name, variant, seed, windows, fp_ppl):
    out = run_path(args.run_dir, name, seed) / "study.json"
    if out.exists():
        return read_json(out)
    path = quantize(args, name, variant, seed)
    model, _, _, missing = hfize_llama.quantize_model(path, args.base_model)
    if missing:
        raise UserInputError(f"{path} lacks layers {missing}; rerun the study to finish it")
    model = set_dtype(model.to(args.device), torch.float16)
    ppl = evaluate(model, windows, args.device)
    proxy, seconds, fit_seconds = layer_stats(path)
    record = {"variant": name, "seed": seed, "family": variant.get("family", name),
              "steps": variant.get("steps", 0), "flags": variant_flags(args, variant), "common_flags": args.common_flags,
              "seqlen": args.seqlen, "ppl": ppl, "fp_ppl": fp_ppl, "proxy": proxy,
              "quantize_seconds": seconds, "harp_fit_seconds": fit_seconds}
    atomic_write_json(record, out)
    glog.info(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    return record


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def spread(values):
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(records, variants, select_on):
    """Per variant over its seeds: ppl and ratio to the same-seed RHT (mean/min/max), the
    geometric-mean proxy ratio over linears, fit time; plus the selection."""
    base = {r["seed"]: r for r in records if r["variant"] == BASELINE}
    summary = {}
    for name, variant in variants.items():
        runs = [r for r in records if r["variant"] == name and r["seed"] in base]
        if not runs:
            continue
        keys = runs[0]["ppl"].keys()
        entry = {"family": variant.get("family", name), "steps": variant.get("steps", 0),
                 "flags": variant["flags"], "note": variant.get("note", ""), "seeds": [r["seed"] for r in runs],
                 "ppl": {k: spread([r["ppl"][k] for r in runs]) for k in keys},
                 "ratio": {k: spread([r["ppl"][k] / base[r["seed"]]["ppl"][k] for r in runs]) for k in keys},
                 "proxy_geomean_ratio": spread([geomean([r["proxy"][s] / base[r["seed"]]["proxy"][s]
                                                         for s in r["proxy"]]) for r in runs]),
                 "linears_worse_than_rht": spread([sum(r["proxy"][s] > base[r["seed"]]["proxy"][s]
                                                       for s in r["proxy"]) for r in runs]),
                 "quantize_seconds": spread([r["quantize_seconds"] for r in runs]),
                 "harp_fit_seconds": spread([r["harp_fit_seconds"] for r in runs])}
        summary[name] = entry
    seeds = len(base)
    candidates = {name: entry["ratio"][select_on]["mean"] for name, entry in summary.items()
                  if name != BASELINE and len(entry["seeds"]) == seeds}
    selected = min(candidates, key=candidates.get) if candidates else None
    return {"baseline": BASELINE, "select_on": select_on, "selected": selected,
            "fp_ppl": records[0]["fp_ppl"] if records else None, "variants": summary}


def table(summary, keys):
    head = ["variant", "seeds"] + [f"{k} ppl (x RHT)" for k in keys] + ["proxy x RHT", "worse linears",
                                                                        "fit s"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    fp = summary["fp_ppl"] or {}
    if fp:
        lines.append("| FP | | " + " | ".join(f"{fp[k]:.2f}" for k in keys) + " | | | |")
    for name, e in summary["variants"].items():
        cells = [name + (" **(selected)**" if name == summary["selected"] else ""), str(len(e["seeds"]))]
        for k in keys:
            p, r = e["ppl"][k], e["ratio"][k]
            cells.append(f"{p['mean']:.2f} [{p['min']:.2f}, {p['max']:.2f}] ({r['mean']:.3f})")
        cells += [f"{e['proxy_geomean_ratio']['mean']:.3f}", f"{e['linears_worse_than_rht']['mean']:.1f}",
                  f"{e['harp_fit_seconds']['mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary, keys, output):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    families = {}
    for name, e in summary["variants"].items():
        if name != BASELINE:
            families.setdefault(e["family"], []).append(e)
    for ax, key in zip(axes[0], keys):
        for family, entries in sorted(families.items()):
            entries = sorted(entries, key=lambda e: e["steps"])
            steps = [e["steps"] for e in entries]
            mean = [e["ratio"][key]["mean"] for e in entries]
            err = [[m - e["ratio"][key]["min"] for m, e in zip(mean, entries)],
                   [e["ratio"][key]["max"] - m for m, e in zip(mean, entries)]]
            ax.errorbar(steps, mean, yerr=err, marker="o", capsize=3, label=family)
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="RHT (had)")
        ax.set_xscale("log")
        ticks = sorted({e["steps"] for entries in families.values() for e in entries})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("HARP steps")
        ax.set_ylabel("ppl / RHT ppl (same seed)")
        ax.set_title(key)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.device = args.device or default_device()
    seeds = [int(s) for s in parse_list(args.seeds, "--seeds")]
    pairs = parse_eval(args.eval)
    keys = [f"{d}:{s}" for d, s in pairs]
    if not args.summary_only and args.hessian_path is None:
        raise UserInputError("--hessian_path is required (or pass --summary_only)")
    if args.select_on not in keys or args.select_on.endswith(":test"):
        raise UserInputError(f"--select_on {args.select_on} must be a validation item of --eval")
    variants = load_variants(args.variants_file, args.variants)
    if not args.summary_only and not Path(args.hessian_path).is_dir():
        raise UserInputError(f"--hessian_path {args.hessian_path} does not exist; run hessian_offline_llama")
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    records = finished_records(args, variants, seeds) if args.summary_only else run_all(args, variants, seeds, pairs)
    summary = summarize(records, variants, args.select_on)
    atomic_write_json(summary, Path(args.run_dir) / "study_summary.json")
    text = table(summary, keys)
    (Path(args.run_dir) / "study_table.md").write_text(text + "\n")
    print(text)
    if args.plot:
        plot(summary, [k for k in keys if k.endswith(":test")], args.plot)
    return summary


def finished_records(args, variants, seeds):
    """The study.json of every (variant, seed) already evaluated under --run_dir."""
    paths = [run_path(args.run_dir, name, seed) / "study.json" for seed in seeds for name in variants]
    records = [read_json(path) for path in paths if path.exists()]
    if not records:
        raise UserInputError(f"no study.json under {args.run_dir} for these variants and seeds")
    return records


def run_all(args, variants, seeds, pairs):
    """Quantize and evaluate every (variant, seed) not done yet (seed-major order)."""
    keys = [f"{d}:{s}" for d, s in pairs]
    fp_file = Path(args.run_dir) / "fp_ppl.json"
    base, tokenizer = load_base_model(args.base_model)
    args.base_model = str(local_copy(base, tokenizer, Path(args.run_dir) / "base_model"))
    windows = {f"{d}:{s}": get_eval_windows(tokenizer, d, args.seqlen, source="local", split=s)[0][:args.limit]
               for d, s in pairs}
    if fp_file.exists() and set(read_json(fp_file)) == set(keys):
        fp_ppl = read_json(fp_file)
    else:
        fp_ppl = evaluate(base.to(args.device).half(), windows, args.device)
        atomic_write_json(fp_ppl, fp_file)
    del base

    start = time.time()
    records = []
    for seed in seeds:
        for name, variant in variants.items():
            done = (run_path(args.run_dir, name, seed) / "study.json").exists()
            if not done and args.time_budget is not None and time.time() - start > args.time_budget:
                glog.warning(f"time budget spent; rerun to continue with {name} seed {seed}")
                continue
            records.append(run_one(args, name, variant, seed, windows, fp_ppl))
    return records


if __name__ == "__main__":
    run_cli(main)
