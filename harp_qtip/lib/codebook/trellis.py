"""The tail-biting bitshift trellis: states, bitstreams, packing, Viterbi (fact sheet
sections 1 and 3).

A sequence of T weights takes S = T / V steps; step t is an L-bit state s_t that
emits V weights c(s_t). Each step shifts in KV = K * V bits:

    s_{t+1} = ((s_t << KV) mod 2^L) | b_t,   b_t in [0, 2^KV),

so the low L - KV bits of s_t are the high L - KV bits of s_{t+1}, and a state
has the 2^KV predecessors (s >> KV) | (j << (L - KV)). Tail-biting closes the
cycle: the low L - KV bits of s_{S-1} are the high L - KV bits of s_0, i.e. the
step s_{S-1} -> s_0 is a valid transition too.

Bitstream: the top KV bits of every state ("chunks", c_t = s_t >> (L - KV)),
concatenated, S * KV = T * K bits. This is the sheet's "L bits of the first
state, then KV bits per step, truncated by the wrapped L - KV bits"; state t is
the L-bit window at bit offset KV * t of the stream read cyclically. Packed
MSB-first into 16-bit words stored as int16 (T * K / 16 words; zero bits pad the
last word when T * K is not a multiple of 16, our extension for small tests).

Viterbi (section 3) minimises sum_t ||x_t - c(s_t)||^2 over valid paths with
min-plus over the 2^KV predecessors of each "group" g = s >> KV and backpointers
per group; tail-biting in two passes (rotate by half, read the overlap, then run
again with the first and last states constrained). All functions are batched over
leading dimensions with torch ops, so they run on any device.
"""
import dataclasses
import math

import torch

from lib.utils.errors import UserInputError

WORD_BITS = 16


