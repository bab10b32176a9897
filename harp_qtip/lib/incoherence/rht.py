"""QuIP#'s fixed incoherence transforms: `had` (randomized Hadamard) and `kron`."""
import torch

from lib.incoherence.base import IncoherenceProcessor, OrthogonalTransform, random_signs
from lib.utils.hadamard import hadamard_factor, hadamard_transform


class HadamardRotation(OrthogonalTransform):
    """R = U_n = (H_K (x) H_{n/K}) / sqrt(n), QuIP#'s normalized Hadamard (no parameters)."""

    def __init__(self, n):
        super().__init__(n)
        hadamard_factor(n)

    def transform(self, x):
        return hadamard_transform(x, transpose=True)

    def inverse_transform(self, x):
        return hadamard_transform(x, transpose=False)


def kron_factor_sizes(n):
    """QuIP#'s split of n into two Kronecker factors: the ascending prime factors of n
    at even positions multiply to the first, those at odd positions to the second
    (4096 -> 64 x 64, 11008 -> 688 x 16)."""
    primes, rest, p = [], n, 2
    while rest > 1:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    a = b = 1
    for i, q in enumerate(primes):
        if i % 2 == 0:
            a *= q
        else:
            b *= q
    return a, b


def haar_special_orthogonal(k, generator):
    """A Haar-random rotation of size k (QR of a Gaussian with sign fix, det forced to +1)."""
    Q, R = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))
    Q = Q * torch.where(R.diagonal() >= 0, 1.0, -1.0)[None, :]
    if torch.linalg.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q.float()


class KronRotation(OrthogonalTransform):
    """R = P_in (A (x) B) P_out: random rotations A (a x a), B (b x b), n = a*b,
    between a random input and output permutation (stored, since they are random)."""

    def __init__(self, n, generator=None):
        super().__init__(n)
        a, b = kron_factor_sizes(n)
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.register_buffer("A", haar_special_orthogonal(a, g))
        self.register_buffer("B", haar_special_orthogonal(b, g))
        self.register_buffer("perm_in", torch.randperm(n, generator=g))
        self.register_buffer("perm_out", torch.randperm(n, generator=g))

    def _core(self, x, A, B):
        X = x.reshape(*x.shape[:-1], A.shape[0], B.shape[0])
        return (A.to(x).T @ X @ B.to(x)).reshape(x.shape)

    def transform(self, x):
        y = self._core(x[..., self.perm_in], self.A, self.B)
        return y[..., self.perm_out]

    def inverse_transform(self, x):
        z = torch.empty_like(x)
        z[..., self.perm_out] = x
        y = self._core(z, self.A.T, self.B.T)
        out = torch.empty_like(x)
        out[..., self.perm_in] = y
        return out


def make_had_processor(m, n, generator):
    """Random signs (SU first, then SV) and normalized Hadamards on both sides."""
    SU = random_signs(n, generator)
    SV = random_signs(m, generator)
    return IncoherenceProcessor("had", SU, SV, HadamardRotation(n), HadamardRotation(m))


def make_kron_processor(m, n, generator):
    """Random Kronecker rotations on both sides; the signs are all +1 (the rotations are
    random already)."""
    return IncoherenceProcessor("kron", torch.ones(n), torch.ones(m),
                                KronRotation(n, generator), KronRotation(m, generator))
