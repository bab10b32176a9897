"""Atomic file writes: a file either holds its complete new content or is untouched.

A write goes to `.{name}.{pid}.tmp` next to the target and is renamed over it; a
process killed mid-write (kill -9, power loss) leaves only that temporary file, which
no reader accepts and `remove_stale_tmp` deletes on the next run.
"""
import json
import os
import re
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


_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(folder):
    """Delete the temporary files of atomic writes in `folder` whose writer process is
    gone (left by a killed run); returns their names. Files of live processes (e.g. a
    concurrent run writing into the same folder) are kept."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = _TMP_NAME.match(path.name)
        if match and path.is_file() and not _process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return sorted(removed)


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
