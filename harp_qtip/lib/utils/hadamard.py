"""Hadamard matrices and the fast normalized Hadamard transform.

Supported orders n are powers of two (Sylvester) and n = K * 2^j, where a
base Hadamard matrix of order K comes from one of
  * Paley I:  K = q + 1 for a prime power q = 3 (mod 4),
  * Paley II: K = 2(q + 1) for a prime power q = 1 (mod 4),
  * Goethals-Seidel: K = 4v for v with embedded sequences (29, 39, 43).
The order-n matrix is H_K (x) H_p with p = 2^j and H_p in Sylvester natural
order, so H_K acts on the outer index of a vector viewed as a K x p matrix.
"""
import functools
import itertools
import math
import operator

import numpy as np
import torch

from lib.utils.errors import UserInputError

try:
    from fast_hadamard_transform import hadamard_transform as _cuda_fwht
except ImportError:
    _cuda_fwht = None

_CUDA_FWHT_MAX_DIM = 32768  # largest length fast_hadamard_transform accepts

# Goethals-Seidel sequences (A, B, C, D) of length v: the sums of their periodic
# autocorrelations vanish at every nonzero shift. Output of
# `python tools/search_gs_sequences.py 29 39 43` (29: annealing, tools/gs_search.c;
# 39, 43: exact search over multiplier orbits); the tests verify the matrices.
_GS_SEQUENCES = {
    29: (
        "++-+++-+-+---++-++++----+++--",
        "+++++-+--++-+--+-++-+++--+---",
        "++++-+++--+-+-+-++--++++--+-+",
        "+++++-++-+-+-++-----++--+++++",
    ),
    39: (
        "--++-+-+++-+++-----++-----+++-+++-+-++-",
        "---++-+++++++--+-++-+--+-+-+--+---+-+++",
        "+-+-++-++-++-----+-+++-+++--+--++++--++",
        "+++--+-++--++-+-+--++++-+---++++++++++-",
    ),
    43: (
        "++-++++---+++---+--+++-++------+-+-+-++-++-",
        "++--+--+-+-+-++++++--+---++-+++---+++----+-",
        "+-----++-++--+++-++----++++-++++--+-+-+-+--",
        "---+-+++-++-++++-++++--++++-++++-++-+++-+--",
    ),
}


def _check_order(n) -> int:
    try:
        n = operator.index(n)
    except TypeError:
        raise UserInputError(
            f"Hadamard dimension must be an integer, got {n!r}; pass the layer width as an int"
        ) from None
    if n < 1:
        raise UserInputError(f"Hadamard dimension must be positive, got n={n}")
    return n


def _split_two_power(n: int) -> tuple[int, int]:
    """(odd, e) with n = odd * 2^e."""
    e = (n & -n).bit_length() - 1
    return n >> e, e


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _construction(order: int) -> str | None:
    """Name of a construction giving a Hadamard matrix of this order, or None."""
    q = order - 1
    if q % 4 == 3 and _prime_power(q):
        return "paley1"
    q = order // 2 - 1
    if order % 2 == 0 and q % 4 == 1 and _prime_power(q):
        return "paley2"
    if order % 4 == 0 and order // 4 in _GS_SEQUENCES:
        return "goethals_seidel"
    return None


def _base_order(odd: int, e: int) -> int | None:
    """Smallest constructible 2^j * odd with 2 <= j <= e, or None."""
    return next((odd << j for j in range(2, e + 1) if _construction(odd << j)), None)


def _supported_base_orders(limit: int = 200) -> list[int]:
    return [k for k in range(12, limit + 1, 4) if _base_order(*_split_two_power(k)) == k]


@functools.lru_cache(maxsize=None)
def hadamard_factor(n: int) -> tuple[int, int]:
    """(K, p) with n = K * p, p a power of two and K the base order used.

    K = 1 for powers of two; otherwise K = 2^j * odd for the smallest j >= 2
    that some construction reaches. Raises UserInputError when none does.
    """
    n = _check_order(n)
    odd, e = _split_two_power(n)
    if odd == 1:
        return 1, n
    k = _base_order(odd, e)
    if k is not None:
        return k, n // k
    raise UserInputError(
        f"no Hadamard matrix construction for n={n} = {odd} * 2^{e}; supported: powers of two "
        f"and K*2^j for base orders K in {_supported_base_orders()} (and larger Paley orders). "
        f"Pad or choose a supported dimension, or use --incoh_mode kron"
    )


def is_supported_dim(n) -> bool:
    """True when hadamard_matrix(n) / hadamard_transform on length n work."""
    try:
        hadamard_factor(n)
    except UserInputError:
        return False
    return True


# ---------------------------------------------------------------------------
# Small finite fields GF(p^k). An element is coded as the integer whose base-p
# digits are its polynomial coefficients (lowest degree first).


def _poly_rem(a: list[int], b: list[int], p: int) -> list[int]:
    """Remainder of a modulo the monic b over GF(p); coefficient lists, low degree first."""
    a = list(a)
    while len(a) >= len(b):
        lead, shift = a[-1], len(a) - len(b)
        for i, coef in enumerate(b):
            a[shift + i] = (a[shift + i] - lead * coef) % p
        a.pop()
    return a


def _monic_polys(p: int, degree: int):
    for low in itertools.product(range(p), repeat=degree):
        yield list(low) + [1]


