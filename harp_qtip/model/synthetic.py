"""Synthetic Llama models with random quantized state, for speed studies only (QTIP).

The same interface as harp_quip's model/synthetic.py (SHAPES, check_shape,
synthetic_llama), which eval/eval_speed.py (mirrored) uses: `synthetic_llama(shape,
incoh_mode)` builds the full-precision model (incoh_mode None) or one whose every
decoder linear is a trellis QuantizedLinear with random packed codes (every bit pattern
is a valid tail-biting stream), a random Gaussian HYB table of the config's size, random
signs and, for harp, random theta. Decode cost depends on shapes, dtypes and the code
path, never on the values, so these time what a real export of the same config would;
their outputs are meaningless. This file is QTIP's own (harp_quip's version draws
vector codes); the FP parts are built as there: on the meta device first, then only
the kept tensors are allocated.
"""
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lib.codebook import codebook_from_flags, default_codebook_flags
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


def check_shape(shape):
    if shape not in SHAPES:
        raise UserInputError(f"unknown synthetic shape {shape!r}; choose one of {', '.join(SHAPES)}")


def random_quantized_linear(m, n, incoh_mode, codebook_flags, generator, weight_rms, device):
    """A frozen trellis QuantizedLinear (n -> m) with random state drawn on CPU; SV scaled
    so the weight entries have RMS `weight_rms` (the rotations are orthogonal)."""
    config = codebook_from_flags(codebook_flags).config()
    rotation = RotationOptions(theta_init_scale=HARP_THETA_SCALE) if incoh_mode == "harp" else None
    processor = make_processor(incoh_mode, m, n, generator, rotation)
    linear = QuantizedLinear(n, m, config, processor.config())
    info = torch.iinfo(linear.Qidxs.dtype)
    linear.Qidxs = torch.randint(info.min, info.max + 1, linear.Qidxs.shape, dtype=linear.Qidxs.dtype,
                                 generator=generator)
    for name, value in linear.codebook.empty_state().items():
        setattr(linear, name, torch.randn(value.shape, generator=generator))
    code_rms = linear.decoded_weight().square().mean().sqrt().item()
    processor.SV = processor.SV * (weight_rms / code_rms)
    linear.processor.load_state_dict(processor.state_dict())
    linear = linear.to(device)
    linear.freeze()
    return linear


def materialize(model, device, dtype, generator):
    """Allocate the parameters still on the meta device: RMSNorm weights 1, the others
    N(0, initializer_range^2); a tied lm_head is tied afterwards."""
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
def synthetic_llama(shape: str, incoh_mode: str | None, codebook=None, seed=0, device="cpu",
                    dtype=torch.float16):
    """A random LlamaForCausalLM of a named shape in eval mode on `device`; `codebook`:
    trellis flags (lib.codebook.codebook_flags; default: L 16, K 2, V 2, HYB 9 bits)."""
    check_shape(shape)
    if incoh_mode is not None and incoh_mode not in QUANTIZED_MODES:
        raise UserInputError(f"unknown synthetic mode {incoh_mode!r}; use None (full precision) "
                             f"or one of {', '.join(QUANTIZED_MODES)}")
    flags = codebook or default_codebook_flags()
    codebook_from_flags(flags)
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    if incoh_mode is not None:
        generator = torch.Generator().manual_seed(seed)
        std = model.config.initializer_range
        for layer in model.model.layers:
            for site, (parent_name, names, _) in SITE_LAYOUT.items():
                parent = getattr(layer, parent_name)
                m = sum(getattr(parent, name).out_features for name in names)
                n = getattr(parent, names[0]).in_features
                install_site(layer, site, random_quantized_linear(m, n, incoh_mode, flags, generator, std,
                                                                  device))
    materialize(model, device, dtype, torch.Generator(device=device).manual_seed(seed))
    set_dtype(model, dtype)
    return model.to(device).eval().requires_grad_(False)
