"""Decode speed of quantized exports, base models and synthetic models, in one run.

    python -m eval.eval_speed --hf_path runs/had_2bit_hf runs/harp_2bit_hf
    python -m eval.eval_speed --synthetic llama2-7b --modes fp,had,harp --output speed.json

Every model of one invocation is timed with the same settings, one after the other
(loaded, timed, freed), so the ratios in the table come from one run on one device.

Decode (default --mode decode): batch-`batch_size` greedy decoding with a static KV
cache (transformers StaticCache of prompt_len + new_tokens - 1 slots). A random prompt
of `prompt_len` tokens is prefilled (not timed; it gives the first new token), then
new_tokens - 1 single-token decode steps are timed. Decode tok/s of a sample =
batch_size * (new_tokens - 1) / decode seconds; a row reports the median over
`samples` samples run after `warmup` untimed ones. On CUDA (unless
--no_use_cuda_graph) the decode step is captured once in a CUDA graph and replayed
per token: the step reads and writes only fixed tensors (the token fed, its position,
the cache, which keeps its write position in a device tensor, and the output buffer).
On CPU the same step runs eagerly.

Forward (--mode forward, the QuIP#/HARP upstream timing): one forward of
batch_size x seqlen random tokens without cache (captured in a CUDA graph on CUDA);
a row reports the mean over `samples` calls after `warmup` untimed ones.

Weight traffic (GB/s = bytes of weights one step reads x steps per second, 1 GB = 1e9
bytes). Counted per step, as stored on the device:
  * decoder linears: FP linears, their weight (and bias) tensors; quantized linears,
    the codes (Qidxs), the sign/scale vectors SU and SV, and the rotation state the
    forward applies: HARP's block matrices (the cached float32 Cayley blocks, not the
    theta they came from) plus the Kronecker-fallback mixer, a kron rotation's factors
    and permutations; QuIP#'s Hadamard transform has no stored state (the shared K x K
    base matrix of non-power-of-two sizes and the codebook grid are not counted);
  * lm_head (the embedding matrix when tied), the RMSNorm weights, and one embedding
    row per input token (batch_size rows per decode step, batch_size * seqlen per forward).
This is the compressed size of the weights; the GB/s column says how close a model
comes to streaming its stored bytes. On CUDA, QuantizedLinear uses the quiptools kernels
when they load (fused decode-matvec for up to 8 rows, the had/harp rotations;
lib/linear/kernels.py); HARP_KERNELS=0 times the pure-PyTorch path instead, which
decodes the codes into a dense float32 matrix on every call and so moves far more memory.
"""
import argparse
import gc
import json
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import glog
import torch
import transformers
from torch import nn
from transformers import StaticCache
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from eval.cli_common import add_device_arguments, resolve_device, resolve_dtype
from eval.step_profile import profile_steps, profile_table
from lib.incoherence.harp import StructuredRotation
from lib.linear.quantized_linear import QuantizedLinear
from lib.utils.errors import UserInputError, run_cli
from lib.utils.io import atomic_write_json
from lib.utils.model_loading import is_quantized_checkpoint, load_model_for_eval, resolve_model_source
from model.synthetic import SHAPES, check_shape, synthetic_llama

TIMING_MODES = ("decode", "forward")
SYNTHETIC_MODES = ("fp", "had", "harp")
GRAPH_WARMUP_CALLS = 3
PROFILE_STEPS = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.eval_speed", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_path", nargs="+", default=[],
                        help="quantized export directories and/or base models (alias, .gguf, "
                             "HF directory, hub id), timed in this order")
    parser.add_argument("--synthetic", default=None,
                        help=f"also time random models of this shape ({', '.join(SHAPES)}), "
                             f"after the --hf_path models")
    parser.add_argument("--modes", default=None,
                        help=f"comma list of synthetic modes from {', '.join(SYNTHETIC_MODES)} "
                             f"(default all three; needs --synthetic)")
    parser.add_argument("--mode", default="decode",
                        help=f"what to time: {' or '.join(TIMING_MODES)} (default %(default)s)")
    parser.add_argument("--batch_size", type=int, default=1, help="sequences per step (default %(default)s)")
    parser.add_argument("--prompt_len", type=int, default=32,
                        help="decode: prompt tokens prefilled before timing (default %(default)s)")
    parser.add_argument("--new_tokens", type=int, default=128,
                        help="decode: tokens generated per sequence, the first by the prefill "
                             "(default %(default)s)")
    parser.add_argument("--seqlen", type=int, default=1,
                        help="forward: tokens per sequence of the timed forward (default %(default)s)")
    parser.add_argument("--samples", type=int, default=5, help="timed samples (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed samples before them (default %(default)s)")
    parser.add_argument("--no_use_cuda_graph", action="store_true",
                        help="run the steps eagerly on CUDA too (CPU always does)")
    add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="prompt tokens and synthetic weights")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="decode: after timing, profile a few eager steps and report the N "
                             "kernels (GPU) or operators (CPU) with the most time "
                             "(eval/step_profile.py; default off)")
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    return parser


