"""Puts harp_qtip (the folder holding `lib`) first on sys.path, so the tests import
this backend's `lib` from any working directory (pytest.ini does the same when pytest
runs from here), skips tests marked `gpu` without a CUDA device, and points the HYB
table cache ($HARP_QTIP_CACHE) at a fresh folder of the session."""
import os
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


@pytest.fixture(scope="session", autouse=True)
def hyb_table_cache(tmp_path_factory):
    """Tables built by the tests go to a temporary cache, never to ~/.cache."""
    folder = tmp_path_factory.mktemp("hyb_cache")
    old = os.environ.get("HARP_QTIP_CACHE")
    os.environ["HARP_QTIP_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("HARP_QTIP_CACHE", None)
    else:
        os.environ["HARP_QTIP_CACHE"] = old
