"""Render runs side by side as one markdown table (for the README and the scripts).

    python -m eval.results_table "FP=runs/x/results/fp_ppl.json" \\
        "had=runs/x/results/had_2bit_ppl.json:runs/x/had_2bit:runs/x/had_2bit_hf" ...

Each entry is LABEL=PPL_JSON[:QUANT_DIR[:EXPORT_DIR]]: perplexities from an eval_ppl
JSON (several joined by "+", e.g. the test and the validation runs); with QUANT_DIR the quantization time from its layer_*.json logs (sum over
layers, and the HARP fitting part); with EXPORT_DIR the bits per weight of its
export_log.json (codes + HARP storage).
"""
import argparse
from pathlib import Path

from lib.utils.errors import UserInputError, run_cli
from lib.utils.io import read_json


def quant_seconds(quant_dir):
    """(sum of layer seconds, sum of HARP fitting seconds) over the layer logs."""
    logs = [read_json(p) for p in sorted(Path(quant_dir).glob("layer_*.json"))]
    if not logs:
        raise UserInputError(f"no layer_*.json logs in {quant_dir}")
    total = sum(log["layer_seconds"] for log in logs)
    fit = sum(site.get("harp", {}).get("seconds", 0.0) for log in logs for site in log["sites"].values())
    return total, fit, len(logs)


def load_entry(entry):
    if "=" not in entry:
        raise UserInputError(f"{entry!r} is not LABEL=PPL_JSON[:QUANT_DIR[:EXPORT_DIR]]")
    label, spec = entry.split("=", 1)
    parts = spec.split(":")
    row = {"label": label, "ppl": []}
    for path in parts[0].split("+"):
        try:
            row["ppl"] += read_json(path)["results"]
        except FileNotFoundError as err:
            raise UserInputError(f"results file {path} does not exist") from err
    if len(parts) > 1 and parts[1]:
        row["seconds"] = quant_seconds(parts[1])
    if len(parts) > 2 and parts[2]:
        row["export"] = read_json(Path(parts[2]) / "export_log.json")
    return row


def _column(result):
    return result["dataset"], result.get("split", "test"), result["seqlen"]


def table(rows):
    columns = sorted({_column(r) for row in rows for r in row["ppl"]}, key=lambda c: (c[1], c[0], c[2]))
    head = ["model"] + [f"{d}{'' if sp == 'test' else ' (' + sp + ')'} ppl @ {s}" for d, sp, s in columns]
    with_time = any("seconds" in row for row in rows)
    with_bits = any("export" in row for row in rows)
    if with_time:
        head += ["quantize s (of it HARP fit)", "s per layer"]
    if with_bits:
        head += ["bits per weight (codes + HARP)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        values = {_column(r): r["ppl"] for r in row["ppl"]}
        cells = [row["label"]] + [f"{values[c]:.2f}" if c in values else "" for c in columns]
        if with_time:
            if "seconds" in row:
                total, fit, layers = row["seconds"]
                cells += [f"{total:.0f} ({fit:.0f})", f"{total / layers:.1f}"]
            else:
                cells += ["", ""]
        if with_bits:
            e = row.get("export")
            cells += [f"{e['bits_per_weight']:.4f} ({e['code_bits_per_weight']:.0f} + "
                      f"{e['harp_bits_per_weight']:.4f})" if e else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("entries", nargs="+", help="LABEL=PPL_JSON[:QUANT_DIR[:EXPORT_DIR]]")
    args = p.parse_args(argv)
    print(table([load_entry(entry) for entry in args.entries]))


if __name__ == "__main__":
    run_cli(main)
