"""The inference transforms on the GPU (lib/linear/transform_kernels.py, transforms.cu):
QuIP#'s Hadamard, HARP's StructuredRotation and a whole `had` / `harp` processor against
the torch path. Shared by both backends (mirrored into harp_qtip); the kernels are part
of each backend's extension (lib.linear.kernels.extension()).

On CPU only the launch plan is checked; the GPU tests (marked gpu, skipped without CUDA)
build the extension (installed module or JIT) on first use.
"""
import math

import pytest
import torch

from lib.incoherence import make_processor
from lib.incoherence.harp import RotationOptions, StructuredRotation
from lib.linear import kernels, transform_kernels
from lib.utils.hadamard import hadamard_transform

SIZES = (576, 960, 1536, 3072, 4096, 11008, 12288, 22016, 128, 24)
TOL = 1e-5  # fp32, the same products summed in another order


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("n", SIZES + (7 * 4096, 43 * 47))
@pytest.mark.parametrize("passes", (1, 2))
@pytest.mark.parametrize("transpose", (False, True))
def test_rotation_plan_covers_every_stage_once_in_order(n, passes, transpose):
    rotation = StructuredRotation(n, passes=passes)
    radices = rotation.schedule * passes
    strides = rotation.strides * passes
    groups = transform_kernels.rotation_plan(radices, strides, transpose)
    order = [t for group in groups for t in group]
    assert order == (list(range(len(radices)))[::-1] if transpose else list(range(len(radices))))
    for group in groups:
        digits = sorted((strides[t], radices[t]) for t in group)
        for (s, b), (s_next, _) in zip(digits, digits[1:]):
            assert s_next == s * b  # consecutive digits of the mixed-radix index
        size = math.prod(radices[t] for t in group)
        assert len(group) == 1 or (size <= transform_kernels.MAX_GROUP and size * sum(
            radices[t] for t in group) * 4 <= transform_kernels.MAX_GROUP_BYTES)
    # two groups per pass, three where a 32 KB-capped run of radix-8 stages meets a 43 or 7
    assert len(groups) <= (3 if n in (22016, 7 * 4096) else 2) * passes


@pytest.mark.parametrize("n, forward, backward", (
    (4096, [[0, 1], [2, 3]], [[3, 2], [1, 0]]),
    (12288, [[0, 1], [2, 3, 4]], [[4, 3, 2], [1, 0]]),
    (11008, [[0, 1, 2], [3]], [[3], [2, 1, 0]]),
    (576, [[0], [1, 2, 3]], [[3, 2, 1], [0]]),
    (22016, [[0], [1, 2], [3]], [[3], [2], [1, 0]])))  # ties: the 43-stage's 7.4 KB is the largest
def test_rotation_plan_balances_the_block_reads(n, forward, backward):
    """Fewest launches, then the smallest largest per-CTA block read: 4096 = 8^4 as 8 x 8
    twice (4 KB per CTA) rather than 8^3 then 8 (48 KB per CTA for the first launch); no
    CTA reads more than 32 KB (576 = 8 8 3 3 is not one launch of 50 KB, 22016's 8 8 8
    not one of 48 KB), while 11008's 8 8 4 (20 KB) stays one launch."""
    rotation = StructuredRotation(n)
    assert transform_kernels.rotation_plan(rotation.schedule, rotation.strides, False) == forward
    assert transform_kernels.rotation_plan(rotation.schedule, rotation.strides, True) == backward


@pytest.mark.parametrize("m, n, early", ((12288, 4096, False), (22016, 4096, False), (4096, 4096, True),
                                         (4096, 11008, True), (960, 576, True), (3072, 576, True)))
def test_only_large_harp_outputs_launch_after_the_matvec(m, n, early):
    """With a 1 MiB threshold the output rotation launches late from 1 MiB of blocks (12288:
    1.7 MB, 22016: 5.9 MB, 4096: 0.5 MB); without one every output launches early; QuIP#'s
    Hadamard always launches early."""
    generator = torch.Generator().manual_seed(0)
    harp = make_processor("harp", m, n, generator)
    assert transform_kernels.output_launches_early(harp, 1 << 20) is early
    assert transform_kernels.output_launches_early(harp, None)
    assert transform_kernels.output_launches_early(make_processor("had", m, n, generator), 1 << 20)


def test_processor_kernels_leave_cpu_rows_to_torch():
    processor = make_processor("had", 24, 40, torch.Generator().manual_seed(0))
    assert kernels.transform_extension(torch.randn(2, 40)) is None
    assert transform_kernels.processor_input(None, processor, torch.randn(2, 40)) is None
    assert transform_kernels.processor_output(None, processor, torch.randn(2, 24)) is None


@pytest.fixture(scope="module")
def ext():
    return kernels.extension()


@pytest.fixture(scope="module")
def generator():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    """Whatever the caller's environment says, these tests run with the kernels on."""
    monkeypatch.setenv(kernels.KERNELS_ENV, "1")


