"""Compare the tensor files of two runs, e.g. 1 and 2 torchrun processes.

    python -m eval.compare_runs RUN_A/hessians RUN_B/hessians --output cmp.json
    python -m eval.compare_runs RUN_A/had_2bit RUN_B/had_2bit

Every `*.pt` file below A (Hessians, held-out Hessians, quantized layers) is compared
with the file of the same relative path below B: bit-identical or not, the largest
difference of a tensor relative to its largest entry, and for layers whether the
codes (`Qidxs`) are identical.
"""
import argparse
from pathlib import Path

import torch

from lib.utils.errors import UserInputError, run_cli
from lib.utils.io import atomic_write_json


def tensors(path):
    """Every tensor of a file, by a flat key."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)

    walk("", torch.load(path, map_location="cpu", weights_only=True))
    return flat


def compare_files(a, b):
    """{identical, max_rel_diff, codes_identical} of two tensor files (same keys required)."""
    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys():
        raise UserInputError(f"{a} and {b} hold different tensors: they are not outputs of the same stage")
    identical, worst, codes = True, 0.0, True
    for key in ta:
        x, y = ta[key], tb[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            raise UserInputError(f"{key} has shape/dtype {tuple(x.shape)}/{x.dtype} in {a} but "
                                 f"{tuple(y.shape)}/{y.dtype} in {b}")
        same = torch.equal(x, y)
        identical &= same
        if key.endswith("Qidxs"):
            codes &= same
        if not same and x.is_floating_point():
            scale = x.abs().max().item() or 1.0
            worst = max(worst, (x.double() - y.double()).abs().max().item() / scale)
    return {"identical": identical, "max_rel_diff": worst, "codes_identical": codes}


def compare_folders(a, b):
    a, b = Path(a), Path(b)
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*.pt"))
    if not names:
        raise UserInputError(f"{a} holds no .pt files; pass a Hessian or quantized-layer folder")
    missing = [name for name in names if not (b / name).exists()]
    if missing:
        raise UserInputError(f"{len(missing)} file(s) of {a} are missing in {b}, e.g. {missing[0]}")
    files = {name: compare_files(a / name, b / name) for name in names}
    return {"a": str(a), "b": str(b), "files": len(files),
            "identical_files": sum(f["identical"] for f in files.values()),
            "files_with_other_codes": sorted(n for n, f in files.items() if not f["codes_identical"]),
            "max_rel_diff": max(f["max_rel_diff"] for f in files.values()), "per_file": files}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--output", default=None, help="JSON of the comparison")
    args = p.parse_args(argv)
    result = compare_folders(args.a, args.b)
    print(f"{result['identical_files']} of {result['files']} files bit-identical, largest difference "
          f"{result['max_rel_diff']:.3g} of a tensor's largest entry, "
          f"{len(result['files_with_other_codes'])} file(s) with other codes")
    if args.output:
        atomic_write_json(result, args.output)
    return result


if __name__ == "__main__":
    run_cli(main)
