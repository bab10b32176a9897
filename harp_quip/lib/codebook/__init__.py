"""Codebook registry: `get_codebook(name, resid_scale_override)` returns the shared instance.

`CODEBOOKS` lists the valid names. Each codebook follows the contract in
`lib.codebook.base`; `codebook.config()` gives the kwargs that return it again.
"""
import functools
import math

from lib.codebook.e8p12 import E8P12
from lib.codebook.e8p12_rvq import E8P12RVQ3B, E8P12RVQ4B, ResidualE8P12
from lib.utils.errors import UserInputError

_CLASSES = {cls.name: cls for cls in (E8P12, E8P12RVQ3B, E8P12RVQ4B)}
CODEBOOKS = tuple(_CLASSES)


@functools.lru_cache(maxsize=None)
def _instance(name, resid_scale):
    cls = _CLASSES[name]
    if resid_scale is None:
        return cls()
    return cls(resid_scale, stage1=_instance(E8P12.name, None))


def get_codebook(name, resid_scale_override=-1.0):
    """The codebook called `name`, one shared instance per (name, effective resid scale)
    so device tables are cached once.

    `resid_scale_override` > 0 replaces the residual codebooks' `opt_resid_scale`
    (s in q = q1 + q2 / s); E8P12 ignores it.
    """
    if name not in _CLASSES:
        raise UserInputError(
            f"unknown codebook {name!r}; valid codebooks: {', '.join(CODEBOOKS)}")
    cls = _CLASSES[name]
    if not issubclass(cls, ResidualE8P12):
        return _instance(name, None)
    if not math.isfinite(resid_scale_override):
        raise UserInputError(
            f"resid_scale_override must be a finite number (<= 0 for the default), "
            f"got {resid_scale_override!r}")
    scale = resid_scale_override if resid_scale_override > 0 else cls.opt_resid_scale
    return _instance(name, float(scale))
