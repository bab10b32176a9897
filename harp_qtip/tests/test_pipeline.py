"""A tiny random Llama through QTIP's pipeline: Hessians -> quantize (had and harp, the
trellis quantizer at small L) -> hfize -> eval_ppl, the mirrored stages run unchanged
with the trellis codebook."""
import json
import os

import pytest
import torch

from eval import eval_ppl, results_table
from lib.codebook.trellis import is_tailbiting, unpack
from lib.utils.data import get_eval_windows
from lib.utils.errors import UserInputError
from lib.utils.model_loading import load_base_model
from model.quantized_llama import load_quantized_model, quantized_linears
from quantize_llama import hfize_llama, quantize_finetune_llama
from tiny_llama import CTX, collect_hessians, make_tiny_llama

# a small trellis (2^10 states) with the HYB code and a 64-point table: fast on a CPU
TRELLIS = ["--L", "10", "--K", "2", "--V", "2", "--td_x", "16", "--td_y", "16",
           "--decode_mode", "quantlut_sym", "--tlut_bits", "6", "--scale_override", "0.9"]
HARP = ["--incoh_mode", "harp", "--harp_steps", "4", "--harp_q_recompute_every", "2"]


def quantize(dirs, name, *flags):
    quantize_finetune_llama.main(["--base_model", str(dirs["base"]), "--device", "cpu",
                                  "--hessian_path", str(dirs["hess"]), "--save_path", str(dirs["root"] / name),
                                  *TRELLIS, *flags])
    return dirs["root"] / name


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """Hessians, had and harp runs and their exports, a perplexity JSON (hidden 96, fused
    qkv 160 and up/gate 384 rows, down 192 inputs: all multiples of 16)."""
    root = tmp_path_factory.mktemp("qtip_pipeline")
    base = make_tiny_llama(root / "base")
    dirs = {"root": root, "base": base, "hess": collect_hessians(base, root / "hess")}
    for mode, flags in (("had", []), ("harp", HARP)):
        dirs[mode] = quantize(dirs, mode, *flags)
        dirs[mode + "_hf"] = root / (mode + "_hf")
        hfize_llama.main(["--quantized_path", str(dirs[mode]), "--hf_output_path", str(dirs[mode + "_hf"])])
    dirs["ppl"] = root / "ppl.json"
    eval_ppl.main(["--hf_path", str(dirs["harp_hf"]), "--seqlen", str(CTX), "--limit", "2", "--device", "cpu",
                   "--data_source", "local", "--output", str(dirs["ppl"])])
    return dirs


