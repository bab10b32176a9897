"""What each of HARP's inference transforms adds to a decode step, beyond the RHT's.

    python -m eval.harp_transform_cost --synthetic llama2-7b \
        --output results/speed/harp_transform_cost_llama2-7b.json
    python -m eval.harp_transform_cost --table results/speed/harp_transform_cost_*.json

A quantized linear rotates its input ((SU * x) R_n) and its output (y R_m^T * SV). The
`had` processor's rotation is QuIP#'s Hadamard, one kernel launch per side. HARP's
StructuredRotation runs as one launch per group of stages, two or three per side
(lib/linear/transform_kernels.py: rotation_groups). This tool times a synthetic `harp`
model in eval_speed's greedy decode (static KV cache, CUDA graph on CUDA):
  * as it is;
  * with one site's input or output rotation replaced, in every layer, by the Hadamard
    rotation of the same size (every other transform unchanged);
  * with every rotation replaced;
  * and the synthetic `had` model of the same shape and seed.
The time one swap saves, per layer, is what that HARP transform costs beyond the RHT's.
With every rotation swapped the step is the `had` model's step: its time should match
the `had` row, which checks the method. A swapped linear computes a wrong product
(HARP's codes with a Hadamard), so only the times mean anything. The variants run in
interleaved rounds, and each number is the median over rounds of the median over samples.
--table renders such JSON files side by side as a markdown table (the README's).
"""
import argparse
import statistics
from contextlib import contextmanager
from datetime import datetime, timezone

import glog
import torch
import transformers

from eval.cli_common import add_device_arguments
from eval.eval_speed import GreedyDecoder, device_name, random_tokens, release_memory, timing_device
from lib.incoherence.harp import StructuredRotation
from lib.incoherence.rht import HadamardRotation
from lib.linear.transform_kernels import rotation_groups
from lib.utils.errors import UserInputError, run_cli
from lib.utils.io import atomic_write_json, read_json
from model.decoder import SITE_LAYOUT
from model.quantized_llama import site_linear
from model.synthetic import SHAPES, check_shape, synthetic_llama

SIDES = {"input": "right", "output": "left"}   # side -> the processor's rotation attribute


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m eval.harp_transform_cost", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", default=None, help=f"model shape to time: {', '.join(SHAPES)}")
    parser.add_argument("--table", nargs="+", default=None, metavar="JSON",
                        help="instead of timing, render these --output files as one markdown table")
    parser.add_argument("--prompt_len", type=int, default=32, help="prefilled tokens (default %(default)s)")
    parser.add_argument("--new_tokens", type=int, default=65,
                        help="tokens per decode, the first by the prefill (default %(default)s)")
    parser.add_argument("--samples", type=int, default=3, help="timed decodes per round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over all variants (default %(default)s)")
    parser.add_argument("--no_use_cuda_graph", action="store_true", help="run the steps eagerly on CUDA too")
    add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="prompt tokens and synthetic weights")
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    return parser


def check_args(args):
    if (args.synthetic is None) == (args.table is None):
        raise UserInputError("pass --synthetic SHAPE to time, or --table JSON... to render results")
    if args.table is not None:
        return
    check_shape(args.synthetic)
    for name, least in (("prompt_len", 1), ("new_tokens", 2), ("samples", 1), ("rounds", 1)):
        if getattr(args, name) < least:
            raise UserInputError(f"--{name} must be >= {least}, got {getattr(args, name)}")


@contextmanager
def hadamard_instead(model, swaps):
    """Within the block, the HARP rotation of each (site, side) in `swaps` is, in every
    decoder layer, the HadamardRotation of its size; the originals come back after."""
    replaced = []
    try:
        for layer in model.model.layers:
            for site, side in swaps:
                processor = site_linear(layer, site).processor
                rotation = getattr(processor, SIDES[side])
                if not isinstance(rotation, StructuredRotation):
                    raise UserInputError(f"the {side} rotation of {site} is not HARP's "
                                         f"({type(rotation).__name__}); time a harp model")
                setattr(processor, SIDES[side], HadamardRotation(rotation.n))
                replaced.append((processor, SIDES[side], rotation))
        yield
    finally:
        for processor, attribute, rotation in reversed(replaced):
            setattr(processor, attribute, rotation)


def rotation_launches(rotation, side):
    """Kernel launches of a StructuredRotation on one side (the output applies R^T)."""
    return len(rotation_groups(rotation, side == "output"))


def ms_per_step(model, prompt, args, use_cuda_graph):
    decoder = GreedyDecoder(model, prompt, args.new_tokens, use_cuda_graph)
    decoder.sample()  # warm-up
    seconds = statistics.median(decoder.sample()[0] for _ in range(args.samples))
    return 1000 * seconds / (args.new_tokens - 1)


def site_rows(model):
    """One row per (site, side) of the first layer: shape, size and HARP's launches."""
    layer = model.model.layers[0]
    rows = []
    for site in SITE_LAYOUT:
        linear = site_linear(layer, site)
        for side, attribute in SIDES.items():
            rotation = getattr(linear.processor, attribute)
            rows.append({"site": site, "side": side, "m": linear.out_features, "n": linear.in_features,
                         "size": rotation.n, "schedule": rotation.schedule,
                         "harp_launches": rotation_launches(rotation, side), "had_launches": 1})
    return rows


