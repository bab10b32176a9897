"""Several processes under torchrun (gloo on the CPU here; NCCL on GPUs) write the
files of a one-process run.

Hessians: each rank pushes a share of the calibration sequences (whole batches)
through the layers and rank 0 adds the float64 sums in rank order, so the files equal
a one-process run's up to the float64 summation order: within 4 float32 ulps of each
tensor's largest entry (bit-identical on this machine). Quantization: the ranks claim
groups of `--layer_batch` layers from a counter in torchrun's store; every group is
quantized exactly once, with the same seeds, so the layer files are bit-identical to a
one-process run's from the same starting folder (same thread count). A crash leaves
only finished files and temporaries of dead processes (the claims die with the launch's
store, and a new launch counts under a new prefix), so a rerun takes over.
"""
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from eval.compare_runs import compare_folders
from lib.utils import distributed
from lib.utils.errors import UserInputError
from lib.utils.hessian import SITES
from quantize_llama import hessian_offline_llama, quantize_finetune_llama
from tiny_llama import assert_same_tensors, cli_fails, collect_hessians, make_tiny_llama

HARP_QUIP = Path(__file__).resolve().parents[1]
LAYERS = 4
HESSIAN_FLAGS = ["--batch_size", "3", "--holdout_size", "2"]   # 8 sequences: batches of 3, 3, 2
QUANT_FLAGS = ["--quip_tune_iters", "1", "--layer_batch", "2", "--seed", "5"]


def torchrun(module, argv, nproc=2):
    """`torchrun --standalone --nproc_per_node nproc -m module argv` (one CPU thread per
    process); returns its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(nproc), "-m", module, *argv],
                          cwd=HARP_QUIP, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


class one_thread:
    """The reference runs in this process with the ranks' thread count (CPU float
    reductions, hence bit-exact results, may depend on it)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    base = make_tiny_llama(root / "base", num_layers=LAYERS)
    return {"root": root, "base": base, "hess": collect_hessians(base, root / "hess", HESSIAN_FLAGS)}


def hessian_argv(world, save):
    return ["--base_model", str(world["base"]), "--device", "cpu", "--save_path", str(save),
            "--devset_size", "8", "--ctx_size", "64", "--data_source", "local", *HESSIAN_FLAGS]


def quant_argv(world, save):
    return ["--base_model", str(world["base"]), "--device", "cpu", "--hessian_path", str(world["hess"]),
            "--save_path", str(save), *QUANT_FLAGS]


def test_hessians_equal_a_one_process_run(world):
    ours = world["root"] / "hess_2ranks"
    output = torchrun("quantize_llama.hessian_offline_llama", hessian_argv(world, ours))
    # whole batches per rank: rank 0 the first 3 sequences, rank 1 the other 5
    assert "rank 0: sequences [0, 3)" in output and "rank 1: sequences [3, 8)" in output
    ref = world["hess"]
    names = sorted(str(p.relative_to(ref)) for p in ref.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(ours)) for p in ours.rglob("*") if p.is_file())
    assert len([n for n in names if n.endswith(".pt")]) == 2 * LAYERS * len(SITES)   # main + held-out
    for name in names:
        if name.endswith(".json"):
            assert (ours / name).read_text() == (ref / name).read_text(), name
            continue
        a = torch.load(ref / name, weights_only=True)
        b = torch.load(ours / name, weights_only=True)
        assert (a["n"], a["ct"]) == (b["n"], b["ct"]), name
        for key in ("flatH", "mu"):
            ulp = torch.finfo(torch.float32).eps * a[key].abs().max()
            assert (a[key] - b[key]).abs().max() <= 4 * ulp, (name, key)
    report = compare_folders(ref, ours)
    assert report["files"] == 2 * LAYERS * len(SITES)
    assert report["max_rel_diff"] <= 4 * torch.finfo(torch.float32).eps


def claimed_groups(output):
    return [re.findall(r"\d+", m) for m in re.findall(r"rank \d quantized layers \[([\d, ]*)\]", output)]


def test_quantized_layers_equal_a_one_process_run_and_a_rerun_takes_over(world):
    """From the same starting folder (what a killed run leaves: a finished layer, the log
    of an unfinished one, a temporary file of a dead writer) a torchrun rerun and a
    one-process rerun write the same files; the finished layer is kept as it is."""
    full = world["root"] / "full"
    with one_thread():
        quantize_finetune_llama.main(quant_argv(world, full))
    crashed = world["root"] / "crashed"
    shutil.copytree(full, crashed)
    for i in range(1, LAYERS):
        (crashed / f"layer_{i:03d}.pt").unlink()
    for i in range(2, LAYERS):
        (crashed / f"layer_{i:03d}.json").unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (crashed / f".layer_002.pt.{dead}.tmp").write_bytes(b"half a layer")

    one, two = world["root"] / "resumed_1proc", world["root"] / "resumed_2ranks"
    shutil.copytree(crashed, one)
    shutil.copytree(crashed, two)
    finished = os.stat(two / "layer_000.pt")
    with one_thread():
        quantize_finetune_llama.main(quant_argv(world, one))
    output = torchrun("quantize_llama.quantize_finetune_llama", quant_argv(world, two))

    # pending layers 1, 2, 3 in groups of --layer_batch 2: each group claimed exactly once
    assert sorted(claimed_groups(output)) == [["1", "2"], ["3"]], output[-3000:]
    assert "resuming: 1 of 4 layers already done" in output
    after = os.stat(two / "layer_000.pt")
    assert (after.st_ino, after.st_mtime_ns) == (finished.st_ino, finished.st_mtime_ns)
    names = sorted(p.name for p in two.iterdir())
    assert names == sorted(p.name for p in one.iterdir())
    assert names == sorted(["quant_config.json"] + [f"layer_{i:03d}.{s}" for i in range(LAYERS) for s in ("json", "pt")])
    assert (two / "quant_config.json").read_text() == (full / "quant_config.json").read_text()
    for i in range(LAYERS):
        assert_same_tensors(two / f"layer_{i:03d}.pt", one / f"layer_{i:03d}.pt")
    report = compare_folders(one, two)
    assert (report["files"], report["identical_files"], report["files_with_other_codes"]) == (LAYERS, LAYERS, [])