@dataclasses.dataclass(frozen=True)
class TrellisSpec:
    """Shape of a bitshift trellis: L state bits, K bits per weight, V weights per
    step, T weights per sequence."""

    L: int
    K: int
    V: int
    T: int

    def __post_init__(self):
        if min(self.L, self.K, self.V, self.T) < 1:
            raise UserInputError(f"L, K, V, T must be positive, got {self}")
        if self.K * self.V >= self.L:
            raise UserInputError(
                f"K * V ({self.K * self.V}) must be smaller than L ({self.L}): "
                f"a step shifts in K * V of the L state bits")
        if self.T % self.V:
            raise UserInputError(f"T ({self.T}) must be a multiple of V ({self.V})")
        if self.T * self.K < self.L:
            raise UserInputError(
                f"T * K ({self.T * self.K}) bits cannot hold one {self.L}-bit state; "
                f"use a longer sequence or a smaller L")

    @property
    def KV(self):
        return self.K * self.V

    @property
    def steps(self):
        """S = T / V trellis steps per sequence."""
        return self.T // self.V

    @property
    def overlap_bits(self):
        """L - KV: the bits two consecutive states share."""
        return self.L - self.KV

    @property
    def words(self):
        """16-bit words per packed sequence: ceil(T * K / 16)."""
        return -(-self.T * self.K // WORD_BITS)


def successors(states, spec):
    """(*states.shape, 2^KV) next states: ((s << KV) mod 2^L) | b."""
    shifted = (states.long() << spec.KV) & ((1 << spec.L) - 1)
    return shifted.unsqueeze(-1) | torch.arange(1 << spec.KV, device=states.device)


def predecessors(states, spec):
    """(*states.shape, 2^KV) previous states: (s >> KV) | (j << (L - KV))."""
    j = torch.arange(1 << spec.KV, device=states.device)
    return (states.long() >> spec.KV).unsqueeze(-1) | (j << spec.overlap_bits)


def is_tailbiting(states, spec):
    """(...) bool: every step of the cycle s_0 -> ... -> s_{S-1} -> s_0 is valid."""
    s = states.long()
    low = s & ((1 << spec.overlap_bits) - 1)
    return (low == torch.roll(s, -1, dims=-1) >> spec.KV).all(dim=-1)


def chunks_of(states, spec):
    """(..., S) bitstream chunks c_t = s_t >> (L - KV), each KV bits."""
    return states.long() >> spec.overlap_bits


def states_of(chunks, spec):
    """(..., S) states of a cyclic bitstream of chunks: the L-bit windows at offsets KV * t."""
    m = -(-spec.L // spec.KV)  # chunks a window touches
    c = chunks.long()
    window = torch.zeros_like(c)
    for j in range(m):
        window = (window << spec.KV) | torch.roll(c, -j, dims=-1)
    return window >> (m * spec.KV - spec.L)


def _msb_first(values, bits):
    """(..., n) -> (..., n * bits) 0/1 int64, most significant bit first."""
    shifts = torch.arange(bits - 1, -1, -1, device=values.device)
    return ((values.unsqueeze(-1) >> shifts) & 1).flatten(-2)


def _from_msb_first(bits, width):
    """(..., n * width) 0/1 -> (..., n) integers, most significant bit first."""
    weights = 1 << torch.arange(width - 1, -1, -1, device=bits.device)
    return (bits.unflatten(-1, (-1, width)) * weights).sum(dim=-1)


def pack(states, spec):
    """(..., S) tail-biting states -> (..., words) int16 bitstream, MSB-first."""
    bits = _msb_first(chunks_of(states, spec), spec.KV)
    pad = spec.words * WORD_BITS - bits.shape[-1]
    bits = torch.nn.functional.pad(bits, (0, pad))
    words = _from_msb_first(bits, WORD_BITS)
    return (words - ((words >> 15) << 16)).to(torch.int16)


def unpack(words, spec):
    """(..., words) int16 -> (..., S) int64 states (the inverse of `pack`)."""
    if words.shape[-1] != spec.words:
        raise UserInputError(
            f"packed sequences must have {spec.words} words for {spec}, got {words.shape[-1]}")
    if WORD_BITS % spec.KV == 0 and spec.steps * spec.KV == spec.words * WORD_BITS:
        # whole chunks per word (K V = 2, 4, 8, 16): shift them out of the words directly
        per_word = WORD_BITS // spec.KV
        shifts = torch.arange(WORD_BITS - spec.KV, -1, -spec.KV, device=words.device)
        chunks = ((words.long() & 0xFFFF).unsqueeze(-1) >> shifts) & ((1 << spec.KV) - 1)
        return states_of(chunks.flatten(-2)[..., :spec.words * per_word], spec)
    bits = _msb_first(words.long() & 0xFFFF, WORD_BITS)[..., :spec.steps * spec.KV]
    return states_of(_from_msb_first(bits, spec.KV), spec)


def _step_costs(x_t, lut_t, lut_sq, out):
    """Write into `out` (B, 2^L) ||c(s)||^2 - 2 <x_t, c(s)> for every state: the squared
    distance ||x_t - c(s)||^2 up to ||x_t||^2, which is the same for all states of a
    sequence and so changes no decision (V passes over the costs instead of 2V + 1).
    lut_t is the transposed table (V, 2^L), lut_sq its squared norms (2^L,)."""
    torch.addcmul(lut_sq, x_t[:, 0, None], lut_t[0], value=-2.0, out=out)
    for v in range(1, lut_t.shape[0]):
        out.addcmul_(x_t[:, v, None], lut_t[v], value=-2.0)
    return out


def viterbi(x, lut, spec, overlap=None):
    """(B, S) int64 states minimising sum_t ||x_t - lut[s_t]||^2 (section 3, steps 1-3).

    x: (B, S, V) float32 targets; lut: (2^L, V) float32 code table. Without
    `overlap` the path is free (not tail-biting); with `overlap` (B,) the first
    state's high L - KV bits and the last state's low L - KV bits must equal it
    (infinite cost elsewhere: pass (b) of the tail-biting quantizer). Costs are
    float32, each step's without the sequence's constant ||x_t||^2; memory O(B * 2^L) for costs and B * S * 2^(L-KV) backpointers.
    """
    B, S, _ = x.shape
    n, groups, fanin = 1 << spec.L, 1 << spec.overlap_bits, 1 << spec.KV
    lut_t = lut.t().contiguous()
    lut_sq = lut.square().sum(dim=1)
    cost = torch.empty(B, n, dtype=torch.float32, device=x.device)
    _step_costs(x[:, 0], lut_t, lut_sq, cost)
    if overlap is not None:
        all_states = torch.arange(n, device=x.device)
        cost.masked_fill_((all_states >> spec.KV) != overlap[:, None], math.inf)
    bp_dtype = torch.uint8 if fanin <= 256 else torch.int32
    backptr = torch.empty(S - 1, B, groups, dtype=bp_dtype, device=x.device)
    best = torch.empty(B, groups, dtype=torch.float32, device=x.device)
    arg = torch.empty(B, groups, dtype=torch.long, device=x.device)
    for t in range(1, S):
        # predecessors of group g are j << (L - KV) | g; the states of g are g << KV | b
        torch.min(cost.view(B, fanin, groups), dim=1, out=(best, arg))
        backptr[t - 1].copy_(arg)
        _step_costs(x[:, t], lut_t, lut_sq, cost).view(B, groups, fanin).add_(best.unsqueeze(-1))
    if overlap is not None:
        cost.masked_fill_((all_states & (groups - 1)) != overlap[:, None], math.inf)
    states = torch.empty(S, B, dtype=torch.long, device=x.device)
    s = states[S - 1] = cost.argmin(dim=1)
    for t in range(S - 1, 0, -1):
        g = s >> spec.KV
        j = backptr[t - 1].gather(1, g.unsqueeze(1)).squeeze(1).long()
        s = states[t - 1] = g | (j << spec.overlap_bits)
    return states.t().contiguous()


def viterbi_tailbiting(x, lut, spec):
    """(B, S) tail-biting states for x (B, S, V) by the two-pass scheme of section 3.

    (a) Viterbi on x rotated by S // 2 steps (T / 2 weights), so that original step
    0 sits at step S // 2; the high L - KV bits of the state found there are the
    overlap. (b) Viterbi on x with the first and last states constrained to it.
    """
    shift = spec.steps // 2
    rotated = viterbi(torch.roll(x, shift, dims=1), lut, spec)
    overlap = rotated[:, shift] >> spec.KV
    return viterbi(x, lut, spec, overlap=overlap)
