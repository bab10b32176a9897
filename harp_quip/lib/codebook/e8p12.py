"""E8P12: the 2-bit, 8-dimensional codebook built from the E8 lattice (QuIP#).

The grid has 2**16 points in R^8, so one 16-bit code covers 8 weights (2 bits
per weight). It is built from a set A of 256 "absolute-value patterns" of
half-odd-integer vectors:

  * the 227 patterns |v|, v in D8 + 1/2, with ||v||^2 <= 10 (entries in
    {1/2, 3/2, 5/2}), in ascending lexicographic order, then
  * 29 patterns of squared norm 12 (five 3/2 and three 1/2), in a fixed order.

Let P = {s (.) a : a in A, s in {+-1}^8, sum(s (.) a) even}, the 32,768
half-integer points of E8 with those patterns (128 sign vectors per pattern).
The grid is P + 1/4 together with P - 1/4 (all 65,536 points distinct, a subset
of E8 + 1/4 or E8 - 1/4, max squared norm 16.5).

Code layout: code = (pattern index << 8) | sign bits. The pattern's "base
point" b is a with coordinate 7 negated when sum(a) is odd, so b lies in E8.
Coordinate i is controlled by sign bit SIGN_BIT_OF_COORD[i]. Decoding flips
every coordinate of b whose bit is set; when an odd number of bits is set it
also flips coordinate 0 (restoring an even sum) and adds -1/4 to every
coordinate, otherwise it adds +1/4.

Quantization is exact nearest-point search (Euclidean) without scanning all
65,536 points; see `E8P12.nearest_codes`.
"""
import functools
import itertools

import torch

from lib.codebook import triton_search
from lib.codebook.base import Codebook

CODESZ = 8
NUM_PATTERNS = 256
MAX_SMALL_NORM2 = 10.0
NORM12_PATTERNS = (
    "31113333", "13113333", "11313333", "11133333", "33313311", "33313131",
    "33311331", "33313113", "33311313", "33311133", "33133311", "33133131",
    "33131331", "33133113", "33131313", "33131133", "31333311", "31333131",
    "31331331", "31333113", "31331313", "13331133", "13333311", "13333131",
    "13331331", "13333113", "13331313", "11331333", "33113331",
)
SIGN_BIT_OF_COORD = (0, 4, 1, 5, 2, 6, 3, 7)
COORD_OF_SIGN_BIT = (0, 2, 4, 6, 1, 3, 5, 7)
PARITY_COORD = 0
SHIFT = 0.25


