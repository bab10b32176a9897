"""eval_speed and the synthetic models it times (tiny shape, CPU; one CUDA-graph test)."""
import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models
from torch import nn
from transformers import PreTrainedTokenizerFast

from eval import eval_speed, speed_table
from lib.incoherence.harp import StructuredRotation
from lib.linear.quantized_linear import QuantizedLinear
from lib.utils.errors import UserInputError, run_cli
from model.decoder import SITE_LAYOUT
from model.quantized_llama import (OutputSlice, SplitLinear, load_quantized_model, quantized_linears,
                                    site_linear)
from model.synthetic import SHAPES, synthetic_llama
from tiny_llama import cli_fails
from tools import bench_kernels
from quantize_llama.hfize_llama import export

TINY = SHAPES["tiny"]
MODES = {"fp": None, "had": "had", "harp": "harp"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny matrices gain nothing from threads, and on a shared CPU the thread pool
    waits on busy cores (ten times slower); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_models():
    """The tiny synthetic model of each mode, float32 on CPU (built once)."""
    return {mode: synthetic_llama("tiny", incoh, dtype=torch.float32) for mode, incoh in MODES.items()}


def site_sizes(hidden, intermediate, heads, kv_heads):
    """(m, n) of the qkv, o, up and down sites of a Llama layer."""
    head_dim = hidden // heads
    return [(hidden + 2 * kv_heads * head_dim, hidden), (hidden, hidden),
            (2 * intermediate, hidden), (hidden, intermediate)]


def reference_greedy(model, prompt, new_tokens):
    """Plain greedy loop without cache: a full forward over the growing sequence per token."""
    seq = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompt.shape[1]:]


def test_synthetic_quantized_layout_matches_a_loaded_export():
    model = synthetic_llama("tiny", "harp", dtype=torch.float16)
    linears = quantized_linears(model)
    assert len(linears) == 4 * TINY["num_hidden_layers"]
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, OutputSlice) and isinstance(attn.qkv_proj, SplitLinear)
    assert attn.qkv_proj.sizes == [128, 64, 64]
    assert isinstance(attn.o_proj, QuantizedLinear)
    sites = [site_linear(model.model.layers[0], site) for site in SITE_LAYOUT]
    assert [(lin.out_features, lin.in_features) for lin in sites] == site_sizes(128, 256, 4, 2)
    codes = torch.cat([lin.Qidxs.flatten() for lin in linears])
    assert codes.dtype == torch.int16 and codes.min() < -30000 and codes.max() > 30000
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert all(t.dtype == torch.float32 for lin in linears for t in (lin.processor.SU, lin.processor.SV))
    theta = linears[0].processor.right.theta[0]
    assert 0 < theta.abs().mean() < 0.1 and linears[0].processor.right.cached
    assert linears[0].dequantize().square().mean().sqrt() == pytest.approx(0.02, rel=0.05)
    ids = torch.randint(0, TINY["vocab_size"], (2, 5))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_synthetic_fp_model_and_tied_embeddings():
    fp = synthetic_llama("tiny", None, dtype=torch.float32)
    assert not quantized_linears(fp) and isinstance(fp.model.layers[0].mlp.up_proj, nn.Linear)
    assert not any(p.is_meta for p in fp.parameters())
    assert 0.015 < fp.model.layers[0].mlp.up_proj.weight.std() < 0.025
    assert torch.equal(fp.model.norm.weight, torch.ones(128))
    assert fp.lm_head.weight is not fp.model.embed_tokens.weight


@pytest.mark.parametrize("mode", list(MODES))
def test_static_cache_decode_matches_greedy_recompute(tiny_models, mode):
    model = tiny_models[mode]
    prompt = torch.randint(0, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(1))
    decoder = eval_speed.GreedyDecoder(model, prompt, new_tokens=8)
    seconds, tokens = decoder.sample()
    assert seconds > 0 and tokens.shape == (2, 8)
    assert torch.equal(tokens, reference_greedy(model, prompt, 8))
    assert torch.equal(decoder.sample()[1], tokens)


