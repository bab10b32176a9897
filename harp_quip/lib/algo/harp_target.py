"""QuIP#'s proxy targets for HARP: E8P/RVQ rounding of W~ / s, independently per
8-vector (the reference's target) or with block-LDLQ error feedback on H~
(`--harp_strategy ldlq`)."""
from lib.algo.ldlq import ldlq
from lib.incoherence.harp import VectorCodebookTarget


class CodebookTarget(VectorCodebookTarget):
    def with_feedback(self, X, Ht):
        """Block LDLQ of X ((L,) m, n) on H~ (no tune passes): what is really quantized."""
        T, _ = ldlq(X, Ht, self.codebook, tune_iters=0)
        return T
