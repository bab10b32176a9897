"""Incoherence processors: orthogonality, exact inverses, proxy-loss invariance."""
import pytest
import torch

from lib.incoherence import INCOH_MODES, empty_processor, make_processor
from lib.incoherence.rht import HadamardRotation, KronRotation, kron_factor_sizes
from lib.utils.errors import UserInputError
from lib.utils.hadamard import hadamard_matrix


def dense(rotation, n):
    return rotation.transform(torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [64, 96, 192, 576, 960, 1536])
def test_hadamard_rotation_is_normalized_kron_hadamard(n):
    rotation = HadamardRotation(n)
    R = dense(rotation, n)
    torch.testing.assert_close(R.T @ R, torch.eye(n, dtype=torch.float64), atol=1e-5, rtol=0)
    # QuIP#: U_n = (H_K (x) H_{n/K}) / sqrt(n) and W' = W U_n, i.e. transform(x) = x U_n.
    from lib.utils.hadamard import hadamard_factor
    K, p = hadamard_factor(n)
    U = torch.kron(hadamard_matrix(K, dtype=torch.float64), hadamard_matrix(p, dtype=torch.float64)) / n ** 0.5
    torch.testing.assert_close(R, U, atol=1e-5, rtol=0)


def test_kron_factor_sizes_match_quip():
    assert kron_factor_sizes(4096) == (64, 64)
    assert kron_factor_sizes(11008) == (688, 16)
    assert kron_factor_sizes(7) == (7, 1)


@pytest.mark.parametrize("n", [8, 96, 576])
def test_kron_rotation_orthogonal_and_inverse(n):
    rotation = KronRotation(n, torch.Generator().manual_seed(1))
    R = dense(rotation, n)
    torch.testing.assert_close(R.T @ R, torch.eye(n, dtype=torch.float64), atol=1e-5, rtol=0)
    x = torch.randn(5, n)
    torch.testing.assert_close(rotation.inverse_transform(rotation.transform(x)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotation.inverse_transform(x), x @ R.float().T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", INCOH_MODES)
@pytest.mark.parametrize("m,n", [(96, 64), (960, 576)])
def test_processor_roundtrip_and_invariance(mode, m, n):
    g = torch.Generator().manual_seed(0)
    proc = make_processor(mode, m, n, g).double()
    tol = 1e-9 if mode == "had" else 1e-5   # kron factors and HARP mixers are float32
    W = torch.randn(m, n, dtype=torch.float64, generator=g)
    X = torch.randn(4 * n, n, dtype=torch.float64, generator=g)
    H = X.T @ X / X.shape[0]
    Wp, Hp = proc.process_weight(W), proc.process_hessian(H)
    torch.testing.assert_close(proc.restore_weight(Wp), W, atol=tol, rtol=0)
    # tr(E H E^T) is invariant: E' = process_weight(E) for any error E.
    E = torch.randn(m, n, dtype=torch.float64, generator=g)
    Ep = proc.process_weight(E)
    assert torch.allclose(torch.sum((E @ H) * E), torch.sum((Ep @ Hp) * Ep), rtol=tol)
    # Inference path: output_transform(input_transform(x) W'^T) == x W^T.
    x = torch.randn(3, n, dtype=torch.float64, generator=g)
    y = proc.output_transform(proc.input_transform(x) @ Wp.T)
    torch.testing.assert_close(y, x @ W.T, atol=tol * n, rtol=0)


def test_had_signs_are_random_and_seeded():
    p1 = make_processor("had", 64, 96, torch.Generator().manual_seed(3))
    p2 = make_processor("had", 64, 96, torch.Generator().manual_seed(3))
    assert torch.equal(p1.SU, p2.SU) and torch.equal(p1.SV, p2.SV)
    assert set(p1.SU.tolist()) == {-1.0, 1.0}


def test_empty_processor_receives_state():
    proc = make_processor("kron", 64, 96, torch.Generator().manual_seed(0))
    other = empty_processor(proc.config(), 64, 96)
    other.load_state_dict(proc.state_dict())
    x = torch.randn(2, 96)
    torch.testing.assert_close(other.input_transform(x), proc.input_transform(x))


def test_unknown_mode_and_unsupported_dimension():
    with pytest.raises(UserInputError, match="incoh_mode"):
        make_processor("nope", 64, 64, torch.Generator())
    with pytest.raises(UserInputError, match="188"):
        make_processor("had", 64, 188, torch.Generator())