@dataclass
class ModelSpec:
    """One model to time: a path (hf) or a synthetic shape and mode."""
    label: str
    mode: str
    hf_path: str | None = None
    shape: str | None = None

    @property
    def synthetic(self):
        return self.shape is not None


def parse_synthetic_modes(text: str) -> list[str]:
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in SYNTHETIC_MODES]
    if unknown or not modes:
        raise UserInputError(f"unknown --modes {', '.join(unknown) or '(empty)'}; "
                             f"choose from {', '.join(SYNTHETIC_MODES)}")
    if len(set(modes)) != len(modes):
        raise UserInputError(f"--modes {text} repeats a mode; list each once")
    return modes


def hf_mode(path: str) -> str:
    """The incoherence mode of a quantized export, "fp" for a base model."""
    if not is_quantized_checkpoint(path):
        return "fp"
    config = Path(path).expanduser() / "config.json"
    return json.loads(config.read_text())["quip_params"]["incoh_mode"]


def check_args(args):
    """Every check of the flags, before any model is loaded."""
    if args.mode not in TIMING_MODES:
        raise UserInputError(f"unknown --mode {args.mode!r}; choose {' or '.join(TIMING_MODES)}")
    minimums = {"batch_size": 1, "prompt_len": 1, "new_tokens": 2, "seqlen": 1, "samples": 1, "warmup": 0,
                "profile": 0}
    for name, minimum in minimums.items():
        if getattr(args, name) < minimum:
            raise UserInputError(f"--{name} must be at least {minimum}, got {getattr(args, name)}")
    if args.profile and args.mode != "decode":
        raise UserInputError("--profile profiles decode steps; drop it or use --mode decode")
    if args.modes is not None and args.synthetic is None:
        raise UserInputError("--modes selects synthetic models; add --synthetic SHAPE")
    if args.synthetic is not None:
        check_shape(args.synthetic)
    if not args.hf_path and args.synthetic is None:
        raise UserInputError("nothing to time: pass --hf_path and/or --synthetic")


def model_specs(args) -> list[ModelSpec]:
    specs = []
    for path in args.hf_path:
        resolve_model_source(path)
        specs.append(ModelSpec(label=path, mode=hf_mode(path), hf_path=path))
    if args.synthetic is not None:
        for mode in parse_synthetic_modes(args.modes or ",".join(SYNTHETIC_MODES)):
            specs.append(ModelSpec(label=f"synthetic:{args.synthetic}", mode=mode, shape=args.synthetic))
    return specs


def load_model(spec: ModelSpec, device: str, dtype: torch.dtype, seed: int):
    if spec.synthetic:
        incoh_mode = None if spec.mode == "fp" else spec.mode
        return synthetic_llama(spec.shape, incoh_mode, seed=seed, device=device, dtype=dtype)
    model, _ = load_model_for_eval(spec.hf_path, device, dtype)
    return model


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def causal_mask(positions, slots, dtype):
    """Additive attention mask (1, 1, q, len(slots)): 0 where slot <= position, the dtype's
    minimum elsewhere. Given explicitly, so a step is the same computation eagerly and in
    a CUDA graph, whatever transformers would derive from the cache."""
    blocked = slots > positions[..., None]
    return (blocked.to(dtype) * torch.finfo(dtype).min)[:, None]


