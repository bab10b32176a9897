"""QTIP's codes c(s): an L-bit trellis state -> V weights (fact sheet section 2).

Every code is a function `code(states) -> (*states.shape, V)` float32 on the
device of `states` (any integer dtype, values in [0, 2^L)); the integer
arithmetic runs in int64, so `x mod 2^32` is `x & 0xFFFFFFFF`.

* `1mad` (V = 1): x = (s * 34038481 + 76625530) mod 2^32, output =
  (sum of the 4 bytes of x - 510) / 147.800537109375 (= sqrt(21845) in fp32;
  a sum of 4 uniform bytes, mean 510, variance 21845).
* `3inst` (V = 1): x = (s * 89226354 + 64248484) mod 2^32, keep mask 0x8FFF8FFF,
  XOR 0x3B603B60, read the two 16-bit halves as fp16 (each |h| in [0.125, 2)),
  output = their sum rounded to fp16.
* `quantlut_sym` = HYB (V = 2): h = (s + 1) * s, index = (h >> (16 - b - 1)) &
  (2^b - 1) into a table `tlut` of 2^b 2-D points, the first coordinate negated
  when bit 15 of h is set. `build_hyb_tlut` makes the table: k-means on 2^20
  standard 2-D Gaussian samples, divided by its population std, times sqrt(15/16).
"""
import dataclasses
import functools
import math
from typing import Callable

import torch
from scipy.cluster.vq import kmeans

from lib.utils.errors import UserInputError

MASK32 = 0xFFFFFFFF
MAD_MUL, MAD_ADD = 34038481, 76625530
MAD_MEAN, MAD_STD = 510, 147.800537109375
INST_MUL, INST_ADD = 89226354, 64248484
INST_KEEP, INST_XOR = 0x8FFF8FFF, 0x3B603B60
HYB_TLUT_BITS = 9
HYB_SAMPLES = 1 << 20
HYB_KMEANS_THRESH = 1e-5
HYB_TARGET_STD = 0.9682458365518543  # sqrt(15/16)


def mad1(states):
    """1MAD: (byte sum of (s * 34038481 + 76625530) mod 2^32 - 510) / sqrt(21845)."""
    x = (states.long() * MAD_MUL + MAD_ADD) & MASK32
    byte_sum = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)
    return ((byte_sum - MAD_MEAN).float() / MAD_STD).unsqueeze(-1)


def _as_fp16(bits16):
    """Reinterpret integers in [0, 2^16) as IEEE fp16 bit patterns."""
    signed = bits16 - ((bits16 >> 15) << 16)
    return signed.to(torch.int16).view(torch.float16)


def inst3(states):
    """3INST: two fp16 halves of ((s * 89226354 + 64248484) mod 2^32 & 0x8FFF8FFF)
    ^ 0x3B603B60, summed in fp16."""
    x = (states.long() * INST_MUL + INST_ADD) & MASK32
    x = (x & INST_KEEP) ^ INST_XOR
    total = _as_fp16(x >> 16) + _as_fp16(x & 0xFFFF)
    return total.float().unsqueeze(-1)


def hyb_index(states, tlut_bits):
    """HYB's (table index, first-coordinate sign flip in {0, 1}) of each state:
    h = (s + 1) s, index = (h >> (15 - tlut_bits)) & (2^tlut_bits - 1), flip = bit 15 of h."""
    s = states.long()
    h = (s + 1) * s
    index = (h >> (16 - tlut_bits - 1)) & ((1 << tlut_bits) - 1)
    return index, (h >> 15) & 1


def hyb(states, tlut):
    """HYB (quantlut_sym): the 2-D point tlut[index], first coordinate negated on flip."""
    index, flip = hyb_index(states, _tlut_bits(tlut))
    points = tlut.to(device=states.device, dtype=torch.float32)[index]
    sign = 1.0 - 2.0 * flip.float()
    return torch.stack((points[..., 0] * sign, points[..., 1]), dim=-1)


