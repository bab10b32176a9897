"""Codebook registry: `get_codebook(name, resid_scale_override)` returns the shared instance.

`CODEBOOKS` lists the valid names. Each codebook follows the contract in
`lib.codebook.base`; `codebook.config()` gives the kwargs that return it again.

The backend-neutral pipeline (quantize_finetune_llama, lib/algo) reaches the codebook
only through this module's registry functions, which every backend offers:

    add_codebook_arguments(parser)   the codebook's command-line flags
    CLI_DEFAULTS                     this backend's defaults of shared flags (none here)
    codebook_flags(args)             the parsed flags as a checked JSON-able dict
    default_codebook_flags()         that dict for the default codebook
    codebook_from_flags(flags)       the codebook those flags select
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


CLI_DEFAULTS = {}


def add_codebook_arguments(parser):
    """--codebook and --resid_scale_override."""
    parser.add_argument("--codebook", default="E8P12", help="E8P12 (2 bit), E8P12RVQ3B or E8P12RVQ4B")
    parser.add_argument("--resid_scale_override", type=float, default=-1.0,
                        help="RVQ codebooks: s in q = q1 + q2 / s; <= 0: the codebook's opt_resid_scale")


def codebook_from_flags(flags):
    """The codebook of a flags dict (`codebook_flags`, or a run's quant_config.json)."""
    return get_codebook(flags["codebook"], flags.get("resid_scale_override", -1.0))


def codebook_flags(args):
    """{"codebook", "resid_scale_override"} from parsed arguments; UserInputError if invalid."""
    flags = {"codebook": args.codebook, "resid_scale_override": args.resid_scale_override}
    codebook_from_flags(flags)
    return flags


def default_codebook_flags():
    return {"codebook": "E8P12", "resid_scale_override": -1.0}
