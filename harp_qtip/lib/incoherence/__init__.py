"""Incoherence processors, selected by `--incoh_mode`.

`make_processor` draws a fresh processor for quantization (signs SU then SV from the
generator; HARP then fits it); `empty_processor` builds one with the right shapes to
receive a saved state dict (export / loading).
"""
import torch

from lib.incoherence.base import IncoherenceProcessor
from lib.incoherence.harp import HARPProcessor, RotationOptions, StructuredRotation
from lib.incoherence.rht import (HadamardRotation, KronRotation, make_had_processor,
                                 make_kron_processor, random_signs)
from lib.utils.errors import UserInputError


def make_harp_processor(m, n, generator, rotation=None):
    """Random signs drawn exactly as in `had` (SU, then SV), HARP rotations at init."""
    SU = random_signs(n, generator)
    SV = random_signs(m, generator)
    return HARPProcessor(n, m, SU, SV, rotation or RotationOptions(), generator)


_FIXED_MAKERS = {"had": make_had_processor, "kron": make_kron_processor}
_ROTATIONS = {"had": HadamardRotation, "kron": KronRotation, "harp": StructuredRotation}
INCOH_MODES = tuple(_ROTATIONS)


def check_mode(mode):
    if mode not in _ROTATIONS:
        raise UserInputError(
            f"unknown --incoh_mode {mode!r}; choose one of {', '.join(INCOH_MODES)}")


def make_processor(mode, m, n, generator, harp_rotation=None):
    """A fresh processor for an m x n linear; `harp_rotation` (RotationOptions) is the
    structure of HARP's rotations (harp mode only)."""
    check_mode(mode)
    if mode == "harp":
        return make_harp_processor(m, n, generator, harp_rotation)
    return _FIXED_MAKERS[mode](m, n, generator)


def empty_processor(config, m, n):
    mode = config["mode"]
    check_mode(mode)
    rotation = _ROTATIONS[mode]
    return IncoherenceProcessor(mode, torch.ones(n), torch.ones(m),
                                rotation(n, **config["right"]), rotation(m, **config["left"]))
