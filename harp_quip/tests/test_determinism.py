"""--seed fixes everything random in the pipeline: on the CPU two runs with the same
seed write bit-identical tensors (calibration sampling and Hessians; signs, HARP's
initial theta and fitted rotations, codes; fine-tuning data), another seed changes the
signs. HARP's QR mixers are constants (MIXER_BASE_SEED), the same for every seed."""
import json

import pytest
import torch

from lib.incoherence.harp import StructuredRotation
from lib.utils.data import get_calibration_sequences
from lib.utils.hessian import SITES, hessian_file
from lib.utils.model_loading import load_tokenizer
from quantize_llama import quantize_finetune_llama
from tiny_llama import CTX, DEVSET, assert_same_tensors, collect_hessians, layer_tensors, make_tiny_llama

HARP = ["--incoh_mode", "harp", "--harp_steps", "3", "--harp_theta_init_scale", "0.05"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    base = make_tiny_llama(root / "base")
    return {"root": root, "base": base, "hess": collect_hessians(base, root / "hess"),
            "hess_again": collect_hessians(base, root / "hess_again"),
            "hess_seed1": collect_hessians(base, root / "hess_seed1", ["--seed", "1"])}


def quantize(dirs, name, seed, flags=()):
    out = dirs["root"] / name
    quantize_finetune_llama.main(["--base_model", str(dirs["base"]), "--device", "cpu",
                                  "--hessian_path", str(dirs["hess"]), "--save_path", str(out),
                                  "--quip_tune_iters", "1", "--seed", str(seed), *flags])
    return out


def test_hessian_collection_is_deterministic(dirs):
    for layer in (0, 1):
        for site in SITES:
            a = torch.load(hessian_file(dirs["hess"], layer, site), weights_only=True)
            b = torch.load(hessian_file(dirs["hess_again"], layer, site), weights_only=True)
            c = torch.load(hessian_file(dirs["hess_seed1"], layer, site), weights_only=True)
            assert a.keys() == b.keys()
            for key in ("flatH", "mu"):
                assert torch.equal(a[key], b[key]), (layer, site, key)
            assert (a["n"], a["ct"]) == (b["n"], b["ct"])
            assert not torch.equal(a["flatH"], c["flatH"])   # --seed draws other sequences


def test_calibration_and_finetuning_data_follow_the_seed():
    tokenizer = load_tokenizer("smollm2-135m")
    a, _ = get_calibration_sequences(tokenizer, "wikitext2", DEVSET, CTX, seed=0, source="local")
    b, _ = get_calibration_sequences(tokenizer, "wikitext2", DEVSET, CTX, seed=0, source="local")
    c, _ = get_calibration_sequences(tokenizer, "wikitext2", DEVSET, CTX, seed=1, source="local")
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("mode,flags", [("had", []), ("harp", HARP)], ids=["had", "harp"])
def test_same_seed_gives_identical_layers_another_seed_other_signs(dirs, mode, flags):
    first, second = quantize(dirs, f"{mode}_a", 0, flags), quantize(dirs, f"{mode}_b", 0, flags)
    other = quantize(dirs, f"{mode}_seed1", 1, flags + ["--layer_idx", "0"])
    for i in (0, 1):
        assert_same_tensors(first / f"layer_{i:03d}.pt", second / f"layer_{i:03d}.pt")
    ours, theirs = layer_tensors(first / "layer_000.pt"), layer_tensors(other / "layer_000.pt")
    for site in SITES:
        for signs in ("SU", "SV"):
            key = f"/linears/{site}/state/processor.{signs}"
            # SV holds the signs times positive scales: compare the signs only
            assert not torch.equal(ours[key].sign(), theirs[key].sign()), key
        assert not torch.equal(ours[f"/linears/{site}/state/Qidxs"], theirs[f"/linears/{site}/state/Qidxs"])
    if mode == "harp":
        thetas = [key for key in ours if ".theta." in key]
        assert thetas and all(not torch.equal(ours[key], theirs[key]) for key in thetas)
    # layers draw different signs from one seed (layer index + 1000003 * seed)
    layer1 = layer_tensors(first / "layer_001.pt")
    assert not torch.equal(ours["/linears/o/state/processor.SU"], layer1["/linears/o/state/processor.SU"])


def test_harp_init_follows_the_generator_and_qr_mixers_are_constant():
    """96 = 8 * 6 * 2: the radix-6 stage uses a QR mixer (not a Hadamard)."""
    def rotation(seed):
        return StructuredRotation(96, theta_init_scale=0.1, generator=torch.Generator().manual_seed(seed))

    a, b, c = rotation(0), rotation(0), rotation(1)
    assert a.schedule == [8, 6, 2]
    for x, y in zip(a.theta, b.theta):
        assert torch.equal(x, y)
    assert all(not torch.equal(x, y) for x, y in zip(a.theta, c.theta))
    assert torch.equal(a.mixer_6, c.mixer_6) and not torch.equal(a.mixer_6, torch.eye(6))


def test_finetuned_quantization_is_deterministic(dirs):
    """Intra-layer fine-tuning: the data (drawn with --seed) and the Adam steps repeat."""
    flags = ["--layer_idx", "1", "--quip_tune_iters", "0", "--ft_epochs", "2", "--devset_size", "6",
             "--ctx_size", str(CTX), "--ft_valid_size", "2", "--ft_bs", "2", "--ft_update_freq", "1",
             "--ft_lr", "1e-4", "--ft_susv_lr", "1e-3", "--ft_data_source", "local"]
    first, second = quantize(dirs, "ft_a", 0, flags), quantize(dirs, "ft_b", 0, flags)
    log = json.loads((first / "layer_001.json").read_text())
    assert any(result["best_epoch"] >= 1 for result in log["finetune"].values())   # tuning was kept
    assert_same_tensors(first / "layer_001.pt", second / "layer_001.pt")
