import json
import math
import os

import pytest
import torch

from eval import eval_ppl
from fixtures_real_model import smollm2, tiny_llama, tiny_llama_dir  # noqa: F401
from lib.utils.errors import UserInputError, run_cli


def reference_perplexity(model, windows):
    """Independent loop: per-window mean of -log p(next token), then exp(mean)."""
    nlls = []
    for window in windows:
        logits = model(window[None], use_cache=False).logits[0, :-1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        token_log_probs = log_probs.gather(1, window[1:, None]).squeeze(1)
        nlls.append(-token_log_probs.mean())
    nlls = torch.stack(nlls)
    return math.exp(nlls.double().mean().item()), nlls


@pytest.mark.slow
def test_perplexity_matches_manual_computation(smollm2):  # noqa: F811
    _, tokenizer = smollm2
    model = tiny_llama(len(tokenizer))
    windows = torch.randint(0, len(tokenizer), (5, 24), generator=torch.Generator().manual_seed(0))
    result = eval_ppl.perplexity(model, windows, batch_size=2, device="cpu")
    with torch.inference_mode():
        ppl, nlls = reference_perplexity(model, windows)
    assert result["windows"] == 5
    assert result["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert result["mean_nll"] == pytest.approx(math.log(ppl), rel=1e-5)
    assert torch.allclose(torch.tensor(result["window_nll"]), nlls, rtol=1e-5)
    assert 0.5 * len(tokenizer) < result["ppl"] < 2 * len(tokenizer)


@pytest.mark.slow
def test_cli_real_model(smollm2, tmp_path, monkeypatch):  # noqa: F811
    """The CLI on SmolLM2; the (already tested) load is reused from the fixture."""
    loads = []
    monkeypatch.setattr(eval_ppl, "load_model_for_eval",
                        lambda *args: loads.append(args) or smollm2)
    output = tmp_path / "results.json"
    eval_ppl.main(["--limit", "2", "--seqlen", "128", "--data_source", "local",
                   "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["model_kind"] == "base" and report["hf_path"] == "smollm2-135m"
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["gpu"] is None and report["torch"] == torch.__version__
    (row,) = report["results"]
    assert row["dataset"] == "wikitext2" and row["source"].startswith("local:")
    assert row["seqlen"] == 128 and row["windows"] == 2 and row["limit"] == 2
    assert math.isfinite(row["ppl"]) and 10 < row["ppl"] < 200
    assert row["mean_nll"] == pytest.approx(math.log(row["ppl"]))
    assert not list(tmp_path.glob("*.tmp"))
    assert loads == [("smollm2-135m", "cpu", torch.float32)]


@pytest.mark.slow
def test_cli_tiny_directory_several_seqlens(tiny_llama_dir, tmp_path):  # noqa: F811
    output = tmp_path / "out" / "results.json"
    results = eval_ppl.main(["--hf_path", str(tiny_llama_dir), "--seqlen", "32", "64",
                             "--limit", "3", "--batch_size", "2", "--data_source", "local",
                             "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["results"] == results
    assert [row["seqlen"] for row in results] == [32, 64]
    assert all(row["windows"] == 3 and math.isfinite(row["ppl"]) for row in results)


@pytest.mark.slow
def test_skip_done_reuses_only_an_output_of_the_same_model_files_and_flags(
        tiny_llama_dir, tmp_path, monkeypatch):  # noqa: F811
    output = tmp_path / "ppl.json"
    argv = ["--hf_path", str(tiny_llama_dir), "--seqlen", "32", "--limit", "2", "--data_source", "local",
            "--device", "cpu", "--output", str(output), "--skip_done"]
    first = eval_ppl.main(argv)
    assert json.loads(output.read_text())["request"]["model"]["files"]
    loads = []
    real_load = eval_ppl.load_model_for_eval
    monkeypatch.setattr(eval_ppl, "load_model_for_eval", lambda *a: loads.append(a) or real_load(*a))
    assert eval_ppl.main(argv) == first and loads == []            # up to date: reused
    eval_ppl.main(argv[:-1])                                        # no --skip_done: evaluated
    assert len(loads) == 1
    eval_ppl.main([*argv[:5], "3", *argv[6:]])                      # other flags: evaluated
    assert len(loads) == 2 and json.loads(output.read_text())["request"]["limit"] == 3
    weights = next(tiny_llama_dir.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new export
    eval_ppl.main([*argv[:5], "3", *argv[6:]])
    assert len(loads) == 3
    eval_ppl.main([*argv[:5], "3", *argv[6:]])
    assert len(loads) == 3


@pytest.mark.slow
def test_cli_dataset_path(tiny_llama_dir, tmp_path):  # noqa: F811
    text_file = tmp_path / "notes.txt"
    text_file.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (row,) = eval_ppl.main(["--hf_path", str(tiny_llama_dir), "--seqlen", "64",
                            "--dataset_path", str(text_file)])
    assert row["dataset"] == "notes" and row["source"] == f"file:{text_file}"
    assert row["limit"] is None and row["windows"] >= 4


@pytest.mark.parametrize("argv, message", [
    (["--datasets", "pile"], "unknown --datasets pile"),
    (["--datasets", "c4", "--dataset_path", "x.txt"], "pass only one"),
    (["--seqlen", "1"], "--seqlen must be at least 2"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--dtype", "int8"], "unknown dtype"),
])
def test_cli_bad_arguments(argv, message):
    with pytest.raises(UserInputError, match=message):
        eval_ppl.main(argv + ["--device", "cpu"])


def test_cli_user_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(eval_ppl.main, ["--hf_path", "/nonexistent/model", "--device", "cpu"])
    assert exit_info.value.code == 2
