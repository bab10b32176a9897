"""Micro-benchmark: the qtip-kernels fused decode-matvec against torch's fp16 matmul.

    cd harp_qtip && python qtip-kernels/bench_matvec.py [--shapes 4096x4096,11008x4096]
        [--K 2,3,4] [--rows 1,8] [--reps 200]

For every W' shape (m x n), K and row count k it times, on the current GPU:
  qtip fp16 x / qtip fp32 x   trellis_matvec (codes read from memory, decoded in-kernel)
  torch fp16                  x (k, n) fp16 @ W (m, n)^T fp16 (cuBLAS, the dense baseline)
  decode fp16                 trellis_decode to fp16 (the > 8 rows path's first half)
Each time is the median over replays of a CUDA graph of `reps` back-to-back calls that
rotate through enough copies of the weights (codes or fp16 W) to exceed twice the L2
cache, so every call reads its weights from HBM and launch overhead is excluded. Before
timing, each kernel result is checked against float64 (relative error < 1e-4).
"code GB/s" = bytes the matvec must read (codes + x) and write (y) over its time; "copy
GB/s" is a device-to-device copy (read + write) of 1 GiB for scale.

Prints a table, then one JSON line (prefixed "JSON ") with every number.
"""
import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # harp_qtip: `lib`

from lib.codebook.computed_codes import hyb  # noqa: E402
from lib.codebook.trellis import TrellisSpec, unpack  # noqa: E402
from lib.linear import kernels  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,11008x4096",
                        help="comma-separated m x n of W' (y = x W'^T, x has n columns)")
    parser.add_argument("--K", default="2,3,4", help="bits per weight, comma-separated")
    parser.add_argument("--rows", default="1,8", help="rows of x (batch), comma-separated, <= 8")
    parser.add_argument("--reps", type=int, default=200, help="calls per graph replay")
    parser.add_argument("--replays", type=int, default=7, help="timed graph replays (median)")
    return parser.parse_args(argv)


def time_graph(fns, reps, replays):
    """Median microseconds per call of the callables `fns` (cycled) captured `reps` times in
    one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns[:3]:
            fn()   # warm-up outside the graph (module load, kernel attributes)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / reps)
    del graph
    return statistics.median(times)


def copy_bandwidth():
    """GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    us = time_graph([lambda: dst.copy_(src)], reps=10, replays=5)
    return 2 * src.numel() * 4 / (us * 1e-6) / 1e9


def copies_for(nbytes, l2_bytes):
    return max(2, math.ceil(2 * l2_bytes / nbytes))


def reference_weight(packed, tlut, m, n, K):
    states = unpack(packed, TrellisSpec(16, K, 2, 256))
    return hyb(states, tlut).reshape(m // 16, n // 16, 16, 16).permute(0, 2, 1, 3).reshape(m, n)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def bench_shape(m, n, K, rows_list, args, l2_bytes, generator):
    tlut = torch.randn(512, 2, generator=generator).cuda()
    code_bytes = m * n * K // 8
    n_codes = copies_for(code_bytes, l2_bytes)
    codes = [torch.randint(-32768, 32768, (m // 16 * (n // 16), 16 * K), generator=generator,
                           dtype=torch.int64).to(torch.int16).cuda() for _ in range(n_codes)]
    weight = reference_weight(codes[0], tlut, m, n, K)
    n_dense = copies_for(m * n * 2, l2_bytes)
    dense = [weight.half()] + [torch.randn(m, n, generator=generator).half().cuda()
                               for _ in range(n_dense - 1)]
    results = []
    for k in rows_list:
        x32 = torch.randn(k, n, generator=generator).cuda()
        x16 = x32.half()
        ref = x32.double() @ weight.double().T
        for x in (x16, x32):
            err = rel_err(kernels.trellis_matvec(x, codes[0], tlut, m, n, K), x.double() @ weight.double().T)
            if not err < 1e-4:
                raise SystemExit(f"matvec wrong for {m}x{n} K={K} k={k} {x.dtype}: relative error {err:.3g}")
        dense_err = rel_err((x16 @ dense[0].T).float(), ref)
        row = {"m": m, "n": n, "K": K, "rows": k}
        row["qtip_fp16x_us"] = time_graph(
            [lambda c=c: kernels.trellis_matvec(x16, c, tlut, m, n, K) for c in codes], args.reps, args.replays)
        row["qtip_fp32x_us"] = time_graph(
            [lambda c=c: kernels.trellis_matvec(x32, c, tlut, m, n, K) for c in codes], args.reps, args.replays)
        row["torch_fp16_us"] = time_graph([lambda w=w: x16 @ w.T for w in dense], args.reps, args.replays)
        moved = code_bytes + k * n * 2 + k * m * 4
        row["qtip_fp16x_GBps"] = moved / (row["qtip_fp16x_us"] * 1e-6) / 1e9
        row["speedup_vs_fp16"] = row["torch_fp16_us"] / row["qtip_fp16x_us"]
        row["torch_fp16_rel_err"] = dense_err
        results.append(row)
    decoded = kernels.trellis_decode(codes[0], tlut, m, n, K, torch.float16)
    if not torch.equal(decoded, weight.half()):
        raise SystemExit(f"decode wrong for {m}x{n} K={K}")
    decode_us = time_graph([lambda c=c: kernels.trellis_decode(c, tlut, m, n, K, torch.float16)
                            for c in codes[:4]], max(10, args.reps // 10), args.replays)
    for row in results:
        row["decode_fp16_us"] = decode_us
    return results


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_matvec needs a CUDA device")
    if kernels.load_qtip_kernels() is None:
        raise SystemExit(f"qtip-kernels unavailable: {kernels.unavailable_reason()}")
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    Ks = [int(v) for v in args.K.split(",")]
    rows_list = [int(v) for v in args.rows.split(",")]
    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
    generator = torch.Generator().manual_seed(0)
    copy_gbps = copy_bandwidth()
    results = []
    for m, n in shapes:
        for K in Ks:
            results.extend(bench_shape(m, n, K, rows_list, args, l2_bytes, generator))
            torch.cuda.empty_cache()

    header = (f"{'m x n':>12} {'K':>2} {'k':>2} {'qtip16x us':>10} {'qtip32x us':>10} "
              f"{'fp16 mm us':>10} {'speedup':>7} {'code GB/s':>9} {'decode16 us':>11}")
    print(f"device: {props.name}; device-to-device copy {copy_gbps:.0f} GB/s (read + write)")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['m']:>5} x {r['n']:<5} {r['K']:>2} {r['rows']:>2} {r['qtip_fp16x_us']:>10.2f} "
              f"{r['qtip_fp32x_us']:>10.2f} {r['torch_fp16_us']:>10.2f} {r['speedup_vs_fp16']:>7.2f} "
              f"{r['qtip_fp16x_GBps']:>9.0f} {r['decode_fp16_us']:>11.2f}")
    print("JSON " + json.dumps({"bench": "qtip_matvec", "device": props.name, "torch": torch.__version__,
                                "copy_GBps": copy_gbps, "results": results}))


if __name__ == "__main__":
    main()
