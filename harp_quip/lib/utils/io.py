"""Atomic file writes: a file either holds its complete new content or is untouched."""
import json
import os
from pathlib import Path

import torch

from lib.utils.errors import UserInputError


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


def check_or_write_config(path, config, what):
    """Record a run's settings at `path`, or refuse when the file there holds other
    settings (`what` names the folder's content in the error)."""
    path = Path(path)
    if not path.exists():
        atomic_write_json(config, path)
        return
    old = read_json(path)
    diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
    if diff:
        raise UserInputError(
            f"{path.parent} holds {what} made with other settings (differences {diff}); "
            f"use a new output folder or delete the old files")
