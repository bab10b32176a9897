"""Render eval_ppl JSON results as one markdown table (for the README).

    python -m eval.results_table "FP=results/fp_ppl.json" "had 2 bit=results/had_2bit_ppl.json"

One row per LABEL=FILE, one column per (dataset, seqlen) found in the files.
"""
import argparse

from lib.utils.errors import UserInputError, run_cli
from lib.utils.io import read_json


def table(rows):
    columns = sorted({(r["dataset"], r["seqlen"]) for _, result in rows for r in result["results"]})
    head = "| model | " + " | ".join(f"{d} ppl @ {s}" for d, s in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for label, result in rows:
        values = {(r["dataset"], r["seqlen"]): r for r in result["results"]}
        cells = [f"{values[c]['ppl']:.2f}" if c in values else "" for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("entries", nargs="+", help="LABEL=path/to/eval_ppl.json")
    args = p.parse_args(argv)
    rows = []
    for entry in args.entries:
        if "=" not in entry:
            raise UserInputError(f"{entry!r} is not LABEL=FILE")
        label, path = entry.split("=", 1)
        try:
            rows.append((label, read_json(path)))
        except FileNotFoundError as err:
            raise UserInputError(f"results file {path} does not exist") from err
    print(table(rows))


if __name__ == "__main__":
    run_cli(main)
