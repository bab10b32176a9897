"""Incoherence processors, selected by `--incoh_mode`.

`make_processor` draws a fresh processor for quantization; `empty_processor` builds
one with the right shapes to receive a saved state dict (export / loading).
"""
import torch

from lib.incoherence.base import IncoherenceProcessor
from lib.incoherence.rht import (HadamardRotation, KronRotation, make_had_processor,
                                 make_kron_processor)
from lib.utils.errors import UserInputError

_MAKERS = {"had": make_had_processor, "kron": make_kron_processor}
_ROTATIONS = {"had": HadamardRotation, "kron": KronRotation}
INCOH_MODES = tuple(_MAKERS)


def check_mode(mode):
    if mode not in _MAKERS:
        raise UserInputError(
            f"unknown --incoh_mode {mode!r}; choose one of {', '.join(INCOH_MODES)}")


def make_processor(mode, m, n, generator):
    check_mode(mode)
    return _MAKERS[mode](m, n, generator)


def empty_processor(config, m, n):
    mode = config["mode"]
    check_mode(mode)
    rotation = _ROTATIONS[mode]
    return IncoherenceProcessor(mode, torch.ones(n), torch.ones(m),
                                rotation(n, **config["right"]), rotation(m, **config["left"]))