def capture_cuda_graph(fn, warmup_calls):
    """A CUDA graph of fn(): `warmup_calls` calls on a side stream first (they also build
    lazily cached device tables, e.g. codebook grids and Hadamard bases, which must not
    be created during capture), then one captured call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def embedding_of(model):
    return model.get_input_embeddings().weight


class GreedyDecoder:
    """Greedy decoding of a fixed prompt (batch, prompt_len) with a static KV cache.

    `prefill` runs the prompt eagerly and yields the first new token; `step` feeds the
    last token at its position, writes the argmax token back in place, records it and
    advances the position. A step reads and writes only tensors that live as long as
    the decoder, so with `use_cuda_graph` it is captured once and replayed per token.
    """

    @torch.no_grad()
    def __init__(self, model, prompt, new_tokens, use_cuda_graph=False):
        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        batch_size, self.prompt_len = prompt.shape
        self.dtype, device = embedding_of(model).dtype, prompt.device
        length = self.prompt_len + new_tokens - 1
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.slots = torch.arange(length, device=device)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.generated = torch.zeros(batch_size, new_tokens, dtype=torch.long, device=device)
        self.graph = None
        if use_cuda_graph:
            self.prefill()
            check_graph_safe_cache(self.cache)
            self.graph = capture_cuda_graph(self.step, min(GRAPH_WARMUP_CALLS, new_tokens - 1))

    def prefill(self):
        self.cache.reset()
        positions = self.slots[None, :self.prompt_len]
        logits = self.model(input_ids=self.prompt, position_ids=positions,
                            attention_mask=causal_mask(positions, self.slots, self.dtype),
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.generated[:, :1].copy_(self.token)
        self.position.fill_(self.prompt_len)

    def step(self):
        logits = self.model(input_ids=self.token, position_ids=self.position,
                            attention_mask=causal_mask(self.position, self.slots, self.dtype),
                            past_key_values=self.cache, use_cache=True).logits
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        column = (self.position + 1 - self.prompt_len).expand_as(self.token)
        self.generated.scatter_(1, column, self.token)
        self.position.add_(1)

    @torch.no_grad()
    def sample(self):
        """(decode seconds, generated tokens (batch, new_tokens)) of one run; the
        prefill is not timed."""
        self.prefill()
        run_step = self.graph.replay if self.graph is not None else self.step
        synchronize(self.prompt.device)
        start = time.perf_counter()
        for _ in range(self.new_tokens - 1):
            run_step()
        synchronize(self.prompt.device)
        return time.perf_counter() - start, self.generated.clone()


def check_graph_safe_cache(cache):
    """A replayed step must advance the cache's write position on the device: the
    static cache has to keep it in a tensor (transformers 5's StaticLayer does)."""
    layers = getattr(cache, "layers", [])
    if not layers or not all(isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
                             for layer in layers):
        raise UserInputError(
            f"the StaticCache of transformers {transformers.__version__} does not keep its "
            f"length in a device tensor, so a CUDA graph cannot replay decode steps; "
            f"pass --no_use_cuda_graph or install transformers 5")


class ForwardTimer:
    """One forward of fixed input ids (batch, seqlen) without cache, eager or replayed
    from a CUDA graph."""

    @torch.no_grad()
    def __init__(self, model, ids, use_cuda_graph=False):
        self.model, self.ids = model, ids
        self.positions = torch.arange(ids.shape[1], device=ids.device)[None]
        self.mask = causal_mask(self.positions, self.positions[0], embedding_of(model).dtype)
        self.graph = capture_cuda_graph(self.forward, GRAPH_WARMUP_CALLS) if use_cuda_graph else None

    def forward(self):
        return self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions,
                          use_cache=False).logits

    @torch.no_grad()
    def sample(self):
        run = self.graph.replay if self.graph is not None else self.forward
        synchronize(self.ids.device)
        start = time.perf_counter()
        run()
        synchronize(self.ids.device)
        return time.perf_counter() - start


def tensor_bytes(tensor):
    return tensor.numel() * tensor.element_size()


@torch.no_grad()
def rotation_bytes(rotation):
    """Bytes of the state a rotation applies per call (see the module docstring)."""
    if isinstance(rotation, StructuredRotation):
        tensors = list(rotation.stage_blocks())
        if rotation.kron_k > 1:
            tensors.append(rotation.kron_mixer)
        return sum(tensor_bytes(t) for t in tensors)
    return sum(tensor_bytes(t) for t in rotation.buffers())


def quantized_linear_bytes(linear):
    processor = linear.processor
    return (tensor_bytes(linear.Qidxs) + tensor_bytes(processor.SU) + tensor_bytes(processor.SV)
            + rotation_bytes(processor.right) + rotation_bytes(processor.left))


def decoder_linear_bytes(model):
    total = 0
    for module in model.model.layers.modules():
        if isinstance(module, QuantizedLinear):
            total += quantized_linear_bytes(module)
        elif isinstance(module, nn.Linear):
            total += sum(tensor_bytes(p) for p in module.parameters())
    return total


def weight_traffic(model, rows):
    """Bytes of weights one step reads, by part, for `rows` input tokens per step."""
    embedding = embedding_of(model)
    parts = {
        "decoder_linears": decoder_linear_bytes(model),
        "lm_head": tensor_bytes(model.lm_head.weight),
        "norms": sum(tensor_bytes(m.weight) for m in model.modules() if isinstance(m, LlamaRMSNorm)),
        "embedding_rows": rows * embedding.shape[1] * embedding.element_size(),
    }
    return {**parts, "total": sum(parts.values())}


def random_tokens(model, shape, seed, device):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, embedding_of(model).shape[0], shape, generator=generator).to(device)


