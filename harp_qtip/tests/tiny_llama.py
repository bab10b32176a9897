"""Tiny random Llamas, their Hessians and file checks, shared by the determinism,
bad-input, crash-safety and multi-process tests (the same shapes as tests/test_pipeline.py: hidden 96 = 12 * 8 and
fused sizes 160 = 20 * 8, 384 = 12 * 32 exercise non-power-of-two Hadamards)."""
import hashlib
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eval.compare_runs import tensors as layer_tensors  # every tensor of a layer file, by a flat key
from lib.utils.errors import run_cli
from lib.utils.model_loading import load_tokenizer
from quantize_llama import hessian_offline_llama

CTX, DEVSET = 64, 8


def make_tiny_llama(folder, num_layers=2, hidden=96, intermediate=192, heads=6, kv_heads=2, seed=0,
                    vocab_size=None):
    """Save a random Llama with the SmolLM2 tokenizer to `folder`; returns the folder
    (`vocab_size`: smaller embeddings for models that are never run)."""
    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         vocab_size=vocab_size or len(tokenizer), max_position_embeddings=256,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def collect_hessians(base, save_path, extra=()):
    hessian_offline_llama.main(["--base_model", str(base), "--device", "cpu", "--save_path", str(save_path),
                                "--devset_size", str(DEVSET), "--ctx_size", str(CTX),
                                "--data_source", "local", "--batch_size", "4", *extra])
    return Path(save_path)


def folder_snapshot(folder):
    """{relative path: (sha256, mtime_ns, inode)} of every file below `folder`."""
    folder = Path(folder)
    snap = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            st = os.stat(path)
            snap[str(path.relative_to(folder))] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                   st.st_mtime_ns, st.st_ino)
    return snap


def assert_same_tensors(a, b):
    """Two layer files hold the same tensors, bit for bit (torch.equal)."""
    ta, tb = layer_tensors(a), layer_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), (a, key)


def assert_same_codes(a, b):
    """Same codes and signs, other tensors equal up to float rounding: what two runs
    that batch layers differently (--layer_batch) write."""
    ta, tb = layer_tensors(a), layer_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        if key.endswith(("Qidxs", "SU")):
            assert torch.equal(ta[key], tb[key]), (a, key)
        else:
            torch.testing.assert_close(ta[key], tb[key], rtol=1e-6, atol=0)


def cli_fails(caplog, main, argv, *patterns):
    """run_cli(main, argv) exits with status 2 after exactly one error line, which
    matches every pattern (the problem and the fix)."""
    caplog.clear()
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    for pattern in patterns:
        assert re.search(pattern, errors[0]), (pattern, errors[0])
    return errors[0]
