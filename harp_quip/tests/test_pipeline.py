"""A tiny random Llama through all four stages: Hessians -> quantize -> hfize -> ppl."""
import json
import os
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eval import eval_ppl
from lib.utils.data import get_calibration_sequences, get_eval_windows
from lib.utils.hessian import load_hessian
from lib.utils.model_loading import load_base_model, load_tokenizer
from model.quantized_llama import load_quantized_model, quantized_linears
from quantize_llama import hessian_offline_llama, hfize_llama, quantize_finetune_llama

CTX, DEVSET = 64, 8


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """Runs the four stages once; hidden 96 = 12*8 and fused sizes 160 = 20*8,
    384 = 12*32 exercise non-power-of-two Hadamards."""
    root = tmp_path_factory.mktemp("pipeline")
    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    dirs = {"base": base, "hess": root / "hess", "quant": root / "quant", "hf": root / "hf",
            "ppl": root / "ppl.json"}
    common = ["--base_model", str(base), "--device", "cpu"]
    hessian_offline_llama.main(common + ["--save_path", str(dirs["hess"]), "--devset_size", str(DEVSET),
                                         "--ctx_size", str(CTX), "--data_source", "local",
                                         "--batch_size", "3"])
    quantize_finetune_llama.main(common + ["--hessian_path", str(dirs["hess"]),
                                           "--save_path", str(dirs["quant"]), "--quip_tune_iters", "2"])
    hfize_llama.main(["--quantized_path", str(dirs["quant"]), "--hf_output_path", str(dirs["hf"])])
    eval_ppl.main(["--hf_path", str(dirs["hf"]), "--seqlen", str(CTX), "--limit", "2",
                   "--device", "cpu", "--output", str(dirs["ppl"])])
    return dirs


