"""Second-moment (Hessian) statistics of linear-layer inputs, in QuIP#'s file format.

A file `{layer}_{site}.pt` holds, all float32: `flatH` = lower triangle (row-major
tril order) of the CENTERED second moment H_c = S/ct - mu mu^T, `mu` = the mean,
`n`, `ct` = number of tokens. The proxy Hessian used for quantization is the
UNCENTERED second moment H = H_c + mu mu^T = E[x x^T].
"""
from pathlib import Path

import torch

from lib.utils.errors import UserInputError

SITES = ("qkv", "o", "up", "down")


def sym_to_flat(H):
    n = H.shape[0]
    rows, cols = torch.tril_indices(n, n)
    return H[rows, cols]


def flat_to_sym(flat, n):
    rows, cols = torch.tril_indices(n, n)
    H = torch.zeros(n, n, dtype=flat.dtype, device=flat.device)
    H[rows, cols] = flat
    H[cols, rows] = flat
    return H


class SecondMomentAccumulator:
    """Accumulates S = sum x x^T, s = sum x and the token count in float64."""

    def __init__(self, n, device):
        self.S = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.s = torch.zeros(n, dtype=torch.float64, device=device)
        self.ct = 0

    def add(self, x):
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.S.addmm_(x.T, x)
        self.s += x.sum(0)
        self.ct += x.shape[0]

    def to_file_dict(self):
        mu = self.s / self.ct
        centered = self.S / self.ct - torch.outer(mu, mu)
        return {
            "flatH": sym_to_flat(centered).float().cpu(),
            "mu": mu.float().cpu(),
            "n": self.S.shape[0],
            "ct": self.ct,
        }


def hessian_file(hessian_path, layer_idx, site):
    return Path(hessian_path) / f"{layer_idx}_{site}.pt"


def load_hessian(hessian_path, layer_idx, site, expected_n):
    """Uncentered second moment E[x x^T] (float64) of one site, validated."""
    return load_hessian_and_count(hessian_path, layer_idx, site, expected_n)[0]


def without_tokens(H_all, ct_all, H_part, ct_part):
    """Second moment of the tokens of H_all that are not in H_part (a subset of them)."""
    if ct_part >= ct_all:
        raise UserInputError(f"the held-out Hessian has {ct_part} tokens, not fewer than the full "
                             f"Hessian's {ct_all}: they do not belong together")
    return (ct_all * H_all - ct_part * H_part) / (ct_all - ct_part)


def load_hessian_and_count(hessian_path, layer_idx, site, expected_n):
    """(E[x x^T] float64, number of tokens) of one site, validated."""
    path = hessian_file(hessian_path, layer_idx, site)
    if not path.exists():
        raise UserInputError(
            f"Hessian file {path} is missing: run `python -m quantize_llama.hessian_offline_llama` "
            f"for this model first, or point --hessian_path at the folder that holds it")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        n, flat, mu = int(data["n"]), data["flatH"], data["mu"]
    except Exception as err:
        raise UserInputError(
            f"Hessian file {path} is unreadable or not a Hessian file ({err}); "
            f"delete it and rerun hessian_offline_llama") from err
    if n != expected_n or flat.numel() != n * (n + 1) // 2 or mu.numel() != n:
        raise UserInputError(
            f"Hessian file {path} is for input size {n}, but the layer's input size is {expected_n}: "
            f"the Hessians belong to another model; point --hessian_path at this model's Hessians")
    H = flat_to_sym(flat.to(torch.float64), n) + torch.outer(mu.to(torch.float64), mu.to(torch.float64))
    if not torch.isfinite(H).all():
        raise UserInputError(
            f"Hessian file {path} holds non-finite values (NaN/Inf): the calibration forward "
            f"overflowed; recompute the Hessians (e.g. with --dtype float32)")
    return H, int(data["ct"])


def regularize_hessian(H, sigma_reg, name="Hessian"):
    """QuIP# damping: H <- H / mean(diag H); H_ii += sigma_reg."""
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise UserInputError(f"{name} must be a square matrix, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise UserInputError(f"{name} holds non-finite values (NaN/Inf); recompute it")
    mean_diag = H.diagonal().mean()
    if not mean_diag > 0:
        raise UserInputError(
            f"{name} has a non-positive mean diagonal ({mean_diag.item():.3g}): it is not a second "
            f"moment of real activations; recompute it")
    H = H / mean_diag
    H = (H + H.T) / 2
    H.diagonal().add_(sigma_reg)
    return H
