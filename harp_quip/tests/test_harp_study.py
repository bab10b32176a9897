"""eval.harp_study on a tiny Llama: runs, ratios against the same-seed RHT, selection by
validation only, resume without requantizing, summary from the JSON files alone."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eval import harp_study
from lib.utils.model_loading import load_tokenizer
from quantize_llama import hessian_offline_llama

SEQLEN = 32


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    hessian_offline_llama.main(["--base_model", str(root / "base"), "--save_path", str(root / "hess"),
                                "--devset_size", "8", "--ctx_size", "32", "--data_source", "local",
                                "--holdout_size", "2", "--device", "cpu"])
    variants = {
        "had": {"family": "RHT", "steps": 0, "flags": []},
        "harp_guard": {"family": "guard", "steps": 3, "flags": [
            "--incoh_mode", "harp", "--harp_steps", "3", "--harp_holdout_path", "{hessian_path}/holdout",
            "--harp_valid_every", "1", "--harp_guard"]},
        "harp_one_seed": {"family": "plain", "steps": 2, "flags": ["--incoh_mode", "harp", "--harp_steps", "2"]},
    }
    (root / "variants.json").write_text(json.dumps(variants))
    argv = ["--base_model", str(root / "base"), "--hessian_path", str(root / "hess"), "--run_dir",
            str(root / "run"), "--variants_file", str(root / "variants.json"), "--variants", "had,harp_guard",
            "--seeds", "0,1", "--seqlen", str(SEQLEN), "--limit", "2", "--device", "cpu",
            "--common_flags", "--quip_tune_iters 0", "--plot", str(root / "study.png")]
    summary = harp_study.main(argv)
    return root, argv, summary


def test_every_run_is_written_and_ratios_match_the_records(study):
    root, _, summary = study
    records = {(v, s): json.loads((root / "run" / v / f"seed{s}" / "study.json").read_text())
               for v in ("had", "harp_guard") for s in (0, 1)}
    assert all(set(r["ppl"]) == set(harp_study.DEFAULT_EVAL.split(",")) for r in records.values())
    assert records[("harp_guard", 0)]["flags"][5] == str(root / "hess") + "/holdout"
    key = "hellaswag:test"
    ratios = [records[("harp_guard", s)]["ppl"][key] / records[("had", s)]["ppl"][key] for s in (0, 1)]
    entry = summary["variants"]["harp_guard"]["ratio"][key]
    assert entry["mean"] == pytest.approx(sum(ratios) / 2)
    assert (entry["min"], entry["max"]) == (min(ratios), max(ratios))
    assert summary["variants"]["had"]["ratio"][key]["mean"] == 1.0
    assert summary["selected"] == "harp_guard"
    assert (root / "study.png").stat().st_size > 0


def test_rerun_resumes_and_summary_only_reproduces(study):
    root, argv, summary = study
    stamp = (root / "run" / "harp_guard" / "seed1" / "layer_000.pt").stat().st_mtime_ns
    assert harp_study.main(argv) == summary
    assert (root / "run" / "harp_guard" / "seed1" / "layer_000.pt").stat().st_mtime_ns == stamp
    only = harp_study.main(["--run_dir", str(root / "run"), "--variants_file", str(root / "variants.json"),
                            "--variants", "had,harp_guard", "--seeds", "0,1", "--summary_only"])
    assert only == summary


def test_selection_ignores_variants_without_every_seed(study):
    root, _, _ = study
    records = [json.loads((root / "run" / v / f"seed{s}" / "study.json").read_text())
               for v in ("had", "harp_guard") for s in (0, 1)]
    one_seed = dict(records[0], variant="harp_one_seed", ppl={k: 1.0 for k in records[0]["ppl"]})
    variants = json.loads((root / "variants.json").read_text())
    summary = harp_study.summarize(records + [one_seed], variants, "hellaswag:validation")
    assert summary["variants"]["harp_one_seed"]["seeds"] == [0]
    assert summary["selected"] == "harp_guard"


@pytest.mark.parametrize("flags,match", [
    (["--select_on", "wikitext2:test"], "validation item"),
    (["--variants", "nope"], "unknown variant"),
    (["--eval", "wikitext2:train"], "dataset:test"),
])
def test_bad_arguments_fail_clearly(study, flags, match):
    root, _, _ = study
    base = ["--run_dir", str(root / "run"), "--variants_file", str(root / "variants.json"), "--summary_only"]
    with pytest.raises(Exception, match=match):
        harp_study.main(base + flags)
