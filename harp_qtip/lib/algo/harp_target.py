"""HARP's proxy target from the backend's codebook (any codebook of the pipeline
contract, lib/codebook/base.py): W~ / s rounded without error feedback (the reference's
target: QuIP#'s E8P/RVQ rounding of each 8-vector, QTIP's Viterbi of each 16 x 16 tile),
or with block-LDLQ error feedback on H~ (`--harp_strategy ldlq`).

s = (RMS(W~) + 1e-8) / c per matrix, c = codebook.weight_rms(scale_override): the RMS the
quantizer gets (QuIP#: --scale_override or the codebook's opt_scale; QTIP: the code's
RMS times --scale_override). Works on one matrix (m, n) or a batch (L, m, n).
"""
from lib.algo.ldlq import ldlq


class CodebookTarget:
    def __init__(self, codebook, scale_override=-1.0, chunk_size=131072):
        self.codebook = codebook
        self.c = codebook.weight_rms(scale_override)
        self.chunk_size = chunk_size

    def scale(self, Wt):
        return (Wt.square().mean(dim=(-2, -1), keepdim=True).sqrt() + 1e-8) / self.c

    def __call__(self, X):
        """The codebook's independent rounding of X, `chunk_size` codes at a time."""
        return self.codebook.round_independently(X, self.chunk_size)

    def with_feedback(self, X, Ht):
        """Block LDLQ of X ((L,) m, n) on H~ (no tune passes): what is really quantized."""
        T, _ = ldlq(X, Ht, self.codebook, tune_iters=0)
        return T
