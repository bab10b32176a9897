"""Search Goethals-Seidel sequences for Hadamard matrices of order 4v.

Finds four +-1 sequences of length v whose periodic autocorrelations (PAF)
sum to zero at every nonzero shift, and prints them as the `_GS_SEQUENCES`
constants embedded in lib/utils/hadamard.py. Row sums (a, b, c, d) satisfy
a^2 + b^2 + c^2 + d^2 = 4v. Two methods, tried in this order:

  orbits  exact meet-in-the-middle over sequences that are constant on the
          orbits of i -> t*i (mod v) for a unit t. Then P(t*s) = P(s), so the
          search space shrinks to 2^(#orbits) sequences per row; pairs (A, B)
          are hashed by P_A + P_B and matched against -(P_C + P_D).
          (t = -1 gives symmetric, Williamson-type sequences.)
  anneal  Metropolis local search in C (tools/gs_search.c, compiled here with
          gcc), run as parallel workers over all row-sum patterns and seeds.

Usage (from harp_quip/):
    python tools/search_gs_sequences.py 29 39 43 --jobs 2 --seconds 600
"""
import argparse
import itertools
import math
import os
import pathlib
import subprocess
import tempfile
import time

import numpy as np

SOURCE = pathlib.Path(__file__).with_name("gs_search.c")


def row_sum_patterns(v: int) -> list[tuple[int, ...]]:
    """Nonnegative odd (a <= b <= c <= d) with a^2 + b^2 + c^2 + d^2 = 4v."""
    odd = range(1, math.isqrt(4 * v) + 1, 2)
    return [t for t in itertools.combinations_with_replacement(odd, 4) if sum(x * x for x in t) == 4 * v]


def periodic_autocorrelations(seqs: np.ndarray) -> np.ndarray:
    """(N, v) sequences -> (N, (v-1)//2) PAF values at shifts 1 .. (v-1)/2."""
    v = seqs.shape[1]
    return np.stack([(seqs * np.roll(seqs, -s, axis=1)).sum(1) for s in range(1, v // 2 + 1)], axis=1)


def is_solution(seqs: list[np.ndarray]) -> bool:
    return not periodic_autocorrelations(np.array(seqs)).sum(0).any()


# --- orbits -----------------------------------------------------------------


def multiplier_orbits(v: int, t: int) -> list[list[int]]:
    seen, orbits = set(), []
    for i in range(v):
        orbit = []
        while i not in seen:
            seen.add(i)
            orbit.append(i)
            i = i * t % v
        if orbit:
            orbits.append(orbit)
    return orbits


def orbit_partitions(v: int, max_orbits: int) -> list[tuple[int, list[list[int]]]]:
    """(t, orbits) for each distinct multiplier orbit partition, fewest orbits first."""
    found = {}
    for t in range(2, v):
        if math.gcd(t, v) == 1:
            orbits = multiplier_orbits(v, t)
            key = frozenset(map(frozenset, orbits))
            if len(orbits) <= max_orbits and key not in found:
                found[key] = (t, orbits)
    return sorted(found.values(), key=lambda item: len(item[1]))


def orbit_search(v: int, orbits: list[list[int]]):
    """Exhaustive search among orbit-constant sequences; (sequences, row sums) or None."""
    r = len(orbits)
    bits = (np.arange(2**r)[:, None] >> np.arange(r)) & 1
    seqs = np.zeros((2**r, v), dtype=np.int64)
    for k, orbit in enumerate(orbits):
        seqs[:, orbit] = 1 - 2 * bits[:, k : k + 1]
    sums, pafs = seqs.sum(1), periodic_autocorrelations(seqs).astype(np.int16)
    for pattern in row_sum_patterns(v):
        ia, ib, ic, id_ = (np.flatnonzero(sums == s) for s in pattern)
        left = (pafs[ia][:, None] + pafs[ib][None]).reshape(-1, pafs.shape[1])
        index = {row.tobytes(): n for n, row in enumerate(left)}
        right = -(pafs[ic][:, None] + pafs[id_][None]).reshape(-1, pafs.shape[1])
        for m, row in enumerate(right):
            n = index.get(row.tobytes())
            if n is not None:
                picks = (ia[n // len(ib)], ib[n % len(ib)], ic[m // len(id_)], id_[m % len(id_)])
                return [seqs[i] for i in picks], pattern
    return None


# --- anneal -----------------------------------------------------------------


def compile_annealer(workdir: str) -> str:
    binary = os.path.join(workdir, "gs_search")
    subprocess.run(["gcc", "-O2", "-o", binary, str(SOURCE), "-lm"], check=True)
    return binary


def anneal_search(binary: str, v: int, jobs: int, seconds: float, temperature: float, seed: int):
    """Run C workers until one succeeds; (sequences, row sums) or None."""
    tasks = itertools.cycle(row_sum_patterns(v))
    deadline = time.monotonic() + seconds
    running = {}
    try:
        while time.monotonic() < deadline:
            while len(running) < jobs:
                sums = next(tasks)
                seed += 1
                budget = max(1.0, min(120.0, deadline - time.monotonic()))
                args = [binary, str(v), *map(str, sums), str(seed), str(budget), str(temperature)]
                running[subprocess.Popen(args, stdout=subprocess.PIPE, text=True)] = sums
            time.sleep(0.05)
            for proc in [p for p in running if p.poll() is not None]:
                sums = running.pop(proc)
                line = proc.stdout.read().strip()
                if proc.returncode == 0:
                    return [np.array([1 if ch == "+" else -1 for ch in s]) for s in line.split()], sums
    finally:
        for proc in running:
            proc.kill()
            proc.wait()
    return None


# --- driver -----------------------------------------------------------------


def find_sequences(v: int, args, annealer: str | None):
    """(sequences, row sums, method description) or None."""
    if "orbits" in args.methods:
        for t, orbits in orbit_partitions(v, args.max_orbits):
            result = orbit_search(v, orbits)
            if result is not None:
                return (*result, f"orbits of i -> {t}*i ({len(orbits)} orbits)")
    if annealer is not None:
        result = anneal_search(annealer, v, args.jobs, args.seconds, args.temperature, args.seed + 1000 * v)
        if result is not None:
            return (*result, f"anneal, T={args.temperature:g}")
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lengths", type=int, nargs="+", help="odd sequence lengths v (order 4v)")
    parser.add_argument("--methods", nargs="+", choices=["orbits", "anneal"], default=["orbits", "anneal"])
    parser.add_argument("--max_orbits", type=int, default=12, help="largest orbit count tried by 'orbits'")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel 'anneal' workers")
    parser.add_argument("--seconds", type=float, default=1800.0, help="'anneal' wall-clock budget per length")
    parser.add_argument("--temperature", type=float, default=16.0,
                        help="'anneal' Metropolis temperature")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    found = {}
    with tempfile.TemporaryDirectory() as workdir:
        annealer = compile_annealer(workdir) if "anneal" in args.methods else None
        for v in args.lengths:
            start = time.monotonic()
            result = find_sequences(v, args, annealer)
            wall = time.monotonic() - start
            if result is None:
                print(f"v={v}: not found ({wall:.1f} s)", flush=True)
                continue
            seqs, sums, method = result
            assert is_solution(seqs)
            print(f"v={v}: found by {method}, row sums {sums}, {wall:.1f} s", flush=True)
            found[v] = ["".join("+" if x > 0 else "-" for x in s) for s in seqs]

    print("_GS_SEQUENCES = {")
    for v, strings in found.items():
        print(f"    {v}: (")
        for s in strings:
            print(f'        "{s}",')
        print("    ),")
    print("}")


if __name__ == "__main__":
    main()
