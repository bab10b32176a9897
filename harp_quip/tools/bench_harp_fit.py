"""Time HARP fitting on SmolLM2-135M's site shapes (random W and H; speed does not
depend on the values): the E8P12 proxy target (torch addmm path vs the Triton
search) and whole Adam steps of a batch of L same-site linears, one process.

    python -m tools.bench_harp_fit --steps 20 --batch 1 30
"""
import argparse
import time

import torch

from lib.codebook import get_codebook, triton_search
from lib.incoherence.harp import FitOptions, HARPProcessor, VectorCodebookTarget, fit_processors

SHAPES = {"qkv": (960, 576), "o": (576, 576), "up": (3072, 576), "down": (576, 1536)}


def timed(fn, repeats=3):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def target_ms(cb, V, kernel):
    use = triton_search.available
    if not kernel:
        triton_search.available = lambda x: False
    try:
        return 1e3 * timed(lambda: cb.quantize(V, chunk_rows=1 << 20))
    finally:
        triton_search.available = use


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 30])
    args = p.parse_args()
    cb = get_codebook("E8P12")
    target = VectorCodebookTarget(cb, 0.9, 1 << 20)
    print(f"{'site':5s} {'L':>3s} {'target torch ms':>16s} {'target triton ms':>17s} "
          f"{'step ms':>8s} {'ms per linear-step':>19s}")
    for site, (m, n) in SHAPES.items():
        for L in args.batch:
            W = [torch.randn(m, n, device="cuda") for _ in range(L)]
            H = []
            for _ in range(L):
                X = torch.randn(2 * n, n, device="cuda")
                H.append(X.T @ X / X.shape[0] + 0.01 * torch.eye(n, device="cuda"))
            V = torch.randn(L * m * n // 8, 8, device="cuda")
            t_torch, t_triton = target_ms(cb, V, False), target_ms(cb, V, True)
            procs = [HARPProcessor(n, m).cuda() for _ in range(L)]
            fit_processors(procs, H, W, target, FitOptions(steps=2))
            torch.cuda.synchronize()
            start = time.perf_counter()
            fit_processors(procs, H, W, target, FitOptions(steps=args.steps))
            torch.cuda.synchronize()
            step = 1e3 * (time.perf_counter() - start) / args.steps
            print(f"{site:5s} {L:3d} {t_torch:16.2f} {t_triton:17.2f} {step:8.2f} {step / L:19.2f}")
            del W, H, V, procs
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