def time_decode(model, args, use_cuda_graph):
    prompt = random_tokens(model, (args.batch_size, args.prompt_len), args.seed, args.device)
    decoder = GreedyDecoder(model, prompt, args.new_tokens, use_cuda_graph)
    runs = [decoder.sample() for _ in range(args.warmup + args.samples)][args.warmup:]
    steps = args.new_tokens - 1
    samples = [{"seconds": seconds, "tok_per_s": args.batch_size * steps / seconds} for seconds, _ in runs]
    tok_per_s = statistics.median(s["tok_per_s"] for s in samples)
    steps_per_s = tok_per_s / args.batch_size
    traffic = weight_traffic(model, args.batch_size)
    result = {"tok_per_s": tok_per_s, "ms_per_token": 1000 / steps_per_s,
              "gb_per_s": traffic["total"] * steps_per_s / 1e9, "decode_steps": steps,
              "weight_bytes_per_step": traffic, "samples": samples,
              "same_tokens_every_sample": all(torch.equal(runs[0][1], tokens) for _, tokens in runs)}
    if args.profile:
        decoder.prefill()
        result["profile"] = profile_steps(decoder.step, prompt.device, min(PROFILE_STEPS, steps),
                                          args.profile)
    return result


def time_forward(model, args, use_cuda_graph):
    ids = random_tokens(model, (args.batch_size, args.seqlen), args.seed, args.device)
    timer = ForwardTimer(model, ids, use_cuda_graph)
    seconds = [timer.sample() for _ in range(args.warmup + args.samples)][args.warmup:]
    mean = statistics.fmean(seconds)
    traffic = weight_traffic(model, args.batch_size * args.seqlen)
    return {"tok_per_s": args.batch_size * args.seqlen / mean, "ms_per_forward": 1000 * mean,
            "gb_per_s": traffic["total"] / mean / 1e9, "weight_bytes_per_step": traffic,
            "samples": [{"seconds": s} for s in seconds]}


def time_model(spec, args, dtype, use_cuda_graph):
    glog.info(f"timing {spec.label} ({spec.mode})")
    model = load_model(spec, args.device, dtype, args.seed)
    timing = time_decode if args.mode == "decode" else time_forward
    row = {"model": spec.label, "mode": spec.mode, "synthetic": spec.synthetic, "shape": spec.shape,
           "cuda_graph": use_cuda_graph, **timing(model, args, use_cuda_graph)}
    glog.info(f"{spec.label} ({spec.mode}): {row['tok_per_s']:.1f} tok/s, {row['gb_per_s']:.2f} GB/s")
    return row


def add_ratios(rows):
    for row in rows:
        row["ratio"] = row["tok_per_s"] / rows[0]["tok_per_s"]
    return rows


def summary_table(rows, mode):
    latency, key = ("ms/token", "ms_per_token") if mode == "decode" else ("ms/fwd", "ms_per_forward")
    width = max(len("model"), *(len(row["model"]) for row in rows))
    lines = [f"{'model':<{width}} {'mode':>5} {'tok/s':>10} {latency:>9} {'GB/s':>8} {'ratio':>7}"]
    lines += [f"{row['model']:<{width}} {row['mode']:>5} {row['tok_per_s']:>10.1f} {row[key]:>9.3f} "
              f"{row['gb_per_s']:>8.3f} {row['ratio']:>7.3f}" for row in rows]
    return "\n".join(lines)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def release_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timing_device(args):
    """(device, dtype, whether to replay CUDA graphs) from --device, --dtype and
    --no_use_cuda_graph; args.device becomes the checked device name, and a CUDA device
    with an index becomes the current one."""
    args.device = resolve_device(args.device)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, args.device)
    use_cuda_graph = device.type == "cuda" and not args.no_use_cuda_graph
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device, dtype, use_cuda_graph


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    specs = model_specs(args)
    device, dtype, use_cuda_graph = timing_device(args)
    torch.manual_seed(args.seed)
    rows = []
    for spec in specs:
        rows.append(time_model(spec, args, dtype, use_cuda_graph))
        release_memory(device)
    add_ratios(rows)
    print(summary_table(rows, args.mode))
    for row in rows:
        if "profile" in row:
            print(profile_table(f"{row['model']} ({row['mode']})", row["profile"]))
    if args.output is not None:
        settings = {name: getattr(args, name) for name in
                    ("mode", "batch_size", "prompt_len", "new_tokens", "seqlen", "samples", "warmup", "seed",
                     "profile")}
        atomic_write_json({
            "settings": {**settings, "dtype": str(dtype).removeprefix("torch."), "device": args.device,
                         "use_cuda_graph": use_cuda_graph, "synthetic": args.synthetic,
                         "hf_path": args.hf_path},
            "device_name": device_name(device), "results": rows,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__}, args.output)
        glog.info(f"wrote {args.output}")
    return rows


if __name__ == "__main__":
    run_cli(main)
