import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, LlamaForCausalLM

import model.quantized_llama
from fixtures_real_model import smollm2, tiny_llama_dir  # noqa: F401
from lib.utils import model_loading
from lib.utils.errors import UserInputError


def test_alias_resolves_to_gguf():
    source = model_loading.resolve_model_source(model_loading.DEFAULT_MODEL)
    assert source["kind"] == "gguf"
    assert source["gguf_file"].endswith(".gguf")
    assert (Path(source["path"]) / source["gguf_file"]).is_file()


def test_gguf_file_path_resolves():
    alias = model_loading.resolve_model_source(model_loading.DEFAULT_MODEL)
    source = model_loading.resolve_model_source(str(Path(alias["path"]) / alias["gguf_file"]))
    assert source["kind"] == "gguf" and source["path"] == alias["path"]


def test_hub_id_is_classified_as_hub():
    source = model_loading.resolve_model_source("meta-llama/Llama-2-7b-hf")
    assert source == {"kind": "hub", "repo": "meta-llama/Llama-2-7b-hf"}


@pytest.mark.parametrize("spec", ["/nonexistent/model_dir", "./missing_dir", "missing.gguf",
                                  "no_such_model"])
def test_missing_local_paths_are_refused(spec):
    with pytest.raises(UserInputError, match=spec.lstrip("./")):
        model_loading.resolve_model_source(spec)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="no config.json"):
        model_loading.resolve_model_source(str(tmp_path))


def test_non_llama_architecture_is_refused(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UserInputError, match="gpt2"):
        model_loading.load_base_model(str(tmp_path))


def test_is_quantized_checkpoint(tmp_path):
    assert not model_loading.is_quantized_checkpoint(str(tmp_path))
    assert not model_loading.is_quantized_checkpoint(model_loading.DEFAULT_MODEL)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not model_loading.is_quantized_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                      "quip_params": {"codebook": "E8P12"}}))
    assert model_loading.is_quantized_checkpoint(str(tmp_path))


def test_load_model_for_eval_dispatches_quantized(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"quip_params": {}}))
    calls = []
    monkeypatch.setattr(model.quantized_llama, "load_quantized_model",
                        lambda path, device, dtype: calls.append((path, device, dtype)) or "qm")
    assert model_loading.load_model_for_eval(str(tmp_path), "cpu", torch.float16) == "qm"
    assert calls == [(str(tmp_path), "cpu", torch.float16)]


def test_parse_dtype():
    assert model_loading.parse_dtype("fp16") is torch.float16
    assert model_loading.parse_dtype("bfloat16") is torch.bfloat16
    assert model_loading.parse_dtype("FP32") is torch.float32
    with pytest.raises(UserInputError, match="float64"):
        model_loading.parse_dtype("float64")


def test_default_device():
    assert model_loading.default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.slow
def test_real_model_is_float_llama(smollm2):  # noqa: F811
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    assert not model.is_quantized and not model.training
    assert model.dtype == torch.float32
    assert not any(param.requires_grad for param in model.parameters())
    assert len(tokenizer) == model.config.vocab_size


@pytest.mark.slow
def test_tiny_directory_loads_in_requested_dtype(tiny_llama_dir):  # noqa: F811
    model, tokenizer = model_loading.load_base_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.bfloat16
    assert model.config.hidden_size == 64
    assert tokenizer("hello world").input_ids
    assert len(model_loading.load_tokenizer(str(tiny_llama_dir))) == len(tokenizer)


@pytest.mark.slow
def test_dequantized_model_saves_and_reloads(smollm2, tmp_path):  # noqa: F811
    model, tokenizer = smollm2
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, _ = model_loading.load_base_model(str(tmp_path))
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight, weight)
