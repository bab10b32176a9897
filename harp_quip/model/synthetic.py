"""Synthetic Llama models with random weights, for speed studies only.

`synthetic_llama(shape, incoh_mode)` builds a model of a named shape (llama2-7b,
smollm2-135m, tiny) without any checkpoint: the full-precision model
(incoh_mode None) or a quantized one ("had" / "harp") whose every decoder linear is a
QuantizedLinear with uniformly random codes, random signs and, for harp, random
rotation parameters. The quantized linears go in through `install_site` (fused qkv
and up/gate, as the real loader does), are frozen, and `set_dtype` gives the model the
dtype layout of a loaded export, so the modules, shapes and dtypes that run are those
of a real quantized model.

The decode cost depends on shapes, dtypes and the code path, never on the weight
values, so these models time exactly what real ones would; their outputs are
meaningless. The random scales only keep activations in range (every weight matrix
has entries of RMS `initializer_range`, as at Hugging Face's initialization).

Large shapes are built on the meta device first (accelerate's init_empty_weights);
only the tensors the model keeps are then allocated on `device` (the random quantized
state is drawn on CPU and moved one linear at a time), so a 7B quantized model never
holds its FP linears.
"""
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lib.codebook import get_codebook
from lib.incoherence import make_processor
from lib.incoherence.harp import RotationOptions
from lib.linear.quantized_linear import QuantizedLinear
from lib.utils.errors import UserInputError
from model.decoder import SITE_LAYOUT
from model.quantized_llama import install_site, set_dtype

SHAPES = {
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                  "max_position_embeddings": 4096, "tie_word_embeddings": False},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
             "max_position_embeddings": 512, "tie_word_embeddings": False},
}
QUANTIZED_MODES = ("had", "harp")
HARP_THETA_SCALE = 0.01
RMS_SAMPLE_ROWS = 256


def check_shape(shape):
    if shape not in SHAPES:
        raise UserInputError(f"unknown synthetic shape {shape!r}; choose one of {', '.join(SHAPES)}")


def check_incoh_mode(incoh_mode):
    if incoh_mode is not None and incoh_mode not in QUANTIZED_MODES:
        raise UserInputError(f"unknown synthetic mode {incoh_mode!r}; use None (full precision) "
                             f"or one of {', '.join(QUANTIZED_MODES)}")


def synthetic_config(shape):
    check_shape(shape)
    return LlamaConfig(**SHAPES[shape])


def site_shape(layer, site):
    """(m, n) of a site's (fused) weight, read from the layer's FP projections."""
    parent_name, names, _ = SITE_LAYOUT[site]
    parent = getattr(layer, parent_name)
    projections = [getattr(parent, name) for name in names]
    return sum(p.out_features for p in projections), projections[0].in_features


def random_quantized_linear(m, n, incoh_mode, codebook_name, generator, weight_rms, device):
    """A frozen QuantizedLinear (n -> m) on `device` with codes uniform over their storage
    dtype (for E8P12 every 16-bit value is a code), the random signs of `make_processor`
    and, for harp, random theta (std HARP_THETA_SCALE), all drawn on CPU from
    `generator`. SV is scaled so the weight has entries of RMS `weight_rms`: the
    rotations are orthogonal, so RMS(W) = scale * RMS(decoded codes), estimated on the
    first rows of codes. The state is frozen on `device` (HARP's blocks are built there)."""
    rotation = RotationOptions(theta_init_scale=HARP_THETA_SCALE) if incoh_mode == "harp" else None
    processor = make_processor(incoh_mode, m, n, generator, rotation)
    linear = QuantizedLinear(n, m, codebook_name, processor.config()).to(device)
    storage = linear.Qidxs
    info = torch.iinfo(storage.dtype)
    codes = torch.randint(info.min, info.max + 1, storage.shape, dtype=storage.dtype, generator=generator)
    code_rms = linear.codebook.decode(codes[:RMS_SAMPLE_ROWS]).square().mean().sqrt().item()
    processor.SV = processor.SV * (weight_rms / code_rms)
    linear.load_quantized(codes, processor)
    return linear


def install_random_quantized(model, incoh_mode, codebook_name, generator, device):
    """Every site of every decoder layer becomes a random QuantizedLinear with weight
    entries of RMS initializer_range."""
    std = model.config.initializer_range
    for layer in model.model.layers:
        for site in SITE_LAYOUT:
            m, n = site_shape(layer, site)
            install_site(layer, site, random_quantized_linear(m, n, incoh_mode, codebook_name,
                                                              generator, std, device))


def materialize(model, device, dtype, generator):
    """Allocate every parameter still on the meta device on `device` in `dtype`: RMSNorm
    weights 1, the others N(0, initializer_range^2) (Hugging Face's Llama init). A tied
    lm_head is tied to the embeddings afterwards instead of being allocated."""
    std = model.config.initializer_range
    tied = model.config.tie_word_embeddings
    for module in model.modules():
        if tied and module is model.lm_head:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            value = torch.empty(param.shape, device=device, dtype=dtype)
            if isinstance(module, LlamaRMSNorm):
                value.fill_(1.0)
            else:
                value.normal_(0.0, std, generator=generator)
            setattr(module, name, nn.Parameter(value, requires_grad=False))
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


@torch.no_grad()
def synthetic_llama(shape: str, incoh_mode: str | None, codebook="E8P12", seed=0, device="cpu",
                    dtype=torch.float16):
    """A random LlamaForCausalLM of a named shape (see SHAPES), in eval mode on `device`.

    incoh_mode None: the full-precision model (all weights in `dtype`). "had" / "harp":
    every decoder linear is a random QuantizedLinear in the layout of a loaded export
    (fused qkv and up/gate through SplitLinear, quantized state in float32, the rest in
    `dtype`). For timing studies only: speed does not depend on the weight values.
    """
    config = synthetic_config(shape)
    check_incoh_mode(incoh_mode)
    get_codebook(codebook)
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config)
    if incoh_mode is not None:
        install_random_quantized(model, incoh_mode, codebook, torch.Generator().manual_seed(seed), device)
    materialize(model, device, dtype, torch.Generator(device=device).manual_seed(seed))
    set_dtype(model, dtype)
    return model.to(device).eval().requires_grad_(False)