def _irreducible_poly(p: int, k: int) -> list[int]:
    """First monic degree-k polynomial over GF(p) with no monic factor of degree <= k/2."""
    for f in _monic_polys(p, k):
        if all(
            any(_poly_rem(f, g, p)) for d in range(1, k // 2 + 1) for g in _monic_polys(p, d)
        ):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


def _field_digits(p: int, k: int) -> np.ndarray:
    """(q, k) array: row c holds the base-p digits of element code c."""
    codes = np.arange(p**k)
    return np.stack([(codes // p**i) % p for i in range(k)], axis=1)


def _field_squares(p: int, k: int) -> np.ndarray:
    """Codes of x*x for every element x of GF(p^k), computed modulo an irreducible f."""
    digits = _field_digits(p, k)
    prod = np.zeros((p**k, 2 * k - 1), dtype=np.int64)
    for i in range(k):
        for j in range(k):
            prod[:, i + j] += digits[:, i] * digits[:, j]
    f = np.array(_irreducible_poly(p, k)[:k])
    for deg in range(2 * k - 2, k - 1, -1):
        prod[:, deg - k : deg] -= prod[:, deg : deg + 1] * f
    return (prod[:, :k] % p) @ (p ** np.arange(k))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(x_i - x_j) over GF(q), chi the quadratic character (chi(0) = 0)."""
    p, k = _prime_power(q)
    chi = -np.ones(q, dtype=np.int64)
    chi[_field_squares(p, k)] = 1
    chi[0] = 0
    digits = _field_digits(p, k)
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[diff @ (p ** np.arange(k))]


# ---------------------------------------------------------------------------
# Base constructions; each returns an int64 numpy matrix.


def _paley1(order: int) -> np.ndarray:
    """Paley I: S = [[0, 1^T], [-1, Q]] is skew with S S^T = qI, so H = I + S."""
    q = order - 1
    s = np.zeros((order, order), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(order, dtype=np.int64) + s


def _paley2(order: int) -> np.ndarray:
    """Paley II: C = [[0, 1^T], [1, Q]] is a symmetric conference matrix (C^2 = qI);
    H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]."""
    q = order // 2 - 1
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    return np.kron(c, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]])


def _circulant(row: np.ndarray) -> np.ndarray:
    v = len(row)
    idx = (np.arange(v)[None, :] - np.arange(v)[:, None]) % v
    return row[idx]


def _goethals_seidel(order: int) -> np.ndarray:
    """Goethals-Seidel array from circulants A, B, C, D with sum X X^T = 4vI, R back-identity:
    [[A, BR, CR, DR], [-BR, A, D'R, -C'R], [-CR, -D'R, A, B'R], [-DR, C'R, -B'R, A]]."""
    seqs = _GS_SEQUENCES[order // 4]
    a, b, c, d = (_circulant(np.array([1 if ch == "+" else -1 for ch in s])) for s in seqs)
    r = np.eye(len(seqs[0]), dtype=np.int64)[::-1]
    return np.block(
        [
            [a, b @ r, c @ r, d @ r],
            [-b @ r, a, d.T @ r, -c.T @ r],
            [-c @ r, -d.T @ r, a, b.T @ r],
            [-d @ r, c.T @ r, -b.T @ r, a],
        ]
    )


_BUILDERS = {"paley1": _paley1, "paley2": _paley2, "goethals_seidel": _goethals_seidel}


@functools.lru_cache(maxsize=None)
def _base_matrix(order: int) -> torch.Tensor:
    """Cached int8 Hadamard matrix of a base order (1 or a K from hadamard_factor)."""
    if order == 1:
        return torch.ones(1, 1, dtype=torch.int8)
    return torch.from_numpy(_BUILDERS[_construction(order)](order).astype(np.int8))


def _sylvester(p: int, dtype: torch.dtype) -> torch.Tensor:
    """Sylvester natural order: H_1 = [1], H_2m = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unnormalized n x n Hadamard matrix H_K (x) H_p (entries +-1, H H^T = nI)."""
    k, p = hadamard_factor(n)
    return torch.kron(_base_matrix(k).to(dtype), _sylvester(p, dtype))


# ---------------------------------------------------------------------------
# Fast normalized transform.


@functools.lru_cache(maxsize=64)
def base_operator(order: int, transpose: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The K x K base matrix H_K of hadamard_transform (its transpose when `transpose`)."""
    h = _base_matrix(order).to(device=device, dtype=dtype)
    return (h.T if transpose else h).contiguous()


def _fwht(y: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * y @ H_p on the last dim (length p a power of two), Sylvester natural order."""
    p = y.shape[-1]
    if _cuda_fwht is not None and y.is_cuda and y.dtype == torch.float32 and p <= _CUDA_FWHT_MAX_DIM:
        return _cuda_fwht(y.contiguous(), scale)
    lead = y.shape[:-1]
    h = 1
    while h < p:
        y = y.reshape(*lead, p // (2 * h), 2, h)
        top, bottom = y[..., 0, :], y[..., 1, :]
        y = torch.stack((top + bottom, top - bottom), dim=-2)
        h *= 2
    return y.reshape(*lead, p) * scale


def hadamard_transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Normalized transform U_n = (H_K (x) H_p) / sqrt(n) on the last dim of x.

    transpose=False returns U_n v for every vector v (x @ U_n^T); transpose=True
    returns U_n^T v (x @ U_n). Computed in float32 (float64 for float64 input)
    with a butterfly over the p-blocks and a K x K matmul; returns x's dtype.
    """
    if not torch.is_floating_point(x):
        raise UserInputError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    k, p = hadamard_factor(n)
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = _fwht(x.to(work_dtype).reshape(*x.shape[:-1], k, p), 1.0 / math.sqrt(n))
    if k > 1:
        y = base_operator(k, transpose, y.device, work_dtype) @ y
    return y.reshape(x.shape).to(x.dtype)