@pytest.mark.gpu
@pytest.mark.parametrize("n", SIZES)
def test_hadamard_kernel_matches_torch(ext, generator, n):
    scale_in = torch.randn(n, generator=generator).cuda()
    scale_out = torch.randn(n, generator=generator).cuda()
    for rows in (1, 3, 8, 33):
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(rows, n, generator=generator).to(dtype).cuda()
            for transpose in (False, True):
                ref = hadamard_transform(x.float() * scale_in, transpose=transpose) * scale_out
                out = transform_kernels.hadamard_rows(ext, x, transpose, scale_in, scale_out)
                assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-6, (rows, dtype, transpose)
                plain = transform_kernels.hadamard_rows(ext, x, transpose)
                assert rel_err(plain, hadamard_transform(x.float(), transpose=transpose)) < 1e-6
                half = transform_kernels.hadamard_rows(ext, x, transpose, scale_in, scale_out,
                                                       torch.float16)
                assert half.dtype == torch.float16 and rel_err(half, out.half()) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kron_fallback", (False, True))
@pytest.mark.parametrize("passes", (1, 2))
def test_rotation_kernel_matches_torch(ext, generator, n, kron_fallback, passes):
    rotation = StructuredRotation(n, passes=passes, kron_fallback=kron_fallback,
                                  theta_init_scale=0.3, generator=generator).cuda()
    rotation.cache_blocks()
    scale_in = torch.randn(n, generator=generator).cuda()
    scale_out = torch.randn(n, generator=generator).cuda()
    apply = transform_kernels.rotation_rows
    with torch.no_grad():
        for rows in (1, 2, 8, 40):
            for dtype in (torch.float32, torch.float16):
                x = torch.randn(rows, n, generator=generator).to(dtype).cuda()
                forward = rotation.transform(x.float() * scale_in) * scale_out
                out = apply(ext, rotation, x, False, scale_in, scale_out)
                assert out.dtype == torch.float32 and rel_err(out, forward) < TOL
                inverse = rotation.inverse_transform(x.float() * scale_in) * scale_out
                assert rel_err(apply(ext, rotation, x, True, scale_in, scale_out), inverse) < TOL
                back = apply(ext, rotation, apply(ext, rotation, x, False), True)
                assert rel_err(back, x.float()) < TOL
                half = apply(ext, rotation, x, True, scale_in, scale_out, torch.float16)
                assert half.dtype == torch.float16 and rel_err(half, inverse.half()) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ("had", "harp"))
@pytest.mark.parametrize("m, n", ((1536, 576), (576, 1536), (4096, 11008), (22016, 4096)))
def test_processor_kernels_match_torch(ext, generator, mode, m, n):
    processor = make_processor(mode, m, n, generator, RotationOptions(theta_init_scale=0.3)).cuda()
    processor.freeze()
    with torch.no_grad():
        for rows in (1, 5, 64):
            x = torch.randn(rows, n, generator=generator).half().cuda()
            out = transform_kernels.processor_input(ext, processor, x)
            assert rel_err(out, processor.input_transform(x.float())) < TOL
            y = torch.randn(rows, m, generator=generator).cuda()
            out = transform_kernels.processor_output(ext, processor, y)
            assert out.dtype == torch.float32 and rel_err(out, processor.output_transform(y)) < TOL
            half = transform_kernels.processor_output(ext, processor, y, torch.float16)
            assert half.dtype == torch.float16 and rel_err(half, out.half()) < 1e-3


@pytest.mark.gpu
def test_transform_kernels_reject_bad_arguments_clearly(ext):
    """Misuse raises a RuntimeError whose message carries the numbers and shapes."""
    stream = torch.cuda.current_stream().cuda_stream
    x = torch.randn(2, 64).cuda()
    with pytest.raises(RuntimeError, match=r"rows, n\), got \(128\)"):
        ext.hadamard(torch.randn(128).cuda(), 1, None, 1.0, None, None, False, stream)
    with pytest.raises(RuntimeError, match="scale_in must hold 64 float32 values"):
        ext.hadamard(x, 1, None, 1.0, torch.ones(32).cuda(), None, False, stream)
    with pytest.raises(RuntimeError, match=r"n = 64, k = 3"):
        ext.hadamard(x, 3, torch.ones(3, 3).cuda(), 1.0, None, None, False, stream)
    with pytest.raises(RuntimeError, match=r"base must be float32 \(k, k\) with k = 4, got \(3, 3\)"):
        ext.hadamard(x, 4, torch.ones(3, 3).cuda(), 1.0, None, None, False, stream)
    with pytest.raises(RuntimeError, match=r"p a power of two, got n = 48, k = 2"):
        ext.hadamard(torch.randn(2, 48).cuda(), 2, torch.ones(2, 2).cuda(), 1.0, None, None, False,
                     stream)
    with pytest.raises(RuntimeError, match=r"stage 0 blocks .* b = 8, got \(4, 8, 8\)"):
        ext.rotation_group(x, [torch.randn(4, 8, 8).cuda()], [8], [1], False, None, None, False,
                           stream)