def test_compare_runs_reports_differences(tmp_path):
    for name, codes, scale in [("a", [1, 2], 1.0), ("b", [1, 3], 1.0 + 2 ** -20)]:
        (tmp_path / name).mkdir()
        torch.save({"linears": {"o": {"state": {"Qidxs": torch.tensor(codes), "SV": torch.tensor([2.0, scale])}}}},
                   tmp_path / name / "layer_000.pt")
        torch.save({"flatH": torch.ones(3)}, tmp_path / name / "0_o.pt")
    report = compare_folders(tmp_path / "a", tmp_path / "b")
    assert (report["files"], report["identical_files"]) == (2, 1)
    assert report["files_with_other_codes"] == ["layer_000.pt"]
    assert report["max_rel_diff"] == pytest.approx(2 ** -21)
    (tmp_path / "b" / "0_o.pt").unlink()
    with pytest.raises(UserInputError, match=r"1 file\(s\) of .* are missing in .*0_o.pt"):
        compare_folders(tmp_path / "a", tmp_path / "b")


def test_batch_shards_are_whole_batches_in_order():
    for items, batch, world_size in [(8, 3, 2), (256, 8, 2), (10, 4, 3), (5, 4, 4), (7, 1, 3), (1, 8, 2)]:
        shards = [distributed.batch_shard(items, batch, r, world_size) for r in range(world_size)]
        assert shards[0].start == 0 and shards[-1].stop == items
        for a, b in zip(shards, shards[1:]):
            assert a.stop == b.start
        batches = -(-items // batch)
        sizes = [-(-(s.stop - s.start) // batch) for s in shards]   # whole batches per rank
        assert sum(sizes) == batches and max(sizes) - min(sizes) <= 1
        assert all(s.start % batch == 0 for s in shards)


def run_ranks(store, world_size, work):
    """`work(ranks)` on `world_size` threads standing for the ranks of one launch that
    share `store`; returns their results by rank (a thread's exception is returned)."""
    results = [None] * world_size

    def run(rank):
        try:
            results[rank] = work(distributed.Ranks(store, rank, world_size, "cpu", "cpu"))
        except Exception as err:
            results[rank] = err

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_claims_give_every_item_to_one_rank_and_a_new_launch_ignores_old_claims():
    store = dist.HashStore()

    def take_all(count):
        def work(ranks):
            mine = list(ranks.claims("queue", count))
            ranks.barrier("end")
            return mine
        return work

    claimed = run_ranks(dist.PrefixStore("harp/1/", store), 3, take_all(50))
    assert sorted(i for mine in claimed for i in mine) == list(range(50))
    # a crashed launch claimed items 0 and 1 and died; an elastic restart shares the
    # store but counts under its own prefix, so it takes every item again
    crashed = distributed.Ranks(dist.PrefixStore("harp/2/", store), 0, 2, "cpu", "cpu").claims("queue", 4)
    assert [next(crashed), next(crashed)] == [0, 1]
    claimed = run_ranks(dist.PrefixStore("harp/3/", store), 2, take_all(4))
    assert sorted(i for mine in claimed for i in mine) == [0, 1, 2, 3]


def test_share_gives_rank0s_value_or_its_error_to_every_rank():
    store = dist.HashStore()
    assert run_ranks(store, 3, lambda ranks: ranks.share("pending", lambda: [1, 2, ranks.rank])) == [[1, 2, 0]] * 3

    def refuse():
        raise UserInputError("folder holds other settings; use a new folder")

    results = run_ranks(store, 3, lambda ranks: ranks.share("setup", refuse))
    assert all(isinstance(err, UserInputError) and "use a new folder" in str(err) for err in results)


LAUNCH_ENV = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


def test_bad_launches_fail_before_any_work(world, tmp_path, monkeypatch, caplog):
    save = tmp_path / "q"
    error = cli_fails(caplog, quantize_finetune_llama.main, quant_argv(world, save) + ["--num_workers", "2"])
    assert re.search(r"--num_workers was replaced by torchrun: `torchrun --standalone --nproc_per_node 2", error)
    monkeypatch.setenv("WORLD_SIZE", "2")
    error = cli_fails(caplog, quantize_finetune_llama.main, quant_argv(world, save) + ["--ft_epochs", "1"])
    assert re.search(r"--ft_epochs > 0 runs in one process.*python -m, not torchrun", error)
    error = cli_fails(caplog, hessian_offline_llama.main, hessian_argv(world, tmp_path / "h"))
    assert re.search(r"WORLD_SIZE is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not: .*torchrun", error)
    for name, value in LAUNCH_ENV.items():
        monkeypatch.setenv(name, value)
    argv = quant_argv(world, save)
    argv[argv.index("cpu")] = "cuda:1"
    error = cli_fails(caplog, quantize_finetune_llama.main, argv)
    assert re.search(r"each process uses cuda:LOCAL_RANK; pass --device cuda", error)
    assert not save.exists() and not (tmp_path / "h").exists()
