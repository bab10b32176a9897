"""kill -9 in the middle of a run loses at most the work in progress.

quantize_finetune_llama: each layer file is written atomically and marks a finished
layer; a rerun keeps the finished ones (same inode and mtime), removes the temporary
files of the killed process, redoes the rest and ends with the same tensors as an
uninterrupted run. hfize_llama: the export is written as `<out>.partial` and swapped in
by two renames, so `<out>` is always either a complete export or absent (old export in
`<out>.old`); a rerun removes the leftovers and writes a complete export.
"""
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from model.quantized_llama import WEIGHTS_FILE, load_quantized_model
from quantize_llama import hfize_llama, quantize_finetune_llama
from tiny_llama import assert_same_tensors, collect_hessians, folder_snapshot, make_tiny_llama

HARP_QUIP = pathlib.Path(__file__).resolve().parents[1]
LAYERS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 4-layer tiny model, its Hessians, an uninterrupted quantized run and its export."""
    root = tmp_path_factory.mktemp("crash")
    base = make_tiny_llama(root / "base", num_layers=LAYERS)
    hess = collect_hessians(base, root / "hess")
    world = {"root": root, "base": base, "hess": hess}
    quantize_finetune_llama.main(quant_args(world, root / "reference"))
    hfize_llama.main(["--quantized_path", str(root / "reference"), "--hf_output_path", str(root / "reference_hf")])
    return world


def quant_args(world, save):
    """One layer per batch, so that layers finish (and are written) one after another."""
    return ["--base_model", str(world["base"]), "--device", "cpu", "--hessian_path", str(world["hess"]),
            "--save_path", str(save), "--quip_tune_iters", "2", "--layer_batch", "1", "--seed", "3"]


def start(module, argv, log):
    """`python -m module argv` (output to the file `log`) with this process's CPU thread
    count (float reductions, hence bit-exact results, may depend on it)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", module, *argv], cwd=HARP_QUIP, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def kill_when(proc, condition, log, timeout=120):
    """SIGKILL `proc` as soon as condition() holds (polled every 2 ms)."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before the kill: "
                        f"{log.read_text()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail("timed out waiting for the run to reach the kill point")
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def stamps(paths):
    return {p.name: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths}


def test_killed_quantization_resumes_without_redoing_finished_layers(world, tmp_path):
    save = tmp_path / "q"
    log = tmp_path / "run.log"
    proc = start("quantize_llama.quantize_finetune_llama", quant_args(world, save), log)
    kill_when(proc, lambda: (save / "layer_000.pt").exists(), log)
    finished = sorted(save.glob("layer_*.pt"))
    assert finished and len(finished) < LAYERS, finished
    for path in finished:   # whatever exists after the kill is a complete layer
        assert_same_tensors(path, world["root"] / "reference" / path.name)
    before = stamps(finished + [p.with_suffix(".json") for p in finished])
    # what a kill in the middle of a write leaves: the writer's temporary file
    stale = save / f".layer_{LAYERS - 1:03d}.pt.{proc.pid}.tmp"
    stale.write_bytes(b"half a layer")

    quantize_finetune_llama.main(quant_args(world, save))

    assert stamps(finished + [p.with_suffix(".json") for p in finished]) == before
    assert not stale.exists()
    assert not [p for p in save.iterdir() if p.name.startswith(".") or p.suffix not in (".pt", ".json")]
    for i in range(LAYERS):
        assert_same_tensors(save / f"layer_{i:03d}.pt", world["root"] / "reference" / f"layer_{i:03d}.pt")


def exported_tensors(folder):
    return load_file(folder / WEIGHTS_FILE)


def assert_complete_export(folder, reference):
    ours, ref = exported_tensors(folder), exported_tensors(reference)
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    model, tokenizer = load_quantized_model(folder)
    with torch.no_grad():
        assert torch.isfinite(model(tokenizer("a test", return_tensors="pt").input_ids).logits).all()


def test_killed_export_leaves_a_complete_export_or_none(world, tmp_path):
    """A real kill -9 while `<out>.partial` is being written (if the export is too fast to
    catch, the checks still hold), then a rerun."""
    reference, out = world["root"] / "reference_hf", tmp_path / "exports" / "hf"
    partial = tmp_path / "exports" / "hf.partial"
    log = tmp_path / "hfize.log"
    proc = start("quantize_llama.hfize_llama", ["--quantized_path", str(world["root"] / "reference"),
                                                "--hf_output_path", str(out)], log)
    kill_when(proc, lambda: partial.exists() or out.exists(), log)
    assert not out.exists() or (out / "export_log.json").exists()   # never a half-written <out>
    hfize_llama.main(["--quantized_path", str(world["root"] / "reference"), "--hf_output_path", str(out)])
    assert_complete_export(out, reference)
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]


class Crash(BaseException):
    """Stands for kill -9 at a chosen point of the export (nothing after it runs)."""


def test_export_replaces_an_existing_export_atomically(world, tmp_path, monkeypatch):
    """Crash points: while writing `<out>.partial` (the old export stays in place) and
    between the two renames (`<out>` absent, the old export whole in `<out>.old`, put
    back by the next run); a rerun clears the leftovers and exports completely."""
    reference, q = world["root"] / "reference_hf", world["root"] / "reference"
    out = tmp_path / "hf"
    argv = ["--quantized_path", str(q), "--hf_output_path", str(out)]
    hfize_llama.main(argv)
    (out / "marker_of_the_old_export").write_text("old\n")
    old = folder_snapshot(out)

    def crash_while_writing(*args, **kwargs):
        (tmp_path / "hf.partial" / WEIGHTS_FILE).write_bytes(b"half a file")
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(hfize_llama, "save_file", crash_while_writing)
        with pytest.raises(Crash):
            hfize_llama.main(argv)
    assert folder_snapshot(out) == old
    assert (tmp_path / "hf.partial" / WEIGHTS_FILE).read_bytes() == b"half a file"

    real_rename = pathlib.Path.rename

    def crash_before_swap(self, target):
        if self.name.endswith(".partial"):
            raise Crash
        return real_rename(self, target)

    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "rename", crash_before_swap)
        with pytest.raises(Crash):
            hfize_llama.main(argv)
    assert not out.exists()
    assert folder_snapshot(tmp_path / "hf.old") == old
    assert_complete_export(tmp_path / "hf.partial", reference)

    with monkeypatch.context() as m:   # the next run puts the old export back before writing
        m.setattr(hfize_llama, "save_file", crash_while_writing)
        with pytest.raises(Crash):
            hfize_llama.main(argv)
    assert folder_snapshot(out) == old and not (tmp_path / "hf.old").exists()

    hfize_llama.main(argv)
    assert_complete_export(out, reference)
    assert not (out / "marker_of_the_old_export").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
