"""`BitshiftTrellis`: the QTIP quantizer of rows of T weights (fact sheet sections 1-3).

    quantize(X) -> (X_hat, packed)   X: (..., T) float
                                     X_hat: X's shape and dtype (decoded weights)
                                     packed: (..., words) int16 tail-biting bitstreams
    decode(packed) -> X_hat          (..., T) float32

Each row is one trellis sequence (a 16 x 16 tile in the pipeline), quantized by the
two-pass tail-biting Viterbi of `lib.codebook.trellis`, `chunk_rows` rows at a time
(default 2^(24 - L) as in the reference: 256 rows at L = 16), which bounds memory to
about chunk_rows * (2^(L+3) + T / V * 2^(L - KV)) bytes.
"""
import torch

from lib.codebook.trellis import TrellisSpec, pack, unpack, viterbi_tailbiting
from lib.utils.errors import UserInputError


class BitshiftTrellis:
    """Tail-biting bitshift trellis quantizer with L state bits, K bits per weight,
    V weights per step, a computed `code` (lib.codebook.computed_codes.Code) and
    sequences of T weights."""

    name = "bitshift"

    def __init__(self, L, K, V, code, T=256, chunk_rows=None):
        if code.V != V:
            raise UserInputError(f"code {code.name} emits {code.V} weights per state, not V={V}")
        self.spec = TrellisSpec(L, K, V, T)
        self.code = code
        self.chunk_rows = chunk_rows or 1 << max(0, 24 - L)
        self._luts = {}

    def lut_on(self, device):
        """The code's (2^L, V) float32 table on `device`, built once per device."""
        key = torch.device(device)
        if key not in self._luts:
            self._luts[key] = self.code.table(self.spec.L, device=key)
        return self._luts[key]

    def quantize(self, X, chunk_rows=None):
        """`chunk_rows` (default: the instance's) rows go through Viterbi at once."""
        spec = self.spec
        if X.shape[-1] != spec.T:
            raise UserInputError(f"rows must hold T={spec.T} weights, got shape {tuple(X.shape)}")
        x = X.reshape(-1, spec.steps, spec.V).float()
        lut = self.lut_on(X.device)
        chunk = chunk_rows or self.chunk_rows
        states = torch.empty(x.shape[0], spec.steps, dtype=torch.long, device=X.device)
        for start in range(0, x.shape[0], chunk):
            stop = start + chunk
            states[start:stop] = viterbi_tailbiting(x[start:stop], lut, spec)
        X_hat = lut[states].reshape(X.shape).to(X.dtype)
        return X_hat, pack(states, spec).reshape(*X.shape[:-1], spec.words)

    def decode(self, packed):
        states = unpack(packed, self.spec)
        return self.lut_on(packed.device)[states].reshape(*packed.shape[:-1], self.spec.T)