def test_weight_traffic_counts_codes_signs_and_rotation_blocks(tiny_models):
    sizes = site_sizes(128, 256, 4, 2) * TINY["num_hidden_layers"]
    embedding = TINY["vocab_size"] * 128 * 4
    norms = (2 * TINY["num_hidden_layers"] + 1) * 128 * 4
    fp = eval_speed.weight_traffic(tiny_models["fp"], rows=3)
    assert fp["decoder_linears"] == sum(4 * m * n for m, n in sizes)
    assert (fp["lm_head"], fp["norms"], fp["embedding_rows"]) == (embedding, norms, 3 * 128 * 4)
    had = eval_speed.weight_traffic(tiny_models["had"], rows=1)
    assert had["decoder_linears"] == sum(m * n // 8 * 2 + 4 * (m + n) for m, n in sizes)
    # stage radices 128 = 8*8*2, 256 = 8*8*4, 512 = 8*8*8: a stage of radix b holds
    # size / b float32 blocks of b x b, i.e. 4 * size * b bytes
    rotation = {128: 4 * 128 * 18, 256: 4 * 256 * 20, 512: 4 * 512 * 24}
    harp = eval_speed.weight_traffic(tiny_models["harp"], rows=1)
    assert harp["decoder_linears"] == had["decoder_linears"] + sum(rotation[m] + rotation[n] for m, n in sizes)
    assert harp["total"] == sum(v for k, v in harp.items() if k != "total")
    assert eval_speed.rotation_bytes(StructuredRotation(128)) == rotation[128]


def test_cli_decodes_all_synthetic_modes_in_one_run(tiny_models, tmp_path, capsys, monkeypatch):
    """The synthetic builds (tested above) are reused from the fixture."""
    loads = []
    monkeypatch.setattr(eval_speed, "load_model",
                        lambda spec, *args: loads.append((spec.shape, spec.mode, *args)) or tiny_models[spec.mode])
    output = tmp_path / "speed.json"
    rows = eval_speed.main(["--synthetic", "tiny", "--modes", "fp,had,harp", "--batch_size", "2",
                            "--prompt_len", "8", "--new_tokens", "6", "--samples", "2", "--warmup", "0",
                            "--output", str(output)])
    assert loads == [("tiny", mode, "cpu", torch.float32, 0) for mode in ("fp", "had", "harp")]
    report = json.loads(output.read_text())
    assert report["results"] == rows
    assert [row["mode"] for row in rows] == ["fp", "had", "harp"]
    settings = report["settings"]
    assert settings["mode"] == "decode" and settings["device"] == "cpu" and settings["dtype"] == "float32"
    assert settings["use_cuda_graph"] is False and settings["synthetic"] == "tiny"
    assert report["torch"] == torch.__version__ and report["device_name"] and report["date"]
    for row in rows:
        assert row["synthetic"] and row["shape"] == "tiny" and not row["cuda_graph"]
        assert row["tok_per_s"] > 0 and row["decode_steps"] == 5 and len(row["samples"]) == 2
        assert row["tok_per_s"] == pytest.approx(rows[0]["tok_per_s"] * row["ratio"])
        assert row["ms_per_token"] == pytest.approx(1000 * 2 / row["tok_per_s"])
        steps_per_s = row["tok_per_s"] / 2
        assert row["gb_per_s"] == pytest.approx(row["weight_bytes_per_step"]["total"] * steps_per_s / 1e9)
        assert row["same_tokens_every_sample"]
    assert rows[0]["ratio"] == 1.0
    table = capsys.readouterr().out
    assert "tok/s" in table and "ms/token" in table and table.count("synthetic:tiny") == 3
    markdown = speed_table.table([output, output]).splitlines()
    assert len(markdown) == 2 + 6 and markdown[2:5] == markdown[5:]
    for line, row in zip(markdown[2:], rows):
        cells = line[2:-2].split(" | ")
        assert cells[:4] == [report["device_name"], report["date"][:10], "synthetic:tiny", row["mode"]]
        assert float(cells[4]) == pytest.approx(row["tok_per_s"], abs=0.05)
        assert float(cells[5]) == pytest.approx(row["ms_per_token"], abs=0.005)
        assert float(cells[7]) == pytest.approx(row["ratio"], abs=0.005)


def test_profile_reports_the_operators_of_a_decode_step(tiny_models, capsys, monkeypatch):
    monkeypatch.setattr(eval_speed, "load_model", lambda spec, *args: tiny_models[spec.mode])
    (row,) = eval_speed.main(["--synthetic", "tiny", "--modes", "harp", "--new_tokens", "6",
                              "--samples", "1", "--warmup", "0", "--profile", "5"])
    profile = row["profile"]
    assert profile["steps"] == eval_speed.PROFILE_STEPS and profile["time"] == "cpu"
    top = profile["top"]
    assert len(top) == 5 and [r["us_per_step"] for r in top] == sorted((r["us_per_step"] for r in top),
                                                                       reverse=True)
    for r in top:
        assert r["us_per_call"] == pytest.approx(r["us_per_step"] / r["calls_per_step"])
        assert r["share"] == pytest.approx(r["us_per_step"] / profile["self_us_per_step"])
    assert sum(r["share"] for r in top) <= 1 + 1e-9
    assert any(r["name"] in ("aten::mm", "aten::bmm", "aten::matmul") for r in top)
    out = capsys.readouterr().out
    assert "synthetic:tiny (harp):" in out and top[0]["name"] in out


def test_cli_forward_mode(tmp_path):
    (row,) = eval_speed.main(["--synthetic", "tiny", "--modes", "had", "--mode", "forward",
                              "--batch_size", "2", "--seqlen", "4", "--samples", "3", "--warmup", "0"])
    seconds = [s["seconds"] for s in row["samples"]]
    assert len(seconds) == 3 and row["ratio"] == 1.0
    assert row["tok_per_s"] == pytest.approx(8 * 3 / sum(seconds))
    assert row["ms_per_forward"] == pytest.approx(1000 * sum(seconds) / 3)
    assert row["weight_bytes_per_step"]["embedding_rows"] == 8 * 128 * 4


def word_tokenizer():
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))


