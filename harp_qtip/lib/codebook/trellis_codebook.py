"""QTIP's trellis quantizer behind the pipeline's codebook contract (harp_quip's
lib/codebook/base.py lists it), so the mirrored LDLQ, HARP target, QuantizedLinear and
CLIs run it unchanged.

Layout (fact sheet section 4). A linear W (m x n) is cut into td_x x td_y tiles (16 x 16
= 256 weights); tile (i, j) holds rows i td_x .. and columns j td_y ..; its trellis
sequence is the tile read row-major (position td_y r + c: r along the output dim, c
along the input dim). Codes: one tail-biting bitstream per tile, packed into
T K / 16 int16 words, tile (i, j) at row i (n / td_y) + j of an (m/td_x * n/td_y, words)
tensor. We keep this row-major order for every config: the reference's kernel
permutation of the 256 positions (and its kernel word layout) is not applied.

Block LDLQ uses blocks of td_y columns: a block of m rows is m / td_x tiles, all
quantized in one batched Viterbi call (`chunk_rows` tiles at a time). Scale: the
weights are scaled to RMS = RMS(code over all 2^L states) * scale_override (<= 0
counts as 1).

The HYB code (quantlut_sym) needs its table `tlut`: a codebook from `get_codebook`
builds it lazily (k-means, disk-cached, lib/codebook/hyb_table.py) when it first
quantizes; each quantized linear stores it (buffer `tlut`), and decoding goes through
`bind(tlut=...)`, i.e. always uses the stored table.
"""
import functools

import torch

from lib.codebook.bitshift import BitshiftTrellis
from lib.codebook.computed_codes import DECODE_MODES, get_code
from lib.codebook.hyb_table import hyb_table
from lib.codebook.trellis import TrellisSpec, unpack
from lib.utils.errors import UserInputError

CODE_V = {"1mad": 1, "3inst": 1, "quantlut_sym": 2}
MAX_L = 20


