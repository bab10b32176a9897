"""Viterbi throughput of the trellis quantizer, and what it implies for a model.

    python tools/bench_viterbi.py --device cuda                  # L 16, K 2, V 2, HYB 9 bits
    python tools/bench_viterbi.py --device cpu --L 12 --tiles 64

Times the two-pass tail-biting quantization of random N(0, 1) tiles of 256 weights in
chunks of `--chunk` tiles (LDLQ uses 2^(24 - L); HARP's target --harp_chunk_size) and
prints tiles per second, the MSE, and the time one full pass over every tile of the
synthetic shapes would take (one pass = LDLQ of the whole model; HARP adds one pass
per target refresh, i.e. about harp_steps / harp_q_recompute_every + 2 passes).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # harp_qtip, for `lib` and `model`
from lib.codebook import get_codebook  # noqa: E402
from model.synthetic import SHAPES  # noqa: E402


def linear_weights(shape):
    """Weights of the quantized linears of one synthetic shape."""
    s = SHAPES[shape]
    h, i = s["hidden_size"], s["intermediate_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    return s["num_hidden_layers"] * (2 * h * h + 2 * h * kv + 3 * h * i)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--L", type=int, default=16)
    p.add_argument("--K", type=int, default=2)
    p.add_argument("--V", type=int, default=2)
    p.add_argument("--decode_mode", default="quantlut_sym")
    p.add_argument("--tlut_bits", type=int, default=9)
    p.add_argument("--tiles", type=int, default=4096, help="tiles timed")
    p.add_argument("--chunk", type=int, default=None, help="tiles per Viterbi call (default 2^(24 - L))")
    args = p.parse_args(argv)
    cb = get_codebook(L=args.L, K=args.K, V=args.V, decode_mode=args.decode_mode, tlut_bits=args.tlut_bits)
    q = cb.quantizer()
    chunk = args.chunk or q.chunk_rows
    X = torch.randn(args.tiles, 256, generator=torch.Generator().manual_seed(0)).to(args.device) * cb.code_rms
    q.quantize(X[:min(chunk, args.tiles)], chunk)            # warm-up (tables, allocator)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    X_hat, _ = q.quantize(X, chunk)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rate = args.tiles / seconds
    mse = ((X - X_hat) ** 2).mean().item() / cb.code_rms ** 2
    print(f"{cb.config()} on {args.device}, chunk {chunk}: {rate:,.0f} tiles/s, MSE {mse:.4f} "
          f"(per weight, N(0, 1) scaled to the code's RMS)")
    for shape in SHAPES:
        tiles = linear_weights(shape) // 256
        print(f"  {shape}: {tiles:,} tiles, one full pass ~ {tiles / rate / 60:.1f} min")


if __name__ == "__main__":
    main()