def test_hessians_match_a_full_model_forward(run_dirs):
    """Layer-by-layer propagation gives the same second moments as hooks on one
    ordinary forward of the whole model over the same calibration sequences."""
    model, tokenizer = load_base_model(str(run_dirs["base"]))
    devset, _ = get_calibration_sequences(tokenizer, "wikitext2", DEVSET, CTX, seed=0, source="local")
    seen = {}
    mlp = model.model.layers[1].mlp
    handle = mlp.down_proj.register_forward_pre_hook(
        lambda mod, inp: seen.setdefault("x", []).append(inp[0].reshape(-1, inp[0].shape[-1])))
    with torch.no_grad():
        model(devset, use_cache=False)
    handle.remove()
    X = torch.cat(seen["x"]).double()
    expected = X.T @ X / X.shape[0]
    H = load_hessian(run_dirs["hess"], 1, "down", expected.shape[0])
    torch.testing.assert_close(H, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


def test_quantized_layer_logs_and_resume(run_dirs):
    log = json.loads((run_dirs["quant"] / "layer_001.json").read_text())
    assert set(log["sites"]) == {"qkv", "o", "up", "down"}
    assert all(0 < s["proxy_loss"] < 1 for s in log["sites"].values())
    assert log["sites"]["qkv"]["shape"] == [160, 96] and log["sites"]["qkv"]["split"] == [96, 32, 32]
    files = sorted(run_dirs["quant"].glob("layer_*.pt"))
    stamps = [os.stat(f).st_mtime_ns for f in files]
    quantize_finetune_llama.main(["--base_model", str(run_dirs["base"]), "--device", "cpu",
                                  "--hessian_path", str(run_dirs["hess"]),
                                  "--save_path", str(run_dirs["quant"]), "--quip_tune_iters", "2"])
    assert [os.stat(f).st_mtime_ns for f in files] == stamps


def test_skip_done_redoes_only_the_stages_whose_inputs_changed(run_dirs, tmp_path, monkeypatch):
    """A rerun with --skip_done keeps the export and the perplexity JSON; a layer redone
    makes a new export, and the new export a new evaluation."""
    quant, hf, ppl = tmp_path / "quant", tmp_path / "hf", tmp_path / "ppl.json"
    shutil.copytree(run_dirs["quant"], quant)
    quantize = ["--base_model", str(run_dirs["base"]), "--device", "cpu", "--hessian_path",
                str(run_dirs["hess"]), "--save_path", str(quant), "--quip_tune_iters", "2"]
    export = ["--quantized_path", str(quant), "--hf_output_path", str(hf), "--skip_done"]
    evaluate = ["--hf_path", str(hf), "--seqlen", str(CTX), "--limit", "2", "--device", "cpu",
                "--output", str(ppl), "--skip_done"]
    loads = []
    real_load = eval_ppl.load_model_for_eval
    monkeypatch.setattr(eval_ppl, "load_model_for_eval", lambda *a: loads.append(a) or real_load(*a))

    def rerun():
        quantize_finetune_llama.main(quantize)
        hfize_llama.main(export)
        return eval_ppl.main(evaluate), os.stat(hf / "model.safetensors").st_mtime_ns

    first, stamp = rerun()
    assert len(loads) == 1 and json.loads((hf / "export_log.json").read_text())["request"]
    assert rerun() == (first, stamp) and len(loads) == 1       # nothing changed: nothing redone
    (quant / "layer_001.pt").unlink()
    again, new_stamp = rerun()                                    # layer 1 redone: export and eval
    assert new_stamp != stamp and len(loads) == 2 and again[0]["ppl"] == pytest.approx(first[0]["ppl"])


def test_export_load_logits_identical_and_close_to_fp(run_dirs):
    in_memory, tokenizer, _, missing = hfize_llama.quantize_model(run_dirs["quant"])
    assert missing == []
    loaded, _ = load_quantized_model(run_dirs["hf"])
    assert len(quantized_linears(loaded)) == 2 * 4
    fp, _ = load_base_model(str(run_dirs["base"]))
    rtn, _ = load_base_model(str(run_dirs["base"]))
    round_to_nearest_2bit(rtn)
    windows, _ = get_eval_windows(tokenizer, "wikitext2", CTX, source="local")
    ids = windows[:4]
    with torch.no_grad():
        a, b = in_memory.eval()(ids).logits, loaded(ids).logits
        ref, base = fp(ids).logits, rtn(ids).logits
    assert torch.equal(a, b)
    rel = ((a - ref).norm() / ref.norm()).item()
    rel_rtn = ((base - ref).norm() / ref.norm()).item()
    assert rel < 0.5 and rel < 0.85 * rel_rtn, (rel, rel_rtn)


def round_to_nearest_2bit(model):
    """Independent baseline: every decoder linear rounded per row to the 4-level grid
    {-1.5, -0.5, 0.5, 1.5} * 0.996 * std (the MSE-optimal uniform grid for a Gaussian)."""
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                W = module.weight.data
                step = 0.996 * W.std(dim=1, keepdim=True)
                module.weight.data = (torch.clamp(torch.floor(W / step), -2, 1) + 0.5) * step
    return model


def test_ppl_json(run_dirs):
    result = json.loads(run_dirs["ppl"].read_text())
    assert result["model_kind"] == "quantized"
    entry = result["results"][0]
    assert entry["windows"] == 2 and entry["seqlen"] == CTX
    assert 1 < entry["ppl"] < 1e6


def test_quantized_linear_matches_its_dense_weight(run_dirs):
    loaded, _ = load_quantized_model(run_dirs["hf"])
    linear = quantized_linears(loaded)[0]
    x = torch.randn(5, linear.in_features)
    torch.testing.assert_close(linear(x), x @ linear.dequantize().T, atol=1e-4, rtol=1e-4)


def test_generate_with_kv_cache_matches_greedy_recompute(run_dirs):
    """generate() (KV cache, one token at a time through the fused slots) picks the
    same tokens as a full forward over the growing sequence."""
    loaded, tokenizer = load_quantized_model(run_dirs["hf"])
    ids = tokenizer("The history of the city", return_tensors="pt").input_ids
    out = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = loaded(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_single_layer_run_exports_with_other_layers_in_full_precision(run_dirs, tmp_path):
    common = ["--base_model", str(run_dirs["base"]), "--device", "cpu"]
    quantize_finetune_llama.main(common + ["--hessian_path", str(run_dirs["hess"]), "--layer_idx", "1",
                                           "--save_path", str(tmp_path / "q"), "--quip_tune_iters", "0"])
    assert [f.name for f in (tmp_path / "q").glob("layer_*.pt")] == ["layer_001.pt"]
    hfize_llama.main(["--quantized_path", str(tmp_path / "q"), "--hf_output_path", str(tmp_path / "hf")])
    loaded, _ = load_quantized_model(tmp_path / "hf")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert len(quantized_linears(loaded)) == 4
    log = json.loads((tmp_path / "hf" / "export_log.json").read_text())
    assert log["fp_layers"] == [0] and log["bits_per_weight"] == 2


def test_harp_run_exports_and_reloads_float_and_int8_theta(run_dirs, tmp_path):
    common = ["--base_model", str(run_dirs["base"]), "--device", "cpu"]
    quantize_finetune_llama.main(common + [
        "--hessian_path", str(run_dirs["hess"]), "--save_path", str(tmp_path / "q"), "--incoh_mode", "harp",
        "--harp_steps", "4", "--quip_tune_iters", "1"])
    log = json.loads((tmp_path / "q" / "layer_000.json").read_text())
    assert all(s["harp"]["steps_run"] == 4 for s in log["sites"].values())
    for flag, name in (([], "hf"), (["--quantize_harp_theta"], "hf8")):
        hfize_llama.main(["--quantized_path", str(tmp_path / "q"), "--hf_output_path", str(tmp_path / name)]
                         + flag)
    in_memory, tokenizer, _, _ = hfize_llama.quantize_model(tmp_path / "q")
    loaded, _ = load_quantized_model(tmp_path / "hf")
    loaded8, _ = load_quantized_model(tmp_path / "hf8")
    ids = get_eval_windows(tokenizer, "wikitext2", CTX, source="local")[0][:2]
    with torch.no_grad():
        a, b, c = in_memory.eval()(ids).logits, loaded(ids).logits, loaded8(ids).logits
    assert torch.equal(a, b)
    assert ((c - b).norm() / b.norm()) < 0.05
    # bits: 2 per weight + 16 bits per skew value (8 + 16 per block with int8 theta)
    skew = blocks = 0
    for linear in quantized_linears(loaded):
        for rotation in (linear.processor.right, linear.processor.left):
            skew += rotation.num_skew_values()
            blocks += rotation.num_blocks()
    weights = sum(lin.in_features * lin.out_features for lin in quantized_linears(loaded))
    float_log = json.loads((tmp_path / "hf" / "export_log.json").read_text())
    int8_log = json.loads((tmp_path / "hf8" / "export_log.json").read_text())
    assert float_log["harp_bits"] == 16 * skew
    assert int8_log["harp_bits"] == 8 * skew + 16 * blocks
    assert float_log["bits_per_weight"] == pytest.approx(2 + 16 * skew / weights)


@pytest.mark.parametrize("codebook,bits,mode", [("E8P12RVQ3B", 3, "had"), ("E8P12RVQ4B", 4, "harp")])
def test_rvq_codebooks_run_the_pipeline_with_a_resid_scale_override(run_dirs, tmp_path, codebook, bits,
                                                                    mode):
    """One layer at 3/4 bit: lower proxy loss than the 2-bit run, the override reaches the
    exported linears, and the exported model reproduces the in-memory logits."""
    common = ["--base_model", str(run_dirs["base"]), "--device", "cpu"]
    quantize_finetune_llama.main(common + [
        "--hessian_path", str(run_dirs["hess"]), "--save_path", str(tmp_path / "q"), "--layer_idx", "0",
        "--codebook", codebook, "--resid_scale_override", "2.5", "--incoh_mode", mode,
        "--harp_steps", "2", "--quip_tune_iters", "2"])
    rvq = json.loads((tmp_path / "q" / "layer_000.json").read_text())["sites"]
    two_bit = json.loads((run_dirs["quant"] / "layer_000.json").read_text())["sites"]
    for site, stats in rvq.items():
        assert stats["proxy_loss"] < 0.5 * two_bit[site]["proxy_loss"], site
    hfize_llama.main(["--quantized_path", str(tmp_path / "q"), "--hf_output_path", str(tmp_path / "hf")])
    in_memory, tokenizer, _, _ = hfize_llama.quantize_model(tmp_path / "q")
    loaded, _ = load_quantized_model(tmp_path / "hf")
    for linear in quantized_linears(loaded):
        assert linear.codebook.config() == {"name": codebook, "resid_scale_override": 2.5}
    ids = get_eval_windows(tokenizer, "wikitext2", CTX, source="local")[0][:2]
    with torch.no_grad():
        assert torch.equal(in_memory.eval()(ids).logits, loaded(ids).logits)
    log = json.loads((tmp_path / "hf" / "export_log.json").read_text())
    assert log["code_bits_per_weight"] == bits


@pytest.mark.parametrize("flags,match", [
    (["--incoh_mode", "harp", "--harp_stage_bs", "7,7"], "multiplies to 49"),
    (["--incoh_mode", "harp", "--harp_fixed_mixer", "fft"], "harp_fixed_mixer"),
    (["--incoh_mode", "harp", "--harp_steps", "-1"], "harp_steps"),
    (["--incoh_mode", "hadamard"], "incoh_mode"),
    (["--incoh_mode", "harp", "--harp_guard"], "harp_holdout_path"),
    (["--incoh_mode", "harp", "--harp_h_shrink", "1.5"], "harp_h_shrink"),
    (["--codebook", "E9"], "codebook"),
    (["--layer_idx", "5"], "out of range")])
def test_bad_flags_fail_before_any_work(run_dirs, tmp_path, flags, match):
    from lib.utils.errors import UserInputError
    with pytest.raises(UserInputError, match=match):
        quantize_finetune_llama.main(["--base_model", str(run_dirs["base"]), "--device", "cpu",
                                      "--hessian_path", str(run_dirs["hess"]),
                                      "--save_path", str(tmp_path / "q")] + flags)
    assert not (tmp_path / "q").exists()


def test_holdout_hessians_and_a_guarded_harp_run(run_dirs, tmp_path):
    """--holdout_size: the main files are unchanged, the held-out ones are the second
    moment of exactly the recorded sequences; a harp run fits on the rest, validates
    on them and records the guard's choice."""
    hess = tmp_path / "hess"
    hessian_offline_llama.main(["--base_model", str(run_dirs["base"]), "--device", "cpu",
                                "--save_path", str(hess), "--devset_size", str(DEVSET), "--ctx_size",
                                str(CTX), "--data_source", "local", "--holdout_size", "3"])
    torch.testing.assert_close(load_hessian(hess, 0, "qkv", 96), load_hessian(run_dirs["hess"], 0, "qkv", 96))
    held = json.loads((hess / "holdout" / "holdout_config.json").read_text())["sequences"]
    model, tokenizer = load_base_model(str(run_dirs["base"]))
    devset, _ = get_calibration_sequences(tokenizer, "wikitext2", DEVSET, CTX, seed=0, source="local")
    seen = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, inp: seen.append(inp[0].reshape(-1, 96).double()))
    with torch.no_grad():
        model(devset[held], use_cache=False)
    handle.remove()
    X = torch.cat(seen)
    expected = X.T @ X / X.shape[0]
    torch.testing.assert_close(load_hessian(hess / "holdout", 0, "qkv", 96), expected, rtol=1e-4,
                               atol=1e-6 * expected.abs().max().item())
    quantize_finetune_llama.main(["--base_model", str(run_dirs["base"]), "--device", "cpu",
                                  "--hessian_path", str(hess), "--save_path", str(tmp_path / "q"),
                                  "--incoh_mode", "harp", "--harp_steps", "3", "--quip_tune_iters", "0",
                                  "--harp_holdout_path", str(hess / "holdout"), "--harp_guard",
                                  "--harp_valid_every", "1", "--harp_strategy", "ldlq", "--harp_h_shrink", "0.5"])
    log = json.loads((tmp_path / "q" / "layer_001.json").read_text())
    for stats in log["sites"].values():
        assert stats["harp"]["guard"]["kept"] in ("fitted", "start")
        assert stats["harp"]["valid_best_step"] in (0, 1, 2, 3)


def test_interrupted_run_resumes_without_redoing_layers(run_dirs, tmp_path):
    """Stop after layer 0 (--stop_before_layer 1), rerun: layer 0 is not redone and the
    result equals the uninterrupted run; a damaged layer file is redone, not accepted."""
    args = ["--base_model", str(run_dirs["base"]), "--device", "cpu", "--hessian_path", str(run_dirs["hess"]),
            "--save_path", str(tmp_path / "q"), "--quip_tune_iters", "2"]
    quantize_finetune_llama.main(args + ["--stop_before_layer", "1"])
    first = tmp_path / "q" / "layer_000.pt"
    assert first.exists() and not (tmp_path / "q" / "layer_001.pt").exists()
    stamp = os.stat(first).st_mtime_ns
    quantize_finetune_llama.main(args)
    assert os.stat(first).st_mtime_ns == stamp
    second = tmp_path / "q" / "layer_001.pt"
    reference = torch.load(run_dirs["quant"] / "layer_001.pt", weights_only=True)
    second.write_bytes(second.read_bytes()[:1000])
    quantize_finetune_llama.main(args)
    redone = torch.load(second, weights_only=True)
    for site, entry in reference["linears"].items():
        assert torch.equal(redone["linears"][site]["state"]["Qidxs"], entry["state"]["Qidxs"])
    assert os.stat(first).st_mtime_ns == stamp


def test_intra_layer_finetuning_lowers_the_layer_loss(run_dirs, tmp_path):
    quantize_finetune_llama.main([
        "--base_model", str(run_dirs["base"]), "--device", "cpu", "--hessian_path", str(run_dirs["hess"]),
        "--save_path", str(tmp_path / "q"), "--quip_tune_iters", "1", "--layer_idx", "1",
        "--ft_epochs", "3", "--devset_size", "8", "--ctx_size", str(CTX), "--ft_valid_size", "2",
        "--ft_bs", "2", "--ft_update_freq", "1", "--ft_lr", "1e-4", "--ft_susv_lr", "1e-3",
        "--ft_data_source", "local", "--ft_train_mode"])
    log = json.loads((tmp_path / "q" / "layer_001.json").read_text())
    assert set(log["finetune"]) == {"qkv", "o", "up"}
    for result in log["finetune"].values():
        assert result["valid_best"] <= result["valid_start"]
    assert log["finetune"]["qkv"]["valid_best"] < 0.97 * log["finetune"]["qkv"]["valid_start"]
    hfize_llama.main(["--quantized_path", str(tmp_path / "q"), "--hf_output_path", str(tmp_path / "hf")])
    loaded, tokenizer = load_quantized_model(tmp_path / "hf")
    with torch.no_grad():
        logits = loaded(tokenizer("a short test", return_tensors="pt").input_ids).logits
    assert torch.isfinite(logits).all()


def test_end_to_end_finetuning_moves_the_model_toward_fp(run_dirs, tmp_path):
    from quantize_llama import finetune_e2e_llama
    finetune_e2e_llama.main([
        "--base_model", str(run_dirs["base"]), "--hf_path", str(run_dirs["hf"]),
        "--hf_output_path", str(tmp_path / "e2e"), "--devset_size", "8", "--ctx_size", str(CTX),
        "--ft_valid_size", "2", "--ft_bs", "2", "--ft_epochs", "3", "--ft_lr", "1e-4", "--ft_susv_lr", "1e-4",
        "--data_source", "local", "--device", "cpu"])
    log = json.loads((tmp_path / "e2e" / "export_log.json").read_text())
    result = log["finetune_e2e"]
    assert result["valid_best"] < result["valid_start"] and result["best_epoch"] >= 1
    tuned, tokenizer = load_quantized_model(tmp_path / "e2e")
    before, _ = load_quantized_model(run_dirs["hf"])
    assert torch.equal(quantized_linears(tuned)[0].Qidxs, quantized_linears(before)[0].Qidxs)
    assert not torch.equal(quantized_linears(tuned)[0].processor.SV, quantized_linears(before)[0].processor.SV)


def test_half_precision_load_keeps_quantized_state_exact(run_dirs):
    full, _ = load_quantized_model(run_dirs["hf"], dtype=torch.float32)
    half, _ = load_quantized_model(run_dirs["hf"], dtype=torch.float16)
    assert half.model.embed_tokens.weight.dtype == torch.float16
    for a, b in zip(quantized_linears(full), quantized_linears(half)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
