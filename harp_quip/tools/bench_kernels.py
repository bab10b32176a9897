"""Per-call GPU time of one quantized linear's decode-step kernels, per Llama-2-7B site
shape (fused qkv, o, fused up/gate, down), batch 1: the whole E8P12 QuantizedLinear
(input transform, decode-matvec, output transform, fp16 in and out as in the model) for
`had` and `harp`, next to cuBLAS's fp16 matrix-vector product of the same shape; then its
parts alone: the transforms (transform_kernels.processor_input / processor_output) and
the decode-matvec (kernels.linear_product). Random codes / signs / theta (speed does not
depend on them). Each number: the median over 7 replays of a CUDA graph of 50 calls,
divided by 50. The kernels are programmatic dependent launches, so the 50 calls of a
part alone overlap a little (each starts during its predecessor's tail): the `linear`
rows are the ones that add up to a decode step.

    python -m tools.bench_kernels --output results/speed/bench_kernels_h200.json
"""
import argparse

import torch

from lib.codebook import get_codebook
from lib.incoherence import make_processor
from lib.incoherence.harp import RotationOptions
from lib.linear import kernels, transform_kernels
from lib.utils.errors import UserInputError, run_cli
from lib.utils.io import atomic_write_json
from model.synthetic import random_quantized_linear

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "up": (22016, 4096), "down": (4096, 11008)}
CALLS_PER_GRAPH = 50
REPLAYS = 7


def microseconds_per_call(fn):
    """Median over REPLAYS of a CUDA graph of CALLS_PER_GRAPH calls of fn, per call."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(CALLS_PER_GRAPH):
                fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS_PER_GRAPH)
    return sorted(times)[REPLAYS // 2]


def linear_rows(generator, device):
    rows = []
    for site, (m, n) in SHAPES.items():
        x = torch.randn(1, n, generator=generator).half().to(device)
        weight = torch.randn(m, n, generator=generator).half().to(device)
        row = {"kernel": "E8P12 linear", "site": site, "m": m, "n": n,
               "fp16_cublas_us": microseconds_per_call(lambda: x @ weight.T)}
        for mode in ("had", "harp"):
            linear = random_quantized_linear(m, n, mode, "E8P12", generator, 0.02, device)
            row[f"{mode}_us"] = microseconds_per_call(lambda: linear(x))
        rows.append(row)
    return rows


def transform_rows(ext, generator, device):
    rows = []
    for mode in ("had", "harp"):
        options = RotationOptions(theta_init_scale=0.01) if mode == "harp" else None
        for site, (m, n) in SHAPES.items():
            processor = make_processor(mode, m, n, generator, options).to(device)
            processor.freeze()
            x = torch.randn(1, n, generator=generator).half().to(device)
            y = torch.randn(1, m, generator=generator).to(device)
            rows.append({
                "kernel": f"{mode} transforms", "site": site, "m": m, "n": n,
                "input_us": microseconds_per_call(
                    lambda: transform_kernels.processor_input(ext, processor, x)),
                "output_us": microseconds_per_call(
                    lambda: transform_kernels.processor_output(ext, processor, y, torch.float16)),
            })
    return rows


def matvec_rows(generator, device):
    codebook = get_codebook("E8P12")
    rows = []
    for site, (m, n) in SHAPES.items():
        codes = torch.randint(-32768, 32768, codebook.code_shape(m, n), dtype=codebook.storage_dtype,
                              generator=generator).to(device)
        x = torch.randn(1, n, generator=generator).to(device)
        weight = torch.randn(m, n, generator=generator).half().to(device)
        x_half = x.half()
        ours = microseconds_per_call(lambda: kernels.linear_product(codebook, x, codes))
        fp16 = microseconds_per_call(lambda: x_half @ weight.T)
        code_bytes = codes.numel() * codes.element_size()
        rows.append({"kernel": "E8P12 matvec", "site": site, "m": m, "n": n, "us": ours,
                     "code_gb_per_s": code_bytes / ours / 1e3, "fp16_cublas_us": fp16,
                     "fp16_gb_per_s": 2 * m * n / fp16 / 1e3})
    return rows


def print_table(result):
    print(f"device: {result['device_name']}")
    for row in result["linear"]:
        print(f"{row['kernel']:15s} {row['site']:4s} {row['m']:5d} x {row['n']:5d}: "
              f"had {row['had_us']:6.2f} us, harp {row['harp_us']:6.2f} us; fp16 cuBLAS "
              f"{row['fp16_cublas_us']:6.2f} us")
    for row in result["transforms"]:
        print(f"{row['kernel']:15s} {row['site']:4s} {row['m']:5d} x {row['n']:5d}: "
              f"input {row['input_us']:6.2f} us, output {row['output_us']:6.2f} us")
    for row in result["matvec"]:
        print(f"{row['kernel']:15s} {row['site']:4s} {row['m']:5d} x {row['n']:5d}: "
              f"{row['us']:6.2f} us ({row['code_gb_per_s']:4.0f} GB/s of codes); fp16 cuBLAS "
              f"{row['fp16_cublas_us']:6.2f} us ({row['fp16_gb_per_s']:4.0f} GB/s)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="write the timings as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserInputError("bench_kernels times CUDA kernels: run it on a machine with a GPU")
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        result = {"device_name": torch.cuda.get_device_name(device),
                  "calls_per_graph": CALLS_PER_GRAPH, "replays": REPLAYS,
                  "linear": linear_rows(generator, device),
                  "transforms": transform_rows(kernels.extension(), generator, device),
                  "matvec": matvec_rows(generator, device)}
    print_table(result)
    if args.output:
        atomic_write_json(result, args.output)


if __name__ == "__main__":
    run_cli(main)
