"""Shared fixtures around the real SmolLM2-135M model (GGUF, ~5-25 s to load).

Import into a test module with `from fixtures_real_model import smollm2`.
The loads are cached per process: a session fixture imported into several
modules is a separate fixture in each, so the cache keeps it to one load.
"""
import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lib.utils.model_loading import DEFAULT_MODEL, load_base_model


@functools.lru_cache(maxsize=1)
def _load_smollm2():
    return load_base_model(DEFAULT_MODEL, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct dequantized to float32 on CPU."""
    return _load_smollm2()


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer Llama (hidden 64) for fast tests."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2, tmp_path_factory):
    """A saved tiny random Llama with the SmolLM2 tokenizer (an HF directory)."""
    _, tokenizer = smollm2
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
