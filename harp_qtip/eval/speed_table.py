"""Render eval_speed JSON files as one markdown table (the README's speed tables).

    python -m eval.speed_table results/speed/synthetic_llama2-7b_kernels.json \\
        results/speed/smollm2-135m_real.json

One row per timed model, in file order: the GPU (or CPU) and date of its run, the
model (an export directory by its name), the processor (fp, had, harp), tok/s,
ms per token (decode) or per forward, the weight bytes read per step, and the speed
relative to the first row of the same file (eval_speed's `ratio`: ratios only compare
models timed in one run).
"""
import argparse
from pathlib import PurePath

from lib.utils.errors import UserInputError, run_cli
from lib.utils.io import read_json

HEAD = ("GPU", "date", "model", "mode", "tok/s", "ms / step", "weights read / step", "x first row")


def model_label(row):
    """`synthetic:llama2-7b` as it is; a path by its last component."""
    label = row["model"]
    return label if row.get("synthetic") else PurePath(label).name


def byte_text(count):
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.0f} MB"


def load_rows(path):
    try:
        run = read_json(path)
        results, device, date = run["results"], run["device_name"], run["date"][:10]
    except FileNotFoundError:
        raise UserInputError(f"{path} does not exist; pass the --output JSON of eval.eval_speed")
    except (KeyError, TypeError, ValueError) as err:
        raise UserInputError(f"{path} is not an eval.eval_speed --output JSON ({err!r})")
    rows = []
    for result in results:
        step_ms = result.get("ms_per_token", result.get("ms_per_forward"))
        rows.append((device, date, model_label(result), result["mode"], f"{result['tok_per_s']:.1f}",
                     f"{step_ms:.2f}", byte_text(result["weight_bytes_per_step"]["total"]),
                     f"{result['ratio']:.2f}"))
    return rows


def table(paths):
    lines = ["| " + " | ".join(HEAD) + " |", "|---" * len(HEAD) + "|"]
    lines += ["| " + " | ".join(row) + " |" for path in paths for row in load_rows(path)]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="eval.eval_speed --output JSON files")
    print(table(p.parse_args(argv).files))


if __name__ == "__main__":
    run_cli(main)
