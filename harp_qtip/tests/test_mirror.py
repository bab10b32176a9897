"""Files shared with harp_quip are byte-for-byte copies (one source of truth:
harp_quip). `python tools/sync_mirror.py` copies them over; this test fails when a
copy differs. MIRRORED keep their path, RENAMED live under another folder name (the
CUDA sources of the shared transform kernels). Everything not listed here is QTIP's
own: lib/codebook/* (the trellis quantizer behind the codebook contract),
lib/linear/kernels.py (this backend's kernels), qtip-kernels/ except the transforms,
model/synthetic.py, the scripts, README and requirements."""
from pathlib import Path

import pytest

BACKEND = Path(__file__).resolve().parents[1]
QUIP = BACKEND.parent / "harp_quip"
MIRRORED = (
    # the HARP core and the other incoherence processors
    "lib/incoherence/__init__.py",
    "lib/incoherence/base.py",
    "lib/incoherence/harp.py",
    "lib/incoherence/rht.py",
    # LDLQ, per-linear quantization, HARP's target, fine-tuning (codebook-agnostic)
    "lib/algo/__init__.py",
    "lib/algo/finetune.py",
    "lib/algo/harp_target.py",
    "lib/algo/ldlq.py",
    "lib/algo/quip.py",
    "lib/linear/__init__.py",
    "lib/linear/quantized_linear.py",
    "lib/linear/transform_kernels.py",
    "lib/utils/__init__.py",
    "lib/utils/data.py",
    "lib/utils/distributed.py",
    "lib/utils/errors.py",
    "lib/utils/hadamard.py",
    "lib/utils/hessian.py",
    "lib/utils/io.py",
    "lib/utils/model_loading.py",
    "lib/utils/reuse.py",
    "lib/__init__.py",
    "model/__init__.py",
    "model/decoder.py",
    "model/quantized_llama.py",
    # the pipeline stages
    "quantize_llama/__init__.py",
    "quantize_llama/finetune_e2e_llama.py",
    "quantize_llama/finetune_layers.py",
    "quantize_llama/hessian_offline_llama.py",
    "quantize_llama/hfize_llama.py",
    "quantize_llama/layers.py",
    "quantize_llama/quantize_finetune_llama.py",
    # evaluation
    "eval/__init__.py",
    "eval/cli_common.py",
    "eval/compare_runs.py",
    "eval/eval_ppl.py",
    "eval/eval_speed.py",
    "eval/eval_zeroshot.py",
    "eval/harp_transform_cost.py",
    "eval/interactive_gen.py",
    "eval/plot_proxy.py",
    "eval/results_table.py",
    "eval/speed_table.py",
    "eval/step_profile.py",
    "eval/zeroshot_table.py",
    "eval/tasks/arc_challenge_offline.yaml",
    "eval/tasks/arc_easy_offline.yaml",
    "eval/tasks/hellaswag_offline.yaml",
    "eval/tasks/offline_data.py",
    "eval/tasks/piqa_offline.yaml",
    "eval/tasks/winogrande_offline.yaml",
    # tests of mirrored code, and test helpers
    "tests/test_harp_transform_cost.py",
    "tests/test_transform_kernels.py",
    "tests/tiny_llama.py",
)
# harp_qtip path -> harp_quip path: the inference transforms' CUDA sources, compiled into
# each backend's own extension.
RENAMED = {
    "qtip-kernels/dependent_launch.cuh": "quiptools/dependent_launch.cuh",
    "qtip-kernels/transforms.cu": "quiptools/transforms.cu",
    "qtip-kernels/transforms_binding.h": "quiptools/transforms_binding.h",
}


def mirrored_pairs():
    """(path here, path in harp_quip) of every mirrored file."""
    return [(BACKEND / f, QUIP / f) for f in MIRRORED] + [
        (BACKEND / ours, QUIP / theirs) for ours, theirs in RENAMED.items()]


@pytest.mark.parametrize("ours, theirs", mirrored_pairs(),
                         ids=[str(ours.relative_to(BACKEND)) for ours, _ in mirrored_pairs()])
def test_mirrored_file_is_identical(ours, theirs):
    assert ours.read_bytes() == theirs.read_bytes(), (
        f"{ours.relative_to(BACKEND)} differs from harp_quip/{theirs.relative_to(QUIP)}; edit "
        f"harp_quip's version, then run `python tools/sync_mirror.py` in harp_qtip")
