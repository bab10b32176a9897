"""Codebook registry: `get_codebook(name)` returns the shared instance.

`CODEBOOKS` lists the valid names. Each codebook follows the contract in
`lib.codebook.base`.
"""
import functools

from lib.codebook.e8p12 import E8P12
from lib.utils.errors import UserInputError

_CLASSES = {cls.name: cls for cls in (E8P12,)}
CODEBOOKS = tuple(_CLASSES)


@functools.lru_cache(maxsize=None)
def _instance(name):
    return _CLASSES[name]()


def get_codebook(name):
    """The codebook called `name` (one shared instance per name, so device tables are cached once)."""
    if name not in _CLASSES:
        raise UserInputError(
            f"unknown codebook {name!r}; valid codebooks: {', '.join(CODEBOOKS)}")
    return _instance(name)
