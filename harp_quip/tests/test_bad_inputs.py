"""Bad inputs fail with one clear error that names the problem and the fix, and leave
existing outputs untouched.

Command-line cases go through `run_cli` (exit status 2 and exactly one ERROR log line,
matched against the problem and the fix) or argparse (exit status 2, usage message);
library cases raise UserInputError. Cases already covered elsewhere (e.g.
test_pipeline.py::test_bad_flags_fail_before_any_work: unknown --codebook /
--incoh_mode / --harp_fixed_mixer, --harp_guard without --harp_holdout_path,
--layer_idx past the last layer; test_eval_ppl: --seqlen 1; test_eval_zeroshot:
empty --tasks) are not repeated here.
"""
import re
import shutil

import pytest
import torch

from eval import eval_ppl, eval_zeroshot
from lib.algo.quip import LinearJob, QuantizeOptions, quantize_linears
from lib.utils.errors import UserInputError
from lib.utils.hessian import hessian_file, sym_to_flat
from model.quantized_llama import WEIGHTS_FILE
from quantize_llama import finetune_e2e_llama, hessian_offline_llama, hfize_llama, quantize_finetune_llama
from tiny_llama import (CTX, DEVSET, assert_same_codes, cli_fails, collect_hessians, folder_snapshot,
                        make_tiny_llama)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, its Hessians, a finished quantized folder and its export."""
    root = tmp_path_factory.mktemp("bad_inputs")
    base = make_tiny_llama(root / "base")
    hess = collect_hessians(base, root / "hess")
    done = root / "done"
    quantize_finetune_llama.main(quant_args(base, hess, done))
    hfize_llama.main(["--quantized_path", str(done), "--hf_output_path", str(root / "done_hf")])
    return {"root": root, "base": base, "hess": hess, "done": done, "done_hf": root / "done_hf"}


def quant_args(base, hess, save):
    return ["--base_model", str(base), "--device", "cpu", "--hessian_path", str(hess),
            "--save_path", str(save), "--quip_tune_iters", "0"]


def argparse_fails(capsys, main, argv, pattern):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert re.search(pattern, capsys.readouterr().err)


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def no_leftovers(folder):
    """No temporary file of an atomic write and no partial export next to or in `folder`."""
    assert not list(folder.parent.glob("*.partial")) and not list(folder.parent.glob("*.old"))
    if folder.exists():
        assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------
# quantize_finetune_llama: flags, rerun into an existing folder (must stay byte-identical)

EXISTING_FOLDER_CASES = {
    "layer_idx_with_resume_from_layer": (
        ["--layer_idx", "0", "--resume_from_layer", "1"],
        [r"--layer_idx selects one layer", r"drop --resume_from_layer"]),
    "layer_idx_with_stop_before_layer": (
        ["--layer_idx", "1", "--stop_before_layer", "2"],
        [r"--layer_idx selects one layer", r"drop --resume_from_layer/--stop_before_layer"]),
    "negative_layer_idx": (
        ["--layer_idx", "-2"], [r"--layer_idx must be a layer index >= 0", r"-1 for all layers"]),
    "resume_from_layer_past_the_end": (
        ["--resume_from_layer", "2"], [r"no layer in \[--resume_from_layer 2", r"2 layers"]),
    "valid_every_without_holdout": (
        ["--incoh_mode", "harp", "--harp_valid_every", "5"],
        [r"--harp_valid_every and --harp_guard need held-out Hessians", r"--holdout_size.*--harp_holdout_path"]),
    "missing_holdout_folder": (
        ["--incoh_mode", "harp", "--harp_holdout_path", "/nonexistent/holdout"],
        [r"--harp_holdout_path /nonexistent/holdout does not exist", r"--holdout_size"]),
    "nan_sigma_reg": (["--sigma_reg", "nan"], [r"--sigma_reg must be a finite number, got nan"]),
    "nan_scale_override": (["--scale_override", "nan"], [r"--scale_override must be a finite number"]),
    "nan_resid_scale_override": (
        ["--resid_scale_override", "nan"], [r"--resid_scale_override must be a finite number"]),
    "inf_harp_learning_rate": (
        ["--incoh_mode", "harp", "--harp_lr_u", "inf"], [r"--harp_lr_u must be a finite number"]),
    "negative_tune_iters": (["--quip_tune_iters", "-1"], [r"--quip_tune_iters must be >= 0, got -1"]),
    "missing_hessian_folder": (
        ["--hessian_path", "/nonexistent/hessians"],
        [r"--hessian_path /nonexistent/hessians does not exist", r"run hessian_offline_llama first"]),
    "rerun_with_other_settings": (
        ["--quip_tune_iters", "2", "--seed", "1"],
        [r"holds quantized layers made with other settings", r"'seed': \(0, 1\)",
         r"use a new output folder or delete the old files"]),
}


@pytest.mark.parametrize("case", sorted(EXISTING_FOLDER_CASES))
def test_quantize_refuses_and_keeps_the_existing_folder(world, tmp_path, caplog, case):
    flags, patterns = EXISTING_FOLDER_CASES[case]
    save = copy(world["done"], tmp_path / "q")
    before = folder_snapshot(save)
    cli_fails(caplog, quantize_finetune_llama.main, quant_args(world["base"], world["hess"], save) + flags,
              *patterns)
    assert folder_snapshot(save) == before
    no_leftovers(save)


# ---------------------------------------------------------------------------------------
# quantize_finetune_llama: bad Hessian files (fail before anything is written)

def _replace(folder, layer, site, data):
    torch.save(data, hessian_file(folder, layer, site))


def _foreign_file(folder):
    _replace(folder, 0, "up", {"model.embed_tokens.weight": torch.ones(4, 4)})


def _other_models_hessian(folder):
    _replace(folder, 0, "o", {"flatH": sym_to_flat(torch.eye(64)), "mu": torch.zeros(64), "n": 64, "ct": 10})


def _nan_hessian(folder):
    data = torch.load(hessian_file(folder, 0, "qkv"), weights_only=True)
    data["flatH"][3] = float("nan")
    _replace(folder, 0, "qkv", data)


def _missing_file(folder):
    hessian_file(folder, 1, "down").unlink()


def _truncated_file(folder):
    path = hessian_file(folder, 0, "down")
    path.write_bytes(path.read_bytes()[:200])


HESSIAN_CASES = {
    "foreign_pt_file_as_hessian": (_foreign_file, [r"0_up.pt is unreadable or not a Hessian file",
                                                   r"delete it and rerun hessian_offline_llama"]),
    "hessian_of_another_model": (_other_models_hessian, [r"0_o.pt is for input size 64.*input size is 96",
                                                         r"point --hessian_path at this model's Hessians"]),
    "nan_in_hessian_file": (_nan_hessian, [r"0_qkv.pt holds non-finite values", r"recompute the Hessians"]),
    "missing_hessian_file": (_missing_file, [r"1 Hessian file\(s\) are missing, e.g. .*1_down.pt",
                                             r"hessian_offline_llama"]),
    "truncated_hessian_file": (_truncated_file, [r"0_down.pt is unreadable or not a Hessian file",
                                                 r"rerun hessian_offline_llama"]),
}


@pytest.mark.parametrize("case", sorted(HESSIAN_CASES))
def test_quantize_refuses_bad_hessian_files_before_any_work(world, tmp_path, caplog, case):
    damage, patterns = HESSIAN_CASES[case]
    hess = copy(world["hess"], tmp_path / "hess")
    damage(hess)
    before = folder_snapshot(hess)
    cli_fails(caplog, quantize_finetune_llama.main, quant_args(world["base"], hess, tmp_path / "q"), *patterns)
    assert not (tmp_path / "q").exists()
    assert folder_snapshot(hess) == before


def test_non_positive_definite_hessian_names_the_linear(world, tmp_path, caplog):
    """A Hessian with a negative eigenvalue (positive diagonal) fails at its linear; the
    layers finished before it are kept (and equal those of a good run)."""
    hess = copy(world["hess"], tmp_path / "hess")
    H = torch.eye(192)
    H[0, 1] = H[1, 0] = 1.5   # eigenvalues -0.5 and 2.5 in that 2 x 2 block
    _replace(hess, 1, "down", {"flatH": sym_to_flat(H), "mu": torch.zeros(192), "n": 192, "ct": 512})
    save = tmp_path / "q"
    cli_fails(caplog, quantize_finetune_llama.main,
              quant_args(world["base"], hess, save) + ["--layer_batch", "1"],
              r"layer 1 site down \(.*1_down.pt\)", r"not positive definite",
              r"recompute the Hessians or raise --sigma_reg")
    assert sorted(p.name for p in save.glob("layer_*.pt")) == ["layer_000.pt"]
    assert_same_codes(save / "layer_000.pt", world["done"] / "layer_000.pt")   # other --layer_batch
    no_leftovers(save)


def test_unsupported_hadamard_dimension_fails_before_any_work(world, tmp_path, caplog):
    base = make_tiny_llama(tmp_path / "base376", hidden=376, heads=4, kv_heads=2, vocab_size=256)
    cli_fails(caplog, quantize_finetune_llama.main, quant_args(base, world["hess"], tmp_path / "q"),
              r"no Hadamard matrix construction for n=376 = 47 \* 2\^3",
              r"Pad or choose a supported dimension, or use --incoh_mode kron")
    assert not (tmp_path / "q").exists()


def test_missing_hessian_path_flag(capsys):
    argparse_fails(capsys, quantize_finetune_llama.main, ["--save_path", "x"],
                   r"the following arguments are required: --hessian_path")


# ---------------------------------------------------------------------------------------
# hfize_llama: damaged layer files and dangerous output paths (the old export survives)

def _truncate_layer(q):
    path = q / "layer_001.pt"
    path.write_bytes(path.read_bytes()[:1000])


def _incomplete_layer(q):
    record = torch.load(q / "layer_001.pt", weights_only=True)
    del record["linears"]["down"]
    torch.save(record, q / "layer_001.pt")


HFIZE_CASES = {
    "truncated_layer_file": (_truncate_layer, [r"layer_001.pt is unreadable",
                                               r"rerun quantize_finetune_llama with the same flags"]),
    "layer_file_without_all_sites": (_incomplete_layer, [r"layer_001.pt is not a complete quantized layer",
                                                         r"rerun quantize_finetune_llama"]),
}


@pytest.mark.parametrize("case", sorted(HFIZE_CASES))
def test_hfize_refuses_damaged_layers_and_keeps_the_old_export(world, tmp_path, caplog, case):
    damage, patterns = HFIZE_CASES[case]
    q = copy(world["done"], tmp_path / "q")
    damage(q)
    out = copy(world["done_hf"], tmp_path / "hf")
    before = folder_snapshot(out)
    cli_fails(caplog, hfize_llama.main, ["--quantized_path", str(q), "--hf_output_path", str(out)], *patterns)
    assert folder_snapshot(out) == before
    no_leftovers(out)


def test_hfize_refuses_a_folder_that_is_no_quantized_run(world, tmp_path, caplog):
    out = copy(world["done_hf"], tmp_path / "hf")
    before = folder_snapshot(out)
    cli_fails(caplog, hfize_llama.main, ["--quantized_path", str(world["hess"]), "--hf_output_path", str(out)],
              r"quant_config.json is missing", r"folder written by quantize_finetune_llama")
    assert folder_snapshot(out) == before


@pytest.mark.parametrize("target", ["quantized_path", "inside_quantized_path_parent", "base_model"])
def test_hfize_never_replaces_inputs_or_foreign_folders(world, tmp_path, caplog, target):
    """The export replaces its output folder as a whole: it must not be (or contain) the
    quantized run, nor an existing folder that is not an earlier export."""
    q = copy(world["done"], tmp_path / "runs" / "q")
    base = copy(world["base"], tmp_path / "base")
    out, patterns = {
        "quantized_path": (q, [r"would replace the input", r"choose a separate output folder"]),
        "inside_quantized_path_parent": (tmp_path / "runs", [r"would replace the input"]),
        "base_model": (base, [r"exists and is not an earlier quantized export",
                              r"choose another path or delete it yourself"]),
    }[target]
    before = folder_snapshot(tmp_path)
    cli_fails(caplog, hfize_llama.main, ["--quantized_path", str(q), "--hf_output_path", str(out)], *patterns)
    assert folder_snapshot(tmp_path) == before


def test_missing_quantized_path_flag(capsys):
    argparse_fails(capsys, hfize_llama.main, ["--hf_output_path", "x"],
                   r"the following arguments are required: --quantized_path")


def test_missing_hf_path_flag_of_finetune_e2e(capsys):
    argparse_fails(capsys, finetune_e2e_llama.main, ["--base_model", "x", "--hf_output_path", "y"],
                   r"the following arguments are required: --hf_path")


def test_eval_refuses_a_damaged_export(world, tmp_path, caplog):
    out = copy(world["done_hf"], tmp_path / "hf")
    weights = out / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:4096])
    result = tmp_path / "ppl.json"
    result.write_text("{}\n")
    cli_fails(caplog, eval_ppl.main, ["--hf_path", str(out), "--seqlen", str(CTX), "--limit", "1",
                                      "--device", "cpu", "--data_source", "local", "--output", str(result)],
              r"model.safetensors is damaged", r"rerun hfize_llama")
    assert result.read_text() == "{}\n"


def test_eval_ppl_checks_every_seqlen():
    with pytest.raises(UserInputError, match=r"--seqlen must be at least 2 \(one target\), got 0"):
        eval_ppl.main(["--seqlen", str(CTX), "0", "--device", "cpu"])


def test_zeroshot_refuses_negative_fewshot():
    with pytest.raises(UserInputError, match=r"--num_fewshot must be 0 or more, got -1"):
        eval_zeroshot.main(["--num_fewshot", "-1"])


# ---------------------------------------------------------------------------------------
# hessian_offline_llama: reruns into an existing Hessian folder

@pytest.mark.parametrize("flags,patterns", [
    (["--devset_size", "6"], [r"holds Hessians made with other settings", r"'devset_size': \(8, 6\)",
                              r"use a new output folder or delete the old files"]),
    (["--holdout_size", str(DEVSET)], [rf"--holdout_size {DEVSET} must be smaller than --devset_size {DEVSET}"]),
], ids=["other_settings", "holdout_not_smaller_than_devset"])
def test_hessian_rerun_refuses_and_keeps_the_files(world, tmp_path, caplog, flags, patterns):
    hess = copy(world["hess"], tmp_path / "hess")
    before = folder_snapshot(hess)
    argv = ["--base_model", str(world["base"]), "--device", "cpu", "--save_path", str(hess), "--devset_size",
            str(DEVSET), "--ctx_size", str(CTX), "--data_source", "local", "--batch_size", "4", *flags]
    cli_fails(caplog, hessian_offline_llama.main, argv, *patterns)
    assert folder_snapshot(hess) == before


# ---------------------------------------------------------------------------------------
# lib.algo.quip.quantize_linears: shapes and values

def _job(weights, H, name=None):
    return LinearJob(weights, H, torch.Generator().manual_seed(0), name=name)


def _nan(H):
    H = H.clone()
    H[2, 5] = float("nan")
    return H


def _inf(H):
    H = H.clone()
    H[1, 1] = float("inf")
    return H


W16 = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
LIBRARY_CASES = {
    "one_dimensional_weight": (lambda: _job([torch.randn(16)], torch.eye(16)),
                               r"weights must be a non-empty list of 2-D \(out x in\) tensors"),
    "fused_weights_of_different_input_sizes": (
        lambda: _job([torch.randn(8, 16), torch.randn(8, 24)], torch.eye(16)),
        r"fused weights must be 2-D with the same input size; got shapes \[\(8, 16\), \(8, 24\)\]"),
    "hessian_of_the_wrong_size": (lambda: _job([W16], torch.eye(24)),
                                  r"Hessian shape \(24, 24\) does not match the weight's input size 16: "
                                  r"pass the n x n Hessian"),
    "input_size_not_a_multiple_of_8": (lambda: _job([torch.randn(16, 12)], torch.eye(12)),
                                       r"16 x 12 linear: the input size must be a multiple of the "
                                       r"codebook's vector size 8"),
    "nan_hessian": (lambda: _job([W16], _nan(torch.eye(16)), name="layer 4 site o"),
                    r"^layer 4 site o: Hessian holds non-finite values \(NaN/Inf\); recompute it"),
    "inf_hessian": (lambda: _job([W16], _inf(torch.eye(16))), r"Hessian holds non-finite values"),
    "nan_weight": (lambda: _job([_nan(W16)], torch.eye(16)),
                   r"all zero or holds NaN/Inf; cannot quantize it \(check the base model's weights\)"),
    "zero_hessian": (lambda: _job([W16], torch.zeros(16, 16)),
                     r"non-positive mean diagonal \(0\).*recompute it"),
    "unsupported_hadamard_dimension": (lambda: _job([torch.randn(16, 376)], torch.eye(376)),
                                       r"no Hadamard matrix construction for n=376.*--incoh_mode kron"),
    "non_positive_definite_hessian": (
        lambda: _job([W16], torch.eye(16) + 1.5 * (torch.eye(16).roll(1, 0) + torch.eye(16).roll(-1, 0)),
                     name="layer 0 site up"),
        r"^layer 0 site up: the Hessian is not positive definite.*raise --sigma_reg"),
}


@pytest.mark.parametrize("case", sorted(LIBRARY_CASES))
def test_quantize_linears_rejects_bad_inputs(case):
    make_job, pattern = LIBRARY_CASES[case]
    with pytest.raises(UserInputError, match=pattern):
        quantize_linears([make_job()], QuantizeOptions(quip_tune_iters=0))
