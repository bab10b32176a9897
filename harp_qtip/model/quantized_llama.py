"""A Hugging Face LlamaForCausalLM whose decoder linears are QuantizedLinear modules.

QuIP# quantizes q/k/v and up/gate as fused matrices (they share an input, and the
output-side transform mixes the fused rows). The stock Llama modules call
q_proj(x), k_proj(x), v_proj(x) (and up/gate) on the same x, so each of those slots
becomes an `OutputSlice` of one `SplitLinear`, which runs the fused product once per
input and hands out its parts. The model code of transformers stays untouched.

Checkpoint layout (written by quantize_llama.hfize_llama): config.json = the Llama
config plus `quip_params` (codebook, incoh_mode, per-layer linear configs),
model.safetensors, tokenizer files.
"""
import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lib.linear.quantized_linear import QuantizedLinear
from lib.utils.errors import UserInputError
from model.decoder import NORMS, SITE_LAYOUT

WEIGHTS_FILE = "model.safetensors"


class SplitLinear(nn.Module):
    """A fused quantized linear whose output is shared by several projection slots."""

    def __init__(self, linear, sizes):
        super().__init__()
        self.linear = linear
        self.sizes = list(sizes)
        self._input = None
        self._parts = None
        self._served = 0

    def part(self, x, index):
        if self._input is not x:
            self._parts = self.linear(x).split(self.sizes, dim=-1)
            self._input, self._served = x, 0
        out = self._parts[index]
        self._served += 1
        if self._served == len(self.sizes):
            self._input = self._parts = None
        return out


class OutputSlice(nn.Module):
    """Slot `index` of a SplitLinear (not registered as its child: no duplicate state)."""

    def __init__(self, shared, index):
        super().__init__()
        self._shared = [shared]
        self.index = index

    def forward(self, x):
        return self._shared[0].part(x, self.index)


def install_site(layer, site, linear):
    """Replace the FP projections of `site` in a decoder layer by a quantized linear."""
    parent_name, names, fused_name = SITE_LAYOUT[site]
    parent = getattr(layer, parent_name)
    if fused_name is None:
        setattr(parent, names[0], linear)
        return
    sizes = [getattr(parent, name).out_features for name in names]
    if sum(sizes) != linear.out_features:
        raise UserInputError(
            f"quantized {site} has {linear.out_features} outputs, the model expects {sum(sizes)}: "
            f"the quantized files belong to another model")
    shared = SplitLinear(linear, sizes)
    setattr(parent, fused_name, shared)
    for index, name in enumerate(names):
        setattr(parent, name, OutputSlice(shared, index))


def install_layer(model, layer_idx, record):
    """Put one quantize_finetune layer record (linears + norms) into the model."""
    layer = model.model.layers[layer_idx]
    for site, entry in record["linears"].items():
        linear = QuantizedLinear.from_config(entry["config"])
        linear.load_state_dict(entry["state"])
        linear.freeze()
        install_site(layer, site, linear)
    for name in NORMS:
        getattr(layer, name).weight.data.copy_(record["norms"][name])


def quantized_linears(model):
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]


def set_dtype(model, dtype):
    """Non-quantized parts in `dtype`; quantized linears keep their float32 state (scales,
    rotation blocks) untouched: they compute in float32 and return the activation dtype."""
    inside = {id(m) for linear in quantized_linears(model) for m in linear.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                module._buffers[name] = buffer.to(dtype)
    return model


def site_linear(layer, site):
    """The QuantizedLinear of a site, or None while the site is still full precision."""
    parent_name, names, fused_name = SITE_LAYOUT[site]
    parent = getattr(layer, parent_name)
    module = getattr(parent, fused_name, None) if fused_name else getattr(parent, names[0])
    if isinstance(module, SplitLinear):
        return module.linear
    return module if isinstance(module, QuantizedLinear) else None


def quip_params_of(model, base):
    """The `quip_params` entry of an exported config: what loading needs to rebuild."""
    layers = {}
    for i, layer in enumerate(model.model.layers):
        sites = {site: linear.config() for site in SITE_LAYOUT
                 if (linear := site_linear(layer, site)) is not None}
        if sites:
            layers[str(i)] = sites
    return {**base, "layers": layers}


def load_quantized_model(path, device="cpu", dtype=torch.float32):
    """Load an exported quantized model directory: (model, tokenizer)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise UserInputError(f"{path} is not an exported model directory (no config.json); "
                             f"run `python -m quantize_llama.hfize_llama` to create one")
    params = json.loads(config_file.read_text()).get("quip_params")
    if params is None:
        raise UserInputError(f"{config_file} has no quip_params: not a quantized export")
    config = LlamaConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config)
    for i, sites in params["layers"].items():
        layer = model.model.layers[int(i)]
        for site, linear_config in sites.items():
            install_site(layer, site, QuantizedLinear.from_config(linear_config))
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise UserInputError(f"{weights} is missing: the export is incomplete; rerun hfize_llama")
    try:
        state = load_file(weights)
    except Exception as err:
        raise UserInputError(f"{weights} is damaged ({type(err).__name__}: {err}); the export is "
                             f"incomplete: rerun hfize_llama") from err
    result = model.load_state_dict(state, strict=False, assign=True)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
        raise UserInputError(
            f"{weights} does not match its config (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}); re-export with hfize_llama")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for linear in quantized_linears(model):
        linear.freeze()
    tokenizer = AutoTokenizer.from_pretrained(path)
    set_dtype(model, dtype)
    return model.to(device).eval().requires_grad_(False), tokenizer
