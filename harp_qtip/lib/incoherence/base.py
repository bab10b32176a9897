"""Two-sided incoherence processing of one linear layer y = W x (W is m x n).

A processor holds random signs SU (n), SV (m) and two orthogonal transforms,
R_n on the input side and R_m on the output side:

    W' = R_m^T diag(SV) W diag(SU) R_n,      H' = R_n^T diag(SU) H diag(SU) R_n,

so tr((W - W^) H (W - W^)^T) = tr((W' - W'^) H' (W' - W'^)^T): the quantizer works on
(W', H') and the proxy loss is unchanged. Inverse: W^ = diag(SV) R_m W'^ R_n^T diag(SU).
Inference never forms W^:  y = SV * ((W'^ ((SU * x) R_n)^T)^T R_m^T)  (row vectors).

Transforms act on the last dim of row batches: `transform(x) = x R`,
`inverse_transform(x) = x R^T` (QuIP#'s RHT: R = U_n, the normalized Hadamard;
HARP: R = the fitted structured rotation).
"""
import torch
from torch import nn


class OrthogonalTransform(nn.Module):
    """An orthogonal n x n matrix R applied on the last dim of x."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def transform(self, x):
        """x R."""
        raise NotImplementedError

    def inverse_transform(self, x):
        """x R^T."""
        raise NotImplementedError

    def config(self):
        """JSON-able arguments that, with the state dict, rebuild this transform."""
        return {}

    def cache_blocks(self):
        """Precompute what inference needs from the current state (nothing here)."""

    def storage_bits(self):
        """Bits of learned state stored with the model (fixed transforms: 0)."""
        return 0


def random_signs(n, generator):
    """+-1 with equal probability: sign of a standard normal draw, 0 counted as +1."""
    return torch.where(torch.randn(n, generator=generator) >= 0, 1.0, -1.0)


class IncoherenceProcessor(nn.Module):
    """Signs SU/SV plus input-side (R_n) and output-side (R_m) orthogonal transforms."""

    def __init__(self, mode, SU, SV, right, left):
        super().__init__()
        if right.n != SU.numel() or left.n != SV.numel():
            raise ValueError("transform sizes do not match the sign vectors")
        self.mode = mode
        self.register_buffer("SU", SU)
        self.register_buffer("SV", SV)
        self.right = right
        self.left = left

    @property
    def n(self):
        return self.SU.numel()

    @property
    def m(self):
        return self.SV.numel()

    def _signs(self, like):
        return self.SU.to(like), self.SV.to(like)

    def rotate_hessian(self, Hs):
        """R_n^T Hs R_n (signs already applied)."""
        return self.right.transform(self.right.transform(Hs).T).T

    def rotate_weight(self, Ws):
        """R_m^T Ws R_n (signs already applied)."""
        return self.left.transform(self.right.transform(Ws).T).T

    def signed_hessian(self, H):
        SU, _ = self._signs(H)
        return SU[:, None] * H * SU[None, :]

    def signed_weight(self, W):
        SU, SV = self._signs(W)
        return SV[:, None] * W * SU[None, :]

    def process_hessian(self, H):
        """H' = R_n^T diag(SU) H diag(SU) R_n."""
        return self.rotate_hessian(self.signed_hessian(H))

    def process_weight(self, W):
        """W' = R_m^T diag(SV) W diag(SU) R_n."""
        return self.rotate_weight(self.signed_weight(W))

    def restore_weight(self, Wp):
        """W = diag(SV) R_m W' R_n^T diag(SU)."""
        SU, SV = self._signs(Wp)
        A = self.right.inverse_transform(Wp)
        A = self.left.inverse_transform(A.T).T
        return SV[:, None] * A * SU[None, :]

    def input_transform(self, x):
        """(SU * x) R_n for row vectors x (..., n)."""
        SU, _ = self._signs(x)
        return self.right.transform(x * SU)

    def output_transform(self, y):
        """SV * (y R_m^T) for row vectors y (..., m)."""
        _, SV = self._signs(y)
        return self.left.inverse_transform(y) * SV

    def config(self):
        return {"mode": self.mode, "right": self.right.config(), "left": self.left.config()}

    def storage_bits(self):
        return self.right.storage_bits() + self.left.storage_bits()

    def freeze(self):
        """Ready for inference with the current state (e.g. HARP's cached blocks)."""
        self.right.cache_blocks()
        self.left.cache_blocks()