def _tlut_bits(tlut):
    n = tlut.shape[0]
    bits = n.bit_length() - 1
    if tlut.dim() != 2 or tlut.shape[1] != 2 or n != 1 << bits or not 1 <= bits <= 15:
        raise UserInputError(
            f"the HYB table must have shape (2^b, 2) with 1 <= b <= 15, got {tuple(tlut.shape)}")
    return bits


@functools.lru_cache(maxsize=4)
def _hyb_tlut_cached(tlut_bits, seed, n_samples):
    gen = torch.Generator().manual_seed(seed)
    samples = torch.randn(n_samples, 2, generator=gen)
    init = torch.randn(1 << tlut_bits, 2, generator=gen)
    centroids, _ = kmeans(samples.double().numpy(), init.double().numpy(),
                          thresh=HYB_KMEANS_THRESH)
    if centroids.shape[0] != 1 << tlut_bits:
        raise UserInputError(
            f"the HYB table's k-means (tlut_bits {tlut_bits}, seed {seed}) left "
            f"{(1 << tlut_bits) - centroids.shape[0]} of its {1 << tlut_bits} clusters empty; "
            f"pass another --seed (it seeds the table)")
    table = torch.from_numpy(centroids)
    table = table / table.std(unbiased=False) * HYB_TARGET_STD
    return table.float()


def build_hyb_tlut(tlut_bits=HYB_TLUT_BITS, seed=0, n_samples=HYB_SAMPLES):
    """The HYB table (2^tlut_bits, 2) float32 (fact sheet section 2, quantlut_sym).

    k-means (scipy.cluster.vq.kmeans, stop when the mean distance changes by less
    than 1e-5) of `n_samples` standard 2-D Gaussian samples from initial centroids
    that are 2^tlut_bits standard Gaussian draws; then divided by the population
    std over all entries and multiplied by sqrt(15/16). Our draws are reproducible:
    a torch generator seeded with `seed` gives the samples first, then the initial
    centroids (the reference uses the global torch RNG and a temp-file cache, so
    its tables are not). k-means runs in float64. At the defaults this takes
    about 1.5 min on a CPU; the result is cached per process (the pipeline stores
    the table in the checkpoint, and decoders use that).
    """
    if not 1 <= tlut_bits <= 15:
        raise UserInputError(f"tlut_bits must be in [1, 15] for quantlut_sym, got {tlut_bits}")
    if n_samples < 1 << tlut_bits:
        raise UserInputError(
            f"n_samples ({n_samples}) must be at least 2^tlut_bits ({1 << tlut_bits})")
    return _hyb_tlut_cached(tlut_bits, seed, n_samples).clone()


@dataclasses.dataclass(frozen=True)
class Code:
    """A computed code: `name` (the upstream decode_mode), `V` weights per state and
    `fn(states) -> (*states.shape, V)` float32."""

    name: str
    V: int
    fn: Callable

    def __call__(self, states):
        return self.fn(states)

    def table(self, L, device="cpu"):
        """The (2^L, V) float32 values of all L-bit states (the reference's `lut`)."""
        return self.fn(torch.arange(1 << L, device=device))

    def rms(self, L):
        """RMS of the code over all 2^L states (Wscale's denominator, section 4)."""
        return math.sqrt(self.table(L).double().pow(2).mean().item())


DECODE_MODES = ("1mad", "3inst", "quantlut_sym")


def get_code(decode_mode, tlut=None):
    """The code called `decode_mode`; quantlut_sym needs its table `tlut` (2^b, 2)."""
    if decode_mode == "1mad":
        return Code("1mad", 1, mad1)
    if decode_mode == "3inst":
        return Code("3inst", 1, inst3)
    if decode_mode == "quantlut_sym":
        if tlut is None:
            raise UserInputError("quantlut_sym needs its table: pass tlut=build_hyb_tlut(...)")
        _tlut_bits(tlut)
        return Code("quantlut_sym", 2, functools.partial(hyb, tlut=tlut))
    raise UserInputError(
        f"unknown decode_mode {decode_mode!r}; valid: {', '.join(DECODE_MODES)}")
