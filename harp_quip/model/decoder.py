"""Layer-by-layer access to a Hugging Face Llama: the four quantization sites of a
decoder layer and a standalone forward of one layer (for calibration passes)."""
import torch

# site -> (parent module, HF projections stacked in this order, fused module name)
SITE_LAYOUT = {
    "qkv": ("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    "o": ("self_attn", ("o_proj",), None),
    "up": ("mlp", ("up_proj", "gate_proj"), "upgate_proj"),
    "down": ("mlp", ("down_proj",), None),
}
# site -> the module whose INPUT is the site's activation
SITE_INPUT_MODULE = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj",
                     "up": "mlp.up_proj", "down": "mlp.down_proj"}
NORMS = ("input_layernorm", "post_attention_layernorm")


def site_weights(layer, site):
    """The FP weight matrices of a site, in stacking order (q, k, v / up, gate)."""
    parent, names, _ = SITE_LAYOUT[site]
    module = getattr(layer, parent)
    return [getattr(module, name).weight.detach() for name in names]


def layer_forward(model, layer, hidden):
    """One decoder layer on a batch of full sequences (causal, no cache)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
    position_embeddings = model.model.rotary_emb(hidden, positions)
    out = layer(hidden, attention_mask=None, position_ids=positions,
                position_embeddings=position_embeddings, use_cache=False)
    return out[0] if isinstance(out, tuple) else out
