"""Atomic file writes: a file either holds its complete new content or is untouched."""
import json
import os
from pathlib import Path

import torch


def _atomic(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj, path):
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    _atomic(path, write)


def read_json(path):
    with open(path) as f:
        return json.load(f)
