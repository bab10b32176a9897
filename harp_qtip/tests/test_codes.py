"""Tests for lib.codebook.computed_codes: 1MAD, 3INST and HYB against the fact sheet's
definitions (hand-computed values and a pure-Python re-implementation), their
statistics, and the HYB table construction."""
import math
import struct

import numpy as np
import pytest
import torch
from scipy.cluster.vq import kmeans

from lib.codebook.computed_codes import (
    DECODE_MODES, build_hyb_tlut, get_code, hyb, hyb_index, inst3, mad1)
from lib.utils.errors import UserInputError

ALL16 = torch.arange(1 << 16)


def py_mad1(s):
    x = (s * 34038481 + 76625530) % 2**32
    return (sum((x >> (8 * i)) & 0xFF for i in range(4)) - 510) / 147.800537109375


def py_fp16(bits):
    return np.frombuffer(struct.pack("<H", bits), dtype=np.float16)[0]


def py_inst3(s):
    x = (s * 89226354 + 64248484) % 2**32
    y = (x & 0x8FFF8FFF) ^ 0x3B603B60
    return float(py_fp16(y >> 16) + py_fp16(y & 0xFFFF))


def test_mad1_hand_values():
    # s = 0: x = 76625530 = 0x04913A7A, bytes 122 + 54 + 145 + 4 = 325
    # s = 1: x = 110664011, bytes 75 + 153 + 152 + 6 = 386
    # s = 65535: x = 1700451241, bytes 169 + 211 + 90 + 101 = 571
    got = mad1(torch.tensor([0, 1, 65535]))
    assert got.shape == (3, 1) and got.dtype == torch.float32
    expected = torch.tensor([[325 - 510], [386 - 510], [571 - 510]]) / 147.800537109375
    torch.testing.assert_close(got, expected.float(), rtol=1e-7, atol=0)


def test_inst3_hand_values():
    # s = 0: x = 0x03D45AA4 -> 0x38B431C4 -> fp16 0x38B4 = 0.587890625, 0x31C4 = 0.18017578125
    # s = 1: x = 0x0925D716 -> 0x3245BC76 -> 0.1959228515625 + (-1.115234375)
    # s = 65535: x = 0x7AF4DE32 -> 0x3194B552 -> 0.17431640625 + (-0.33251953125)
    got = inst3(torch.tensor([0, 1, 65535]))
    assert got.shape == (3, 1) and got.dtype == torch.float32
    assert got.flatten().tolist() == [0.76806640625, -0.91943359375, -0.158203125]


@pytest.mark.parametrize("L", [16, 20])
def test_mad1_and_inst3_match_definition(L):
    states = torch.randint(0, 1 << L, (3000,), generator=torch.Generator().manual_seed(L))
    mad = mad1(states).flatten().tolist()
    inst = inst3(states).flatten().tolist()
    for s, m, i in zip(states.tolist(), mad, inst):
        assert m == pytest.approx(py_mad1(s), rel=1e-6, abs=1e-7)
        assert i == py_inst3(s)


def test_inst3_halves_in_range():
    x = (ALL16 * 89226354 + 64248484) & 0xFFFFFFFF
    y = (x & 0x8FFF8FFF) ^ 0x3B603B60
    for half in (y >> 16, y & 0xFFFF):
        mags = np.array([abs(float(py_fp16(h))) for h in half[::97].tolist()])
        assert mags.min() >= 0.125 and mags.max() < 2


def test_hyb_index_matches_definition():
    index, flip = hyb_index(ALL16, 9)
    assert (index[3], flip[3]) == (0, 0)          # h = 12
    assert (index[255], flip[255]) == (508, 1)    # h = 65280 = 0xFF00: bits 6-14 = 508, bit 15 set
    h = [(s + 1) * s for s in range(1 << 16)]
    assert index.tolist() == [(v >> 6) & 511 for v in h]
    assert flip.tolist() == [(v >> 15) & 1 for v in h]


