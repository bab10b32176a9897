"""QTIP codebook: computed codes (`get_code(decode_mode, tlut)`), the tail-biting
bitshift trellis quantizer (`BitshiftTrellis`; fact sheet sections 1-3) and, for the
pipeline, `TrellisCodebook` (the trellis on 16 x 16 tiles behind the codebook contract).

The registry functions every backend offers (the backend-neutral quantize driver and
lib/algo use nothing else):

    get_codebook(name="bitshift", L, K, V, td_x, td_y, decode_mode, tlut_bits, tlut_seed)
                                     the shared instance of a config (`codebook.config()`)
    add_codebook_arguments(parser)   --codebook bitshift, --L, --K, --V, --td_x, --td_y,
                                     --decode_mode, --tlut_bits
    CLI_DEFAULTS                     QTIP's defaults of shared flags (HARP fork, section 5
                                     of the HARP spec; no LDLQ tune passes)
    codebook_flags(args)             the parsed flags as a checked JSON-able dict
    default_codebook_flags()         that dict for the default codebook
    codebook_from_flags(flags)       the codebook those flags select
"""
import functools

from lib.codebook.bitshift import BitshiftTrellis
from lib.codebook.computed_codes import DECODE_MODES, Code, build_hyb_tlut, get_code
from lib.codebook.trellis import TrellisSpec
from lib.codebook.trellis_codebook import TrellisCodebook, check_config
from lib.utils.errors import UserInputError

__all__ = ["BitshiftTrellis", "Code", "DECODE_MODES", "TrellisCodebook", "TrellisSpec", "build_hyb_tlut",
           "get_code", "get_codebook", "add_codebook_arguments", "codebook_flags", "codebook_from_flags",
           "default_codebook_flags", "CLI_DEFAULTS", "CODEBOOKS"]

CODEBOOKS = (TrellisCodebook.name,)
DEFAULTS = {"L": 16, "K": 2, "V": 2, "td_x": 16, "td_y": 16, "decode_mode": "quantlut_sym", "tlut_bits": 9}
CLI_DEFAULTS = {"quip_tune_iters": 0, "harp_steps": 600, "harp_hbd_block": 16, "harp_chunk_size": 4096,
                "harp_q_recompute_every": 6, "ft_harp_lr": 0.0}


@functools.lru_cache(maxsize=None)
def _instance(L, K, V, td_x, td_y, decode_mode, tlut_bits, tlut_seed):
    return TrellisCodebook(L, K, V, td_x, td_y, decode_mode, tlut_bits, tlut_seed)


def get_codebook(name=TrellisCodebook.name, L=16, K=2, V=2, td_x=16, td_y=16, decode_mode="quantlut_sym",
                 tlut_bits=9, tlut_seed=0):
    """The trellis codebook of a config, one shared instance per config (its HYB table
    is built once per process, on first use)."""
    if name not in CODEBOOKS:
        raise UserInputError(f"unknown codebook {name!r}; this backend (QTIP) has: {', '.join(CODEBOOKS)}")
    check_config(L, K, V, td_x, td_y, decode_mode, tlut_bits)
    if decode_mode != "quantlut_sym":
        tlut_bits = tlut_seed = 0
    return _instance(L, K, V, td_x, td_y, decode_mode, tlut_bits, tlut_seed)


def add_codebook_arguments(parser):
    g = parser.add_argument_group("QTIP trellis quantizer")
    g.add_argument("--codebook", default=TrellisCodebook.name, help="bitshift (the only QTIP codebook)")
    g.add_argument("--L", type=int, default=DEFAULTS["L"], help="trellis state bits (Viterbi costs 2^L per step)")
    g.add_argument("--K", type=int, default=DEFAULTS["K"], help="bits per weight")
    g.add_argument("--V", type=int, default=DEFAULTS["V"], help="weights per trellis step (2 for quantlut_sym)")
    g.add_argument("--td_x", type=int, default=DEFAULTS["td_x"], help="tile rows (output dim)")
    g.add_argument("--td_y", type=int, default=DEFAULTS["td_y"], help="tile columns (input dim) = LDLQ block")
    g.add_argument("--decode_mode", default=DEFAULTS["decode_mode"],
                   help=f"computed code: {', '.join(DECODE_MODES)} (quantlut_sym = HYB)")
    g.add_argument("--tlut_bits", type=int, default=DEFAULTS["tlut_bits"],
                   help="HYB table size 2^tlut_bits (quantlut_sym; ignored by 1mad/3inst)")


def codebook_from_flags(flags):
    """The codebook of a flags dict (`codebook_flags`, or a run's quant_config.json)."""
    kwargs = {key: flags[key] for key in (*DEFAULTS, "tlut_seed")}
    return get_codebook(flags["codebook"], **kwargs)


def codebook_flags(args):
    """The trellis flags as a dict (the HYB table's seed is --seed, as in QTIP);
    UserInputError if they do not form a usable config."""
    flags = {"codebook": args.codebook, **{key: getattr(args, key) for key in DEFAULTS},
             "tlut_seed": args.seed}
    config = codebook_from_flags(flags).config()
    return {"codebook": config.pop("name"), **config}


def default_codebook_flags():
    return {"codebook": TrellisCodebook.name, **DEFAULTS, "tlut_seed": 0}