def test_layer_files_hold_packed_tiles_and_the_table(run_dirs):
    record = torch.load(run_dirs["had"] / "layer_001.pt", weights_only=True)
    config = json.loads((run_dirs["had"] / "quant_config.json").read_text())
    assert (config["codebook"], config["L"], config["K"], config["V"], config["decode_mode"],
            config["tlut_bits"], config["quip_tune_iters"]) == ("bitshift", 10, 2, 2, "quantlut_sym", 6, 0)
    for site, (m, n) in {"qkv": (160, 96), "o": (96, 96), "up": (384, 96), "down": (96, 192)}.items():
        entry = record["linears"][site]
        codes = entry["state"]["Qidxs"]
        assert codes.dtype == torch.int16 and codes.shape == (m // 16 * (n // 16), 256 * 2 // 16)
        assert entry["state"]["tlut"].shape == (64, 2)
        assert entry["config"]["codebook"]["name"] == "bitshift"
    log = json.loads((run_dirs["had"] / "layer_001.json").read_text())
    assert all(0 < s["proxy_loss"] < 1 for s in log["sites"].values())


def round_to_nearest_2bit(model):
    """Independent baseline: every decoder linear rounded per row to the 4-level grid
    {-1.5, -0.5, 0.5, 1.5} * 0.996 * std (the MSE-optimal uniform grid for a Gaussian)."""
    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            W = module.weight.data
            step = 0.996 * W.std(dim=1, keepdim=True)
            module.weight.data = (torch.clamp(torch.floor(W / step), -2, 1) + 0.5) * step
    return model


def test_exported_logits_equal_in_memory_logits_and_beat_rounding(run_dirs):
    fp, tokenizer = load_base_model(str(run_dirs["base"]))
    rtn = round_to_nearest_2bit(load_base_model(str(run_dirs["base"]))[0])
    ids = get_eval_windows(tokenizer, "wikitext2", CTX, source="local")[0][:3]
    with torch.no_grad():
        ref = fp(ids).logits
        rel_rtn = ((rtn(ids).logits - ref).norm() / ref.norm()).item()
        for mode in ("had", "harp"):
            in_memory, _, _, missing = hfize_llama.quantize_model(run_dirs[mode])
            loaded, _ = load_quantized_model(run_dirs[mode + "_hf"])
            assert missing == [] and len(quantized_linears(loaded)) == 8
            a, b = in_memory.eval()(ids).logits, loaded(ids).logits
            assert torch.equal(a, b), mode
            rel = ((a - ref).norm() / ref.norm()).item()
            assert rel < 0.5 and rel < 0.85 * rel_rtn, (mode, rel, rel_rtn)


def test_quantized_linear_decodes_its_tiles(run_dirs):
    loaded, _ = load_quantized_model(run_dirs["had_hf"])
    for linear in quantized_linears(loaded):
        cb = linear.bound_codebook()
        assert torch.equal(cb.tlut, linear.tlut)
        assert is_tailbiting(unpack(linear.Qidxs, cb.spec), cb.spec).all()
        x = torch.randn(4, linear.in_features)
        torch.testing.assert_close(linear(x), x @ linear.dequantize().T, atol=1e-4, rtol=1e-4)


def test_ppl_json_and_bits(run_dirs):
    entry = json.loads(run_dirs["ppl"].read_text())["results"][0]
    assert entry["windows"] == 2 and 1 < entry["ppl"] < 1e6
    had = json.loads((run_dirs["had_hf"] / "export_log.json").read_text())
    assert had["code_bits_per_weight"] == 2 and had["bits_per_weight"] == 2 and had["codebook"] == "bitshift"


def test_harp_fit_is_logged_and_reported(run_dirs, capsys):
    log = json.loads((run_dirs["harp"] / "layer_000.json").read_text())
    for stats in log["sites"].values():
        assert stats["harp"]["steps_run"] == 4 and stats["harp"]["seconds"] > 0
        assert stats["harp"]["proxy_end"] > 0
    results_table.main([f"harp=%s:%s:%s" % (run_dirs["ppl"], run_dirs["harp"], run_dirs["harp_hf"])])
    table = capsys.readouterr().out
    assert "harp" in table and "of it HARP fit" in table


def test_rerun_skips_finished_layers(run_dirs):
    files = sorted(run_dirs["had"].glob("layer_*.pt"))
    stamps = [os.stat(f).st_mtime_ns for f in files]
    quantize(run_dirs, "had")
    assert [os.stat(f).st_mtime_ns for f in files] == stamps


def test_other_trellis_settings_refuse_the_folder(run_dirs):
    with pytest.raises(UserInputError, match="other settings"):
        quantize(run_dirs, "had", "--K", "3")


@pytest.mark.parametrize("flags,match", [
    (["--V", "1"], "pass --V 2"),
    (["--decode_mode", "2mad"], "unknown --decode_mode"),
    (["--td_x", "7"], "multiple of --td_x 7"),
    (["--L", "3"], "--L must be"),
    (["--codebook", "E8P12"], "unknown codebook"),
    (["--incoh_mode", "kronecker"], "incoh_mode"),
])
def test_bad_flags_fail_before_any_work(run_dirs, tmp_path, flags, match):
    with pytest.raises(UserInputError, match=match):
        quantize_finetune_llama.main(["--base_model", str(run_dirs["base"]), "--device", "cpu",
                                      "--hessian_path", str(run_dirs["hess"]),
                                      "--save_path", str(tmp_path / "q"), *TRELLIS, *flags])
    assert not (tmp_path / "q").exists()


def test_one_code_without_table_runs_the_pipeline(run_dirs, tmp_path):
    """1MAD (V = 1, no table) at 3 bits on one layer: no tlut buffer, a lower proxy loss
    than the 2-bit run, and the export reproduces the in-memory logits."""
    out = quantize(run_dirs, tmp_path / "mad3", "--decode_mode", "1mad", "--V", "1", "--K", "3",
                   "--L", "8", "--layer_idx", "0")
    record = torch.load(out / "layer_000.pt", weights_only=True)
    assert "tlut" not in record["linears"]["qkv"]["state"]
    two_bit = json.loads((run_dirs["had"] / "layer_000.json").read_text())["sites"]
    for site, stats in json.loads((out / "layer_000.json").read_text())["sites"].items():
        assert stats["proxy_loss"] < 0.6 * two_bit[site]["proxy_loss"], site
    hfize_llama.main(["--quantized_path", str(out), "--hf_output_path", str(tmp_path / "hf")])
    in_memory, tokenizer, _, _ = hfize_llama.quantize_model(out)
    loaded, _ = load_quantized_model(tmp_path / "hf")
    ids = get_eval_windows(tokenizer, "wikitext2", CTX, source="local")[0][:1]
    with torch.no_grad():
        assert torch.equal(in_memory.eval()(ids).logits, loaded(ids).logits)
    assert json.loads((tmp_path / "hf" / "export_log.json").read_text())["code_bits_per_weight"] == 3


def test_end_to_end_finetuning_keeps_codes_and_table(run_dirs, tmp_path):
    from quantize_llama import finetune_e2e_llama
    finetune_e2e_llama.main([
        "--base_model", str(run_dirs["base"]), "--hf_path", str(run_dirs["had_hf"]),
        "--hf_output_path", str(tmp_path / "e2e"), "--devset_size", "4", "--ctx_size", str(CTX),
        "--ft_valid_size", "1", "--ft_bs", "1", "--ft_epochs", "1", "--ft_susv_lr", "1e-3",
        "--data_source", "local", "--device", "cpu"])
    tuned, _ = load_quantized_model(tmp_path / "e2e")
    before, _ = load_quantized_model(run_dirs["had_hf"])
    for a, b in zip(quantized_linears(tuned), quantized_linears(before)):
        assert torch.equal(a.Qidxs, b.Qidxs) and torch.equal(a.tlut, b.tlut)


@pytest.mark.parametrize("flags,patterns", [
    (["--V", "1"], [r"--decode_mode quantlut_sym emits 2 weight\(s\) per trellis state", r"pass --V 2"]),
    (["--td_y", "5"], [r"cannot quantize a 160 x 96 linear with 16 x 5 trellis tiles",
                       r"multiple of --td_y 5"]),
    (["--L", "40"], [r"--L must be in \(4, 20\]"]),
    (["--tlut_bits", "3"], [r"holds quantized layers made with other settings", r"'tlut_bits': \(6, 3\)"]),
])
def test_cli_gives_one_clear_error_and_keeps_the_folder(run_dirs, caplog, flags, patterns):
    """Through run_cli: exit status 2, exactly one error line naming the problem and the
    fix, and the finished folder untouched."""
    import logging
    import re

    from lib.utils.errors import run_cli
    from tiny_llama import folder_snapshot
    before = folder_snapshot(run_dirs["had"])
    caplog.clear()
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exc:
        run_cli(quantize_finetune_llama.main, ["--base_model", str(run_dirs["base"]), "--device", "cpu",
                                               "--hessian_path", str(run_dirs["hess"]),
                                               "--save_path", str(run_dirs["had"]), *TRELLIS, *flags])
    assert exc.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    for pattern in patterns:
        assert re.search(pattern, errors[0]), (pattern, errors[0])
    assert folder_snapshot(run_dirs["had"]) == before