def check_config(L, K, V, td_x, td_y, decode_mode, tlut_bits):
    """UserInputError naming the flag unless the trellis config is usable."""
    for name, value in (("L", L), ("K", K), ("V", V), ("td_x", td_x), ("td_y", td_y), ("tlut_bits", tlut_bits)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserInputError(f"--{name} must be an integer, got {value!r}")
    if decode_mode not in DECODE_MODES:
        raise UserInputError(f"unknown --decode_mode {decode_mode!r}; choose one of {', '.join(DECODE_MODES)}")
    if V != CODE_V[decode_mode]:
        raise UserInputError(f"--decode_mode {decode_mode} emits {CODE_V[decode_mode]} weight(s) per trellis "
                             f"state: pass --V {CODE_V[decode_mode]} (got --V {V})")
    if min(K, td_x, td_y) < 1:
        raise UserInputError(f"--K, --td_x and --td_y must be >= 1, got {K}, {td_x}, {td_y}")
    if not K * V < L <= MAX_L:
        raise UserInputError(f"--L must be in ({K * V}, {MAX_L}]: a step shifts in K * V = {K * V} of the L "
                             f"state bits and Viterbi costs 2^L per step; got --L {L}")
    if decode_mode == "quantlut_sym" and not 1 <= tlut_bits <= 15:
        raise UserInputError(f"--tlut_bits must be in [1, 15] for quantlut_sym (9 in QTIP), got {tlut_bits}")
    TrellisSpec(L, K, V, td_x * td_y)


class TrellisCodebook:
    """The bitshift trellis on td_x x td_y tiles, as a pipeline codebook."""

    name = "bitshift"
    storage_dtype = torch.int16

    def __init__(self, L=16, K=2, V=2, td_x=16, td_y=16, decode_mode="quantlut_sym", tlut_bits=9,
                 tlut_seed=0, tlut=None):
        check_config(L, K, V, td_x, td_y, decode_mode, tlut_bits)
        self.L, self.K, self.V, self.td_x, self.td_y = L, K, V, td_x, td_y
        self.decode_mode = decode_mode
        self.uses_table = decode_mode == "quantlut_sym"
        self.tlut_bits = tlut_bits if self.uses_table else 0
        self.tlut_seed = tlut_seed if self.uses_table else 0
        self.spec = TrellisSpec(L, K, V, td_x * td_y)
        self.tlut = tlut
        self._quantizer = None

    # --- identity ------------------------------------------------------------------

    @property
    def bits(self):
        return self.K

    @property
    def block_width(self):
        return self.td_y

    @property
    def state_names(self):
        return ("tlut",) if self.uses_table else ()

    def config(self):
        return {"name": self.name, "L": self.L, "K": self.K, "V": self.V, "td_x": self.td_x,
                "td_y": self.td_y, "decode_mode": self.decode_mode, "tlut_bits": self.tlut_bits,
                "tlut_seed": self.tlut_seed}

    # --- the code ------------------------------------------------------------------

    def table(self):
        """The HYB table (2^tlut_bits, 2) float32: the bound one, else the run's (built
        or loaded from the cache on first use). None for codes without a table."""
        if not self.uses_table:
            return None
        if self.tlut is None:
            self.tlut = hyb_table(self.tlut_bits, self.tlut_seed)
        return self.tlut

    def code(self):
        table = self.table()
        return get_code(self.decode_mode, None if table is None else table.float().cpu())

    def quantizer(self):
        """The BitshiftTrellis of this code (built once)."""
        if self._quantizer is None:
            self._quantizer = BitshiftTrellis(self.L, self.K, self.V, self.code(), self.spec.T)
        return self._quantizer

    @functools.cached_property
    def code_rms(self):
        """RMS of the code over all 2^L states (the denominator of Wscale)."""
        return self.code().rms(self.L)

    def prepare(self):
        """Build the HYB table (and the code's RMS) now, before any work: k-means may
        fail for a seed (UserInputError)."""
        return self.code_rms

    def weight_rms(self, scale_override):
        return self.code_rms * (scale_override if scale_override > 0 else 1.0)

    # --- shapes and tiles ----------------------------------------------------------

    def check_shape(self, m, n):
        if m % self.td_x or n % self.td_y:
            raise UserInputError(
                f"cannot quantize a {m} x {n} linear with {self.td_x} x {self.td_y} trellis tiles: the "
                f"output size must be a multiple of --td_x {self.td_x} and the input size a multiple of --td_y "
                f"{self.td_y}")

    def code_shape(self, m, n):
        return (m // self.td_x * (n // self.td_y), self.spec.words)

    def tiles_of(self, X):
        """(..., m, n) -> (..., m/td_x, n/td_y, td_x td_y): each tile read row-major."""
        *lead, m, n = X.shape
        tiles = X.reshape(*lead, m // self.td_x, self.td_x, n // self.td_y, self.td_y).transpose(-3, -2)
        return tiles.reshape(*lead, m // self.td_x, n // self.td_y, self.spec.T)

    def matrix_of(self, tiles):
        """The inverse of `tiles_of`: (..., m/td_x, n/td_y, T) -> (..., m, n)."""
        *lead, rows, cols, _ = tiles.shape
        blocks = tiles.reshape(*lead, rows, cols, self.td_x, self.td_y).transpose(-3, -2)
        return blocks.reshape(*lead, rows * self.td_x, cols * self.td_y)

    # --- quantization --------------------------------------------------------------

    def quantize_block(self, X):
        """An LDLQ block X (B, m, td_y) -> (X_hat, codes (B, m / td_x, words)): its m / td_x
        tiles quantized together."""
        B, m, _ = X.shape
        X_hat, packed = self.quantizer().quantize(X.reshape(B, m // self.td_x, self.spec.T))
        return X_hat.reshape(X.shape), packed

    def join_block_codes(self, blocks):
        """Block codes (B, m / td_x, words), block j = tile column j -> (B, tiles, words)
        with tile (i, j) at row i (n / td_y) + j."""
        codes = torch.stack(blocks, dim=-2)
        return codes.reshape(codes.shape[0], -1, codes.shape[-1])

    def round_independently(self, X, chunk_rows=None):
        """Every tile of X (..., m, n) quantized on its own (two-pass Viterbi), `chunk_rows`
        tiles at a time: HARP's target."""
        tiles = self.tiles_of(X)
        X_hat, _ = self.quantizer().quantize(tiles.reshape(-1, self.spec.T), chunk_rows)
        return self.matrix_of(X_hat.reshape(tiles.shape))

    # --- stored state and decoding -------------------------------------------------

    def empty_state(self):
        if not self.uses_table:
            return {}
        return {"tlut": torch.zeros(1 << self.tlut_bits, self.V)}

    def state(self):
        if not self.uses_table:
            return {}
        return {"tlut": self.table().float().clone()}

    def bind(self, tlut=None):
        """This codebook decoding with a linear's stored table (a new instance; itself
        when the code has no table)."""
        if not self.uses_table:
            return self
        config = {k: v for k, v in self.config().items() if k != "name"}
        return TrellisCodebook(**config, tlut=tlut)

    def decode_tiles(self, codes):
        """(..., words) packed tiles -> (..., T) float32 weights (the code applied to the
        unpacked states, equal to the quantizer's X_hat)."""
        states = unpack(codes, self.spec)
        table = self.table()
        code = get_code(self.decode_mode, None if table is None else table.to(states.device))
        return code(states).reshape(*codes.shape[:-1], self.spec.T)

    def decode_matrix(self, codes, m, n):
        tiles = self.decode_tiles(codes).reshape(m // self.td_x, n // self.td_y, self.spec.T)
        return self.matrix_of(tiles)