def test_cli_times_a_quantized_export_like_its_synthetic_twin(tiny_models, tmp_path):
    """A synthetic model exported as hfize_llama does loads back identical (so the
    synthetic layout is the loader's), and eval_speed times the export."""
    path = tmp_path / "harp_hf"
    export(tiny_models["harp"], word_tokenizer(), {"codebook": "E8P12", "incoh_mode": "harp"}, path, {})
    loaded, _ = load_quantized_model(path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tiny_models["harp"](ids).logits)
    (row,) = eval_speed.main(["--hf_path", str(path), "--prompt_len", "4", "--new_tokens", "4",
                              "--samples", "1", "--warmup", "0"])
    assert (row["model"], row["mode"], row["synthetic"], row["shape"]) == (str(path), "harp", False, None)
    assert row["weight_bytes_per_step"] == eval_speed.weight_traffic(tiny_models["harp"], rows=1)


@pytest.mark.parametrize("argv,match", [
    ([], "nothing to time"),
    (["--synthetic", "llama3-8b"], "unknown synthetic shape"),
    (["--synthetic", "tiny", "--modes", "fp,int4"], "unknown --modes int4"),
    (["--synthetic", "tiny", "--modes", "fp,fp"], "repeats a mode"),
    (["--modes", "fp"], "add --synthetic"),
    (["--synthetic", "tiny", "--mode", "prefill"], "unknown --mode"),
    (["--synthetic", "tiny", "--samples", "0"], "--samples must be at least 1"),
    (["--synthetic", "tiny", "--warmup", "-1"], "--warmup must be at least 0"),
    (["--synthetic", "tiny", "--new_tokens", "1"], "--new_tokens must be at least 2"),
    (["--synthetic", "tiny", "--batch_size", "0"], "--batch_size must be at least 1"),
    (["--synthetic", "tiny", "--dtype", "int8"], "unknown dtype"),
    (["--synthetic", "tiny", "--profile", "-1"], "--profile must be at least 0"),
    (["--synthetic", "tiny", "--mode", "forward", "--profile", "5"], "--profile profiles decode steps"),
    (["--synthetic", "tiny", "--device", "gpu0"], "unknown --device"),
    (["--hf_path", "/no/such/model_dir", "--synthetic", "tiny"], "not found"),
])
def test_bad_inputs_are_refused_before_any_model_is_built(argv, match, monkeypatch):
    monkeypatch.setattr(eval_speed, "load_model", lambda *args: pytest.fail("a model was loaded"))
    with pytest.raises(UserInputError, match=match):
        eval_speed.main(argv)


def test_speed_table_names_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        speed_table.table([tmp_path / "none.json"])
    (tmp_path / "ppl.json").write_text(json.dumps({"results": [{"ppl": 3.0}]}))
    with pytest.raises(UserInputError, match="not an eval.eval_speed --output JSON"):
        speed_table.table([tmp_path / "ppl.json"])


def test_bad_input_exits_with_status_2():
    with pytest.raises(SystemExit) as exc:
        run_cli(eval_speed.main, ["--synthetic", "tiny", "--samples", "0"])
    assert exc.value.code == 2


@pytest.mark.parametrize("shape,mode,match", [("gpt2", None, "unknown synthetic shape"),
                                              ("tiny", "kron", "unknown synthetic mode")])
def test_synthetic_llama_refuses_unknown_shapes_and_modes(shape, mode, match):
    with pytest.raises(UserInputError, match=match):
        synthetic_llama(shape, mode)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_graph_decode_matches_eager(mode, tmp_path):
    model = synthetic_llama("tiny", MODES[mode], device="cuda", dtype=torch.float16)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(2)).cuda()
    _, eager = eval_speed.GreedyDecoder(model, prompt, new_tokens=12).sample()
    graphed = eval_speed.GreedyDecoder(model, prompt, new_tokens=12, use_cuda_graph=True)
    assert graphed.graph is not None
    for _ in range(2):
        seconds, tokens = graphed.sample()
        assert seconds > 0 and torch.equal(tokens, eager)
    output = tmp_path / "speed.json"
    (row,) = eval_speed.main(["--synthetic", "tiny", "--modes", mode, "--device", "cuda",
                              "--new_tokens", "8", "--samples", "2", "--output", str(output)])
    report = json.loads(output.read_text())
    assert row["cuda_graph"] and report["settings"]["use_cuda_graph"] and report["device_name"]
    assert row["same_tokens_every_sample"] and math.isfinite(row["gb_per_s"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without a GPU")
def test_bench_kernels_names_the_missing_gpu(caplog):
    cli_fails(caplog, bench_kernels.main, [], "bench_kernels times CUDA kernels", "with a GPU")