def test_hyb_is_table_lookup_with_sign_flip():
    tlut = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    got = hyb(ALL16, tlut)
    index, flip = hyb_index(ALL16, 5)
    assert got.shape == (1 << 16, 2)
    assert torch.equal(got[:, 1], tlut[index, 1])
    assert torch.equal(got[:, 0], torch.where(flip.bool(), -tlut[index, 0], tlut[index, 0]))


def test_mad1_statistics():
    """A sum of 4 uniform bytes, standardised: mean 0, variance 1, kurtosis 3 - 6/20."""
    v = mad1(ALL16).double().flatten()
    assert abs(v.mean().item()) < 0.01
    assert abs(v.var(unbiased=False).item() - 1) < 0.01
    assert abs((v**4).mean().item() - 2.7) < 0.03
    assert get_code("1mad").rms(16) == pytest.approx(1.0, abs=0.01)


def test_inst3_statistics():
    """Mean ~0 and RMS ~1.24 (fact sheet section 2)."""
    v = inst3(ALL16).double().flatten()
    assert abs(v.mean().item()) < 0.01
    assert get_code("3inst").rms(16) == pytest.approx(1.24, abs=0.01)


@pytest.fixture(scope="module")
def small_tlut():
    return build_hyb_tlut(tlut_bits=8, seed=0, n_samples=1 << 14)


def test_hyb_statistics(small_tlut):
    """The table has population std sqrt(15/16). Over all 2^16 states the hash uses
    every table entry equally often, half of the time with the sign flip, so the code's
    first coordinate is exactly centred and the second has the table's mean."""
    assert small_tlut.shape == (256, 2) and small_tlut.dtype == torch.float32
    assert small_tlut.double().std(unbiased=False).item() == pytest.approx(math.sqrt(15 / 16), rel=1e-6)
    index, flip = hyb_index(ALL16, 8)
    assert (torch.bincount(index, minlength=256) == 256).all()
    assert (torch.bincount(index, weights=flip.double(), minlength=256) == 128).all()
    v = get_code("quantlut_sym", small_tlut).table(16).double()
    assert v.shape == (1 << 16, 2)
    assert abs(v[:, 0].mean().item()) < 1e-6
    assert v[:, 1].mean().item() == pytest.approx(small_tlut[:, 1].double().mean().item(), abs=1e-6)
    assert abs(v[:, 1].mean().item()) < 0.1
    assert v.pow(2).mean().sqrt().item() == pytest.approx(math.sqrt(15 / 16), abs=0.01)


def test_build_hyb_tlut_protocol():
    """Samples first, then initial centroids from one seeded generator; scipy k-means
    (thresh 1e-5) in float64; divided by the population std, times sqrt(15/16)."""
    gen = torch.Generator().manual_seed(3)
    samples = torch.randn(4096, 2, generator=gen).double().numpy()
    init = torch.randn(16, 2, generator=gen).double().numpy()
    centroids = torch.from_numpy(kmeans(samples, init, thresh=1e-5)[0])
    expected = (centroids / centroids.std(unbiased=False) * 0.9682458365518543).float()
    got = build_hyb_tlut(tlut_bits=4, seed=3, n_samples=4096)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, build_hyb_tlut(tlut_bits=4, seed=4, n_samples=4096))
    got.zero_()  # callers get a copy: the cached table is unchanged
    torch.testing.assert_close(build_hyb_tlut(tlut_bits=4, seed=3, n_samples=4096), expected)


def test_get_code():
    assert DECODE_MODES == ("1mad", "3inst", "quantlut_sym")
    assert (get_code("1mad").V, get_code("3inst").V) == (1, 1)
    tlut = torch.randn(512, 2)
    code = get_code("quantlut_sym", tlut)
    assert code.V == 2
    assert torch.equal(code.table(16), hyb(ALL16, tlut))
    with pytest.raises(UserInputError, match="unknown decode_mode"):
        get_code("2mad")
    with pytest.raises(UserInputError, match="needs its table"):
        get_code("quantlut_sym")
    with pytest.raises(UserInputError, match="shape"):
        get_code("quantlut_sym", torch.randn(500, 2))
    with pytest.raises(UserInputError, match="tlut_bits"):
        build_hyb_tlut(tlut_bits=16)
