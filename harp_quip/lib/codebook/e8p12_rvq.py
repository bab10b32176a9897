"""Two-stage residual codebooks on top of E8P12 (QuIP#'s 3- and 4-bit codebooks).

Both quantize a vector x in R^8 greedily in two stages:

    q1 = E8P12(x)                      exact nearest point of the 2-bit grid
    r  = (x - q1) * s                  the residual, scaled up by s = resid_scale
    q2 = C2(r)                         exact nearest point of the stage-2 codebook C2
    q  = q1 + q2 / s

This is not a nearest-point search over all sums q1 + q2 / s: stage 1 is fixed
before stage 2 runs (that is the definition). The code concatenates the two
stage codes, stage 1 in the high bits: code = (code1 << stage2_bits) | code2.

  * E8P12RVQ3B: C2 is the 256-point ball `residual_points()` (8-bit code2),
    s = 2.04; 24 bits per 8 weights, opt_scale 0.98. The reference MSE per
    element on N(0, 1) at opt_scale is about 0.0296.
  * E8P12RVQ4B: C2 is E8P12 again (16-bit code2), s = 3.45; 32 bits per 8
    weights, opt_scale 1.03, reference MSE about 0.0097.

The codes are stored as int32 (codes >= 2**31 of E8P12RVQ4B read back negative;
`decode` masks them). The layout is ours, not bit-compatible with QuIP#'s.
Decoding adds the float32 table (C2 / s) (each entry rounded once from float64)
to the stage-1 point, so it is bit-identical on every device.
"""
import abc
import functools
import itertools

import torch

from lib.codebook.base import Codebook
from lib.codebook.e8p12 import CODESZ, E8P12

BALL_NORM2 = 2
AXIS_VALUE = 2


@functools.lru_cache(maxsize=None)
def residual_points():
    """The (256, 8) float64 stage-2 table of E8P12RVQ3B, in code order.

    Codes 0..240: the 241 points of E8 with squared norm <= 2, ascending in
    lexicographic order: the origin, the 112 roots +-e_i +- e_j (i < j) and the
    128 vectors (+-1/2)^8 with an even number of minus signs (E8 = D8 u (D8 + 1/2),
    D8 = integer vectors with an even sum; no integer vector of squared norm 1
    has an even sum). Codes 241..255: the 15 points of squared norm 4
    +2 e_0, ..., +2 e_7, then -2 e_0, ..., -2 e_6 (not -2 e_7).
    """
    integer = [v for v in itertools.product((-1, 0, 1), repeat=CODESZ)
               if sum(c * c for c in v) in (0, BALL_NORM2)]
    half = [v for v in itertools.product((-0.5, 0.5), repeat=CODESZ)
            if sum(c < 0 for c in v) % 2 == 0]
    ball = sorted(tuple(float(c) for c in v) for v in integer + half)
    axis_points = [tuple(float(sign * AXIS_VALUE) if j == i else 0.0 for j in range(CODESZ))
                   for sign, count in ((1, CODESZ), (-1, CODESZ - 1)) for i in range(count)]
    return torch.tensor(ball + axis_points, dtype=torch.float64)


class ResidualE8P12(Codebook):
    """Greedy two-stage residual codebook: E8P12, then `stage2_codes` on the scaled residual.

    Subclasses set `stage2_bits`, `opt_resid_scale` and implement
    `stage2_table` and `stage2_codes`. `resid_scale` (default
    `opt_resid_scale`) is s in q = q1 + q2 / s; `stage1` is the E8P12 instance
    to search with (the registry passes its shared one).
    """

    codesz = CODESZ
    storage_dtype = torch.int32
    stage2_bits: int
    opt_resid_scale: float

    def __init__(self, resid_scale=None, stage1=None):
        super().__init__()
        self.resid_scale = self.opt_resid_scale if resid_scale is None else float(resid_scale)
        self.stage1 = E8P12() if stage1 is None else stage1

    @property
    @abc.abstractmethod
    def stage2_table(self):
        """(2**stage2_bits, 8) float table of the unscaled stage-2 points q2."""

    @abc.abstractmethod
    def stage2_codes(self, residual):
        """Codes (n,) int64 of the exact nearest stage-2 points to the rows of `residual`."""

    def config(self):
        """{"name", "resid_scale_override"}: the kwargs of get_codebook for this instance."""
        return {"name": self.name, "resid_scale_override": self.resid_scale}

    def scaled_stage2_on(self, device):
        """float32 (2**stage2_bits, 8) table q2 / s on `device`, divided in float64 once."""
        def build(dev):
            table = self.stage2_table.to(torch.float64) / self.resid_scale
            return table.to(dev, torch.float32)
        return self.cached_on("scaled_stage2", device, build)

    def nearest_codes(self, vectors):
        """code1 of the nearest E8P12 point q1, code2 of the nearest C2 point to (x - q1) * s."""
        codes1 = self.stage1.nearest_codes(vectors)
        q1 = self.stage1.points_of(codes1).to(vectors.dtype)
        codes2 = self.stage2_codes((vectors - q1) * self.resid_scale)
        return (codes1 << self.stage2_bits) | codes2

    def points_of(self, codes):
        """q1 + q2 / s for code = (code1 << stage2_bits) | code2, in float32."""
        q1 = self.stage1.points_of(codes >> self.stage2_bits)
        scaled_q2 = self.scaled_stage2_on(codes.device)[codes & ((1 << self.stage2_bits) - 1)]
        return q1 + scaled_q2


class E8P12RVQ3B(ResidualE8P12):
    """3 bits per weight: E8P12 plus the 256-point ball `residual_points()` at s = 2.04."""

    name = "E8P12RVQ3B"
    bits = 3
    opt_scale = 0.98
    opt_resid_scale = 2.04
    stage2_bits = 8
    num_codes = 1 << 24

    @property
    def stage2_table(self):
        """`residual_points()` (float64)."""
        return residual_points()

    def stage2_codes(self, residual):
        """Brute force over the 256 points: argmax_p 2 <r, p> - |p|^2 (= argmin |r - p|^2).

        Ties go to the lowest code; in float32 the choice is exact up to rounding
        of the scores.
        """
        def build(dev):
            points = residual_points()
            return ((2 * points).T.contiguous().to(dev, residual.dtype),
                    -(points * points).sum(dim=1).to(dev, residual.dtype))
        twice_points_t, neg_norm2 = self.cached_on(("ball", residual.dtype), residual.device, build)
        return torch.addmm(neg_norm2, residual, twice_points_t).argmax(dim=1)


class E8P12RVQ4B(ResidualE8P12):
    """4 bits per weight: E8P12 twice, the second on the residual scaled by s = 3.45."""

    name = "E8P12RVQ4B"
    bits = 4
    opt_scale = 1.03
    opt_resid_scale = 3.45
    stage2_bits = 16
    num_codes = 1 << 32

    @property
    def stage2_table(self):
        """The E8P12 grid (float32)."""
        return self.stage1.grid

    def stage2_codes(self, residual):
        """E8P12's exact nearest-point search."""
        return self.stage1.nearest_codes(residual)