def time_variants(args, device, dtype, use_cuda_graph):
    """{"had": ms, "harp": ms, "harp, every rotation swapped": ms} and the site rows with
    their ms per step swapped, medians over the rounds."""
    models = {mode: synthetic_llama(args.synthetic, mode, seed=args.seed, device=device, dtype=dtype)
              for mode in ("had", "harp")}
    prompt = random_tokens(models["harp"], (1, args.prompt_len), args.seed, device)
    sites = site_rows(models["harp"])
    variants = {"had": ("had", []), "harp": ("harp", []),
                "harp, every rotation swapped": ("harp", [(r["site"], r["side"]) for r in sites])}
    variants.update({f"{r['site']} {r['side']}": ("harp", [(r["site"], r["side"])]) for r in sites})
    times = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, (mode, swaps) in variants.items():
            with hadamard_instead(models[mode], swaps):
                times[name].append(ms_per_step(models[mode], prompt, args, use_cuda_graph))
        glog.info(f"round {round_index + 1}/{args.rounds}: had {times['had'][-1]:.3f} ms, "
                  f"harp {times['harp'][-1]:.3f} ms per step")
    median = {name: statistics.median(values) for name, values in times.items()}
    layers = len(models["harp"].model.layers)
    for row in sites:
        row["ms_per_step_swapped"] = median[f"{row['site']} {row['side']}"]
        row["us_per_layer"] = 1000 * (median["harp"] - row["ms_per_step_swapped"]) / layers
    del models
    release_memory(torch.device(device))
    steps = {name: median[name] for name in ("had", "harp", "harp, every rotation swapped")}
    return steps, sites, layers


def summary(steps, sites, layers):
    lines = [f"ms per step: had {steps['had']:.3f}, harp {steps['harp']:.3f}, harp with every rotation "
             f"swapped {steps['harp, every rotation swapped']:.3f}; harp - had = "
             f"{1000 * (steps['harp'] - steps['had']) / layers:.1f} us per layer",
             f"{'site':<5} {'side':<6} {'size':>6} {'schedule':<16} {'launches':>8} {'us/layer':>9}"]
    lines += [f"{r['site']:<5} {r['side']:<6} {r['size']:>6} {str(r['schedule']):<16} "
              f"{r['harp_launches']:>8} {r['us_per_layer']:>9.1f}" for r in sites]
    lines.append(f"sum of the rows: {sum(r['us_per_layer'] for r in sites):.1f} us per layer")
    return "\n".join(lines)


def load_result(path):
    try:
        result = read_json(path)
        if not all(key in result for key in ("shape", "layers", "ms_per_step", "sites", "device_name", "date")):
            raise KeyError("shape, layers, ms_per_step, sites, device_name or date")
        return result
    except FileNotFoundError:
        raise UserInputError(f"{path} does not exist; pass --output files of eval.harp_transform_cost")
    except (KeyError, TypeError, ValueError) as err:
        raise UserInputError(f"{path} is not an eval.harp_transform_cost --output JSON ({err!r})")


def markdown_row(cells):
    return "| " + " | ".join(cells) + " |"


def markdown_table(results):
    """One row per (site, side), two columns per result (its shape): the rotation's size
    and HARP launches, and its cost in µs per layer; then the totals and step times."""
    head = ["site", "side"]
    for r in results:
        head += [f"{r['shape']}: size (launches)", f"{r['shape']}: µs / layer"]
    lines = [markdown_row(head), "|---" * len(head) + "|"]
    for index, row in enumerate(results[0]["sites"]):
        cells = [row["site"], row["side"]]
        for r in results:
            site = r["sites"][index]
            cells += [f"{site['size']} ({site['harp_launches']})", f"{site['us_per_layer']:.1f}"]
        lines.append(markdown_row(cells))
    per_layer = {"sum of the rows": lambda r: sum(s["us_per_layer"] for s in r["sites"]),
                 "harp - had": lambda r: 1000 * (r["ms_per_step"]["harp"] - r["ms_per_step"]["had"]) / r["layers"]}
    for label, value in per_layer.items():
        lines.append(markdown_row([label, ""] + [cell for r in results for cell in ("", f"{value(r):.1f}")]))
    steps = {"ms / step: had": "had", "harp": "harp", "harp, every rotation swapped": "harp, every rotation swapped"}
    for label, key in steps.items():
        lines.append(markdown_row([label, ""] + [cell for r in results
                                                 for cell in (f"{r['ms_per_step'][key]:.3f}", "")]))
    runs = "; ".join(f"{r['shape']}: {r['device_name']}, {r['date'][:10]}" for r in results)
    return "\n".join(lines) + f"\n\n({runs})"


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.table is not None:
        results = [load_result(path) for path in args.table]
        if len({tuple((s["site"], s["side"]) for s in r["sites"]) for r in results}) != 1:
            raise UserInputError("the --table files list different sites; render files of one model family")
        print(markdown_table(results))
        return results
    device, dtype, use_cuda_graph = timing_device(args)
    steps, sites, layers = time_variants(args, args.device, dtype, use_cuda_graph)
    print(summary(steps, sites, layers))
    result = {"shape": args.synthetic, "layers": layers, "ms_per_step": steps, "sites": sites,
              "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                           "samples": args.samples, "rounds": args.rounds, "seed": args.seed,
                           "dtype": str(dtype).removeprefix("torch."), "use_cuda_graph": use_cuda_graph},
              "device_name": device_name(device),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "transformers": transformers.__version__}
    if args.output is not None:
        atomic_write_json(result, args.output)
        glog.info(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    run_cli(main)
