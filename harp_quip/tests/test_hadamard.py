import math

import pytest
import torch

from lib.utils import hadamard as hd
from lib.utils.errors import UserInputError

BASE_ORDERS = [12, 20, 28, 36, 52, 60, 108, 116, 124, 140, 156, 172]
# Llama-2 7B/13B/70B, Llama-3 and SmolLM2 widths.
MODEL_DIMS = [
    11008, 12288, 22016, 5120, 13824, 15360, 27648, 28672,
    10240, 57344, 3072, 14336, 576, 960, 1536, 192,
]
POWERS_OF_TWO = [2**k for k in range(13)]
UNSUPPORTED = [6, 10, 18, 188, 7]


def assert_hadamard(h: torch.Tensor):
    h = h.to(torch.float64)  # exact: entries and row products are small integers
    n = h.shape[0]
    assert h.shape == (n, n)
    assert bool(((h == 1) | (h == -1)).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def dense_transform(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    n = x.shape[-1]
    u = hd.hadamard_matrix(n, dtype=torch.float64) / math.sqrt(n)
    return x.double() @ (u if transpose else u.T)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("k", BASE_ORDERS)
def test_base_orders_are_hadamard(k):
    assert hd.hadamard_factor(k) == (k, 1)
    assert_hadamard(hd.hadamard_matrix(k, dtype=torch.int64))


@pytest.mark.parametrize("n", MODEL_DIMS + POWERS_OF_TWO)
def test_factor_of_model_dims(n):
    k, p = hd.hadamard_factor(n)
    assert k * p == n
    assert p & (p - 1) == 0
    assert k in BASE_ORDERS or k == 1
    assert hd.is_supported_dim(n)
    assert_hadamard(hd.hadamard_matrix(k))


@pytest.mark.parametrize("n", [192, 576, 960, 1536])
def test_full_matrix_is_hadamard(n):
    assert_hadamard(hd.hadamard_matrix(n, dtype=torch.float64))


@pytest.mark.parametrize("k", range(7))
def test_sylvester_natural_order(k):
    n = 2**k
    idx = torch.arange(n)
    popcount = torch.tensor([[bin(i & j).count("1") for j in range(n)] for i in range(n)])
    assert torch.equal(hd.hadamard_matrix(n, dtype=torch.int64), (-1) ** popcount)
    assert torch.equal(hd.hadamard_matrix(n)[idx, 0], torch.ones(n))


def test_matrix_is_a_fresh_copy():
    h = hd.hadamard_matrix(12)
    h.zero_()
    assert_hadamard(hd.hadamard_matrix(12))


def test_dtype_argument():
    assert hd.hadamard_matrix(20, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert hd.hadamard_matrix(64, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("n", [1, 2, 8, 64, 1024, 4096, 192, 576, 960, 1536, 3072, 11008])
@pytest.mark.parametrize("transpose", [False, True])
def test_transform_matches_dense(n, transpose):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
    y = hd.hadamard_transform(x, transpose=transpose)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert relative_error(y, dense_transform(x, transpose)) < 1e-5


@pytest.mark.parametrize("n", [12, 5120, 2048])
def test_transform_roundtrip_and_norm(n):
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(0))
    y = hd.hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(hd.hadamard_transform(y, transpose=True), x, rtol=1e-5, atol=1e-5)
    y_t = hd.hadamard_transform(x, transpose=True)
    torch.testing.assert_close(hd.hadamard_transform(y_t), x, rtol=1e-5, atol=1e-5)


def test_transpose_differs_for_non_symmetric_base():
    x = torch.randn(4, 172 * 4, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(hd.hadamard_transform(x), hd.hadamard_transform(x, transpose=True))


def test_transform_dtypes():
    x = torch.randn(5, 960, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = hd.hadamard_transform(x)
    assert y.dtype == torch.float64
    assert relative_error(y, dense_transform(x, False)) < 1e-12
    y16 = hd.hadamard_transform(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert relative_error(y16, dense_transform(x, False)) < 1e-2
    with pytest.raises(UserInputError):
        hd.hadamard_transform(torch.ones(8, dtype=torch.int64))


def test_transform_of_non_contiguous_input():
    x = torch.randn(192, 6, generator=torch.Generator().manual_seed(3)).T
    assert relative_error(hd.hadamard_transform(x), dense_transform(x, False)) < 1e-5


@pytest.mark.parametrize("n", UNSUPPORTED)
def test_unsupported_dims_raise(n):
    pattern = rf"\bn={n}\b"
    with pytest.raises(UserInputError, match=pattern):
        hd.hadamard_factor(n)
    with pytest.raises(UserInputError, match=pattern):
        hd.hadamard_matrix(n)
    with pytest.raises(UserInputError, match=pattern):
        hd.hadamard_transform(torch.zeros(2, n))
    assert not hd.is_supported_dim(n)


@pytest.mark.parametrize("bad", [0, -4, 2.5])
def test_bad_dimension_values(bad):
    with pytest.raises(UserInputError):
        hd.hadamard_factor(bad)
    assert not hd.is_supported_dim(bad)


def test_generalizes_beyond_the_table():
    assert hd.hadamard_factor(44 * 8) == (44, 8)  # Paley I, q = 43
    assert hd.hadamard_factor(76) == (76, 1)  # Paley II, q = 37
    assert hd.hadamard_factor(47 * 16) == (47 * 16, 1)  # Paley I, q = 751
    assert not hd.is_supported_dim(47 * 8)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [64, 4096, 192, 11008, 14336, 57344])
def test_cuda_matches_cpu(n):
    x = torch.randn(7, n, generator=torch.Generator().manual_seed(4))
    for transpose in (False, True):
        ref = hd.hadamard_transform(x, transpose=transpose)
        y = hd.hadamard_transform(x.cuda(), transpose=transpose)
        assert y.is_cuda and y.dtype == torch.float32
        assert relative_error(y.cpu(), ref.double()) < 1e-5
        y16 = hd.hadamard_transform(x.cuda().half(), transpose=transpose)
        assert y16.dtype == torch.float16
        assert relative_error(y16.cpu(), ref.double()) < 1e-2
