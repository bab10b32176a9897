"""Puts harp_qtip (the folder holding `lib`) first on sys.path, so the tests import
this backend's `lib` from any working directory (pytest.ini does the same when pytest
runs from here), and skips tests marked `gpu` without a CUDA device."""
import pathlib
import sys

import pytest
import torch

BACKEND_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if sys.path[0] != BACKEND_ROOT:
    sys.path.insert(0, BACKEND_ROOT)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
