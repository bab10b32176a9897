"""The HYB (quantlut_sym) table of a run, built once and kept on disk.

`build_hyb_tlut` (k-means on 2^20 Gaussian samples) takes about 1.5 min on a CPU at
tlut_bits = 9. Our tables are reproducible (a seeded generator), so the result is
cached in $HARP_QTIP_CACHE (default ~/.cache/harp_qtip) under a name holding every
input of the build, written atomically; worker processes and later runs load it. A
cached file that does not hold a valid table (shape, finite, population std
sqrt(15/16)) is rebuilt. Decoders never use this: they read the table stored with
each linear.
"""
import math
import os
from pathlib import Path

import glog
import torch

from lib.codebook.computed_codes import HYB_SAMPLES, HYB_TARGET_STD, build_hyb_tlut
from lib.utils.io import atomic_torch_save

CACHE_ENV = "HARP_QTIP_CACHE"


def cache_dir():
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "harp_qtip")


def cache_file(tlut_bits, seed, n_samples=HYB_SAMPLES):
    return cache_dir() / f"hyb_tlut_b{tlut_bits}_seed{seed}_n{n_samples}.pt"


def _valid(table, tlut_bits):
    return (torch.is_tensor(table) and table.dtype == torch.float32
            and table.shape == (1 << tlut_bits, 2) and bool(torch.isfinite(table).all())
            and math.isclose(table.double().std(unbiased=False).item(), HYB_TARGET_STD, rel_tol=1e-5))


def hyb_table(tlut_bits, seed, n_samples=HYB_SAMPLES):
    """The (2^tlut_bits, 2) float32 HYB table of `build_hyb_tlut(tlut_bits, seed,
    n_samples)`, from the disk cache when it holds it."""
    path = cache_file(tlut_bits, seed, n_samples)
    if path.is_file():
        try:
            table = torch.load(path, map_location="cpu", weights_only=True)
            if _valid(table, tlut_bits):
                return table
        except Exception as err:  # a damaged cache entry is rebuilt, never trusted
            glog.warning(f"{path} is unreadable ({type(err).__name__}); rebuilding the HYB table")
    glog.info(f"building the HYB table (k-means, 2^{tlut_bits} points, seed {seed}); cached in {path}")
    table = build_hyb_tlut(tlut_bits, seed, n_samples)
    try:
        atomic_torch_save(table, path)
    except OSError as err:
        glog.warning(f"could not cache the HYB table in {path} ({err}); set ${CACHE_ENV} to a writable folder")
    return table
