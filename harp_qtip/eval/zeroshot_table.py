"""Zero-shot results of several eval_zeroshot JSONs side by side, as one markdown table.

    python -m eval.zeroshot_table FP=fp_zeroshot.json "had 2 bit=had_zeroshot.json" ...

One column per (task, metric) found in any file, plus the mean acc over the tasks.
"""
import argparse

from lib.utils.errors import UserInputError, run_cli
from lib.utils.io import read_json


def load_entry(entry):
    label, sep, path = entry.partition("=")
    if not sep:
        raise UserInputError(f"{entry!r} is not LABEL=ZEROSHOT_JSON")
    try:
        rows = read_json(path)["results"]
    except FileNotFoundError as err:
        raise UserInputError(f"results file {path} does not exist") from err
    return label, {(r["task"], r["metric"]): r for r in rows if r["filter"] == "none"}


def table(entries):
    columns = sorted({key for _, rows in entries for key in rows})
    head = ["model"] + [f"{task} {metric}" for task, metric in columns] + ["mean acc"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, rows in entries:
        cells = [label] + [f"{100 * rows[c]['value']:.1f} ± {100 * (rows[c]['stderr'] or 0):.1f}"
                           if c in rows else "" for c in columns]
        accs = [r["value"] for (_, metric), r in rows.items() if metric == "acc"]
        cells.append(f"{100 * sum(accs) / len(accs):.1f}" if accs else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.zeroshot_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("entries", nargs="+", help="LABEL=ZEROSHOT_JSON")
    args = p.parse_args(argv)
    text = table([load_entry(entry) for entry in args.entries])
    print(text)
    return text


if __name__ == "__main__":
    run_cli(main)