@functools.lru_cache(maxsize=None)
def abs_patterns():
    """The (256, 8) float64 table A of absolute-value patterns, in code order."""
    small = sorted(
        v for v in itertools.product((0.5, 1.5, 2.5), repeat=CODESZ)
        if sum(c * c for c in v) <= MAX_SMALL_NORM2)
    norm12 = [tuple(int(digit) / 2 for digit in p) for p in NORM12_PATTERNS]
    return torch.tensor(small + norm12, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def base_points():
    """(256, 8) float64: each pattern with coordinate 7 negated if its sum is odd.

    A sum of eight half-odd integers is an integer; negating one coordinate
    changes it by an odd integer, so every base point has an even sum (in E8).
    """
    base = abs_patterns().clone()
    odd = base.sum(dim=1).remainder(2) == 1
    base[odd, CODESZ - 1] *= -1
    return base


def popcount8(values):
    """Number of set bits in each entry of an int64 tensor of 8-bit values."""
    return sum((values >> bit) & 1 for bit in range(8))


@functools.lru_cache(maxsize=None)
def full_grid():
    """The (65536, 8) float32 grid: row c is the decoded point of code c."""
    codes = torch.arange(1 << 16)
    patterns, bits = codes >> 8, codes & 0xFF
    flip = (bits[:, None] >> torch.tensor(SIGN_BIT_OF_COORD)) & 1
    odd = popcount8(bits) & 1
    flip[:, PARITY_COORD] ^= odd
    points = base_points()[patterns] * (1 - 2 * flip) + SHIFT * (1 - 2 * odd[:, None])
    return points.to(torch.float32)


@functools.lru_cache(maxsize=None)
def packed_abs_table():
    """(256,) int32: base point b of each pattern packed as eight 4-bit nibbles.

    Nibble j (bits 4j..4j+3) holds 2 * b[COORD_OF_SIGN_BIT[j]] + 8, an integer
    in [3, 13], so it pairs with sign bit j. The stored point is the base point
    (coordinate 7 already negated for odd-sum patterns), so a kernel decodes a
    code with the sign-bit rules alone. The 32-bit word is reinterpreted as
    signed int32.
    """
    nibbles = (2 * base_points()[:, list(COORD_OF_SIGN_BIT)] + 8).to(torch.int64)
    words = (nibbles << (4 * torch.arange(CODESZ))).sum(dim=1)
    return (words - (words >= 1 << 31).to(torch.int64) * (1 << 32)).to(torch.int32)


@functools.lru_cache(maxsize=None)
def search_candidates():
    """Candidates for the nearest point of P to z with z_0..z_6 >= 0.

    Returns (points (m, 8) float64, pattern index (m,) int64): the u in P with
    u_0..u_6 all positive except at most one equal to -1/2 (u_7 free); about
    1,366 points.

    Why they suffice, for z_0..z_6 >= 0 and any u in P: two negative entries
    among u_0..u_6 can both be flipped (P is closed under flipping an even
    number of signs) without moving away from z; a lone negative -3/2 (-5/2)
    can become +1/2 (+3/2), which keeps the parity, gives a pattern of smaller
    norm that is still in A, and is strictly closer to z.
    """
    even_codes = torch.arange(1 << 16)
    even_codes = even_codes[popcount8(even_codes & 0xFF) % 2 == 0]
    points = full_grid()[even_codes].to(torch.float64) - SHIFT
    head = points[:, :CODESZ - 1]
    negatives = (head < 0).sum(dim=1)
    keep = (negatives == 0) | ((negatives == 1) & (head == -0.5).any(dim=1))
    return points[keep], even_codes[keep] >> 8


def even_sign_flip(y):
    """Signs g in {+-1}^(n, 8) with an even number of -1 such that g (.) y has
    coordinates 0..6 >= 0: g = sign(y) (zero counts as +), with coordinate 7
    also flipped when y has an odd number of negative entries.
    """
    negative = y < 0
    odd = negative.sum(dim=1) % 2 == 1
    negative[:, CODESZ - 1] ^= odd
    return 1 - 2 * negative.to(y.dtype)


class E8P12(Codebook):
    """The E8P12 codebook (see the module docstring for the grid and codes)."""

    name = "E8P12"
    codesz = CODESZ
    bits = 2
    opt_scale = 1.03
    storage_dtype = torch.int16
    num_codes = 1 << 16

    @property
    def grid(self):
        """The (65536, 8) float32 table, code c -> point (built once)."""
        return full_grid()

    def search_tables(self, device, dtype):
        """Per-(device, dtype) tensors for `nearest_in_coset`."""
        def build(dev):
            points, patterns = search_candidates()
            return {
                "points": points.to(dev, dtype),
                "twice_points_t": (2 * points).T.contiguous().to(dev, dtype),
                "neg_norm2": -(points * points).sum(dim=1).to(dev, dtype),
                "patterns": patterns.to(dev),
                "base_negative": (base_points() < 0).to(dev),
                "bit_values": (1 << torch.tensor(SIGN_BIT_OF_COORD)).to(dev),
            }
        return self.cached_on(("search", dtype), device, build)

    def nearest_in_coset(self, x, shift_sign):
        """Nearest point to each row of x in P + shift_sign/4, and its code.

        With y = x - shift_sign/4 the answer is p + shift_sign/4, p the nearest
        point of P to y. P is invariant under g = even_sign_flip(y), so
        p = g (.) argmax_u (2 <g (.) y, u> - |u|^2) over `search_candidates`.
        Returns (codes (n,) int64, points (n, 8) in x's dtype).
        """
        tables = self.search_tables(x.device, x.dtype)
        y = x - shift_sign * SHIFT
        signs = even_sign_flip(y)
        z = signs * y
        if triton_search.available(z):
            best = triton_search.argmax_scores(z, tables["twice_points_t"], tables["neg_norm2"])
        else:
            best = torch.addmm(tables["neg_norm2"], z, tables["twice_points_t"]).argmax(dim=1)
        p = signs * tables["points"][best]
        patterns = tables["patterns"][best]
        return self.code_of(p, patterns, shift_sign), p + shift_sign * SHIFT

    def code_of(self, p, patterns, shift_sign):
        """16-bit codes of the grid points p + shift_sign/4, p in P with the given patterns.

        The sign bits mark where p's signs differ from the base point's (an even
        number of places); for the -1/4 coset the decoder's extra flip of
        coordinate 0 is undone by toggling that coordinate's bit.
        """
        tables = self.search_tables(p.device, p.dtype)
        flips = (p < 0) != tables["base_negative"][patterns]
        sign_bits = (flips.to(torch.int64) * tables["bit_values"]).sum(dim=1)
        if shift_sign < 0:
            sign_bits ^= 1 << SIGN_BIT_OF_COORD[PARITY_COORD]
        return (patterns << 8) | sign_bits

    def nearest_codes(self, vectors):
        """Exact nearest grid point: best of the P + 1/4 and P - 1/4 searches.

        The -1/4 answer wins only if strictly closer.
        """
        codes_plus, points_plus = self.nearest_in_coset(vectors, 1)
        codes_minus, points_minus = self.nearest_in_coset(vectors, -1)
        err_plus = (vectors - points_plus).square().sum(dim=1)
        err_minus = (vectors - points_minus).square().sum(dim=1)
        return torch.where(err_minus < err_plus, codes_minus, codes_plus)
