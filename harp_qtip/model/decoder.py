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


@torch.no_grad()
def run_layer(model, layer, hidden, batch_size, device, on_batch=None):
    """One decoder layer over all sequences of `hidden` (kept where they are), in
    batches on `device`; `on_batch(start, stop)` is called before each batch."""
    outputs = torch.empty_like(hidden)
    for start in range(0, hidden.shape[0], batch_size):
        stop = min(start + batch_size, hidden.shape[0])
        if on_batch is not None:
            on_batch(start, stop)
        batch = hidden[start:stop].to(device)
        outputs[start:stop] = layer_forward(model, layer, batch).to(outputs.device)
    return outputs
