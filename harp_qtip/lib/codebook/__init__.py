"""QTIP codebook: computed codes (`get_code(decode_mode, tlut)`) and the tail-biting
bitshift trellis quantizer (`BitshiftTrellis`); see the fact sheet's sections 1-3."""
from lib.codebook.bitshift import BitshiftTrellis
from lib.codebook.computed_codes import DECODE_MODES, Code, build_hyb_tlut, get_code
from lib.codebook.trellis import TrellisSpec

__all__ = ["BitshiftTrellis", "Code", "DECODE_MODES", "TrellisSpec", "build_hyb_tlut", "get_code"]
