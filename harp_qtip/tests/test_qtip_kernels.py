"""qtip-kernels (harp_qtip/qtip-kernels, lib/linear/kernels.py): the HYB trellis decode,
the fused decode-matvec and QuantizedLinear's dispatch.

Every check compares against the torch decode (lib/codebook/trellis.unpack + the HYB
code of lib/codebook/computed_codes), the truth of the storage layout.

CPU: the loader and dispatch rules; the claim that random words are valid tail-biting
streams (so random codes are fair test inputs); and a host emulation of the kernels'
own per-thread code (qtip-kernels/qtip_decode.cuh, built with the system C++ compiler
through host_check.cpp: loads, bit order, windows, hash, replicated-table addressing,
FMA chain and reduction order) against the torch decode.
GPU (marked gpu, skipped without CUDA; the extension is installed or JIT-built on first
use): bit-exact decode and matvec within 1e-4 of float64 for K = 2, 3, 4 on the model
shapes, fp32 and fp16 x and tables, the device against the host emulation bit for bit,
real Viterbi codes, linear_product's dispatch, and a CUDA graph replay.
"""
import ctypes
import shutil
import subprocess

import pytest
import torch

from lib.codebook.bitshift import BitshiftTrellis
from lib.codebook.computed_codes import build_hyb_tlut, get_code, hyb
from lib.codebook.trellis import TrellisSpec, is_tailbiting, pack, unpack
from lib.codebook import default_codebook_flags
from lib.linear import kernels
from model.synthetic import random_quantized_linear

KS = (2, 3, 4)
SHAPES = ((576, 576), (1536, 576), (576, 1536), (960, 960), (2560, 960), (4096, 4096),
          (11008, 4096), (4096, 11008))
ROWS = (1, 2, 3, 5, 8)      # 1, 2, 8 plus 3 and 5: the 4- and 8-row kernels with unused rows
MATVEC_TOL = 1e-4           # fp32 accumulation against float64 (~1e-6 expected)
# Host emulation shapes: one tile; odd tile counts; 2 stripes of 129 tile columns (a
# partial second batch of the matvec's 8-row loads); 256 tile columns (two full batches).
HOST_SHAPES = ((16, 16), (48, 80), (576, 576), (32, 2064), (64, 4096))


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    """Whatever the caller's environment says, these tests run with the kernels on."""
    monkeypatch.setenv(kernels.KERNELS_ENV, "1")


def random_packed(m, n, K, generator, device="cpu"):
    """Uniform int16 words: (m/16 * n/16, 16 K), negative values included."""
    shape = (m // 16 * (n // 16), 16 * K)
    return torch.randint(-32768, 32768, shape, generator=generator, dtype=torch.int64).to(
        torch.int16).to(device)


def random_table(generator, device="cpu"):
    """A (512, 2) float32 table with some exact zeros (their sign flips must give -0.0, as
    torch's multiplication by -1 does)."""
    table = torch.randn(512, 2, generator=generator)
    table[::37, 0] = 0.0
    return table.to(device)


def reference_weight(packed, tlut, m, n, K):
    """W' (m, n) float32 by the torch path: unpack every tile's stream, HYB of the states,
    tiles (i, j) at rows 16 i.., columns 16 j.., each tile row-major."""
    states = unpack(packed, TrellisSpec(16, K, 2, 256))
    points = hyb(states, tlut.float())
    return points.reshape(m // 16, n // 16, 16, 16).permute(0, 2, 1, 3).reshape(m, n)


def same_bits(a, b):
    """Equal dtype, shape and bit patterns (so -0.0 != 0.0, NaN == NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = torch.int32 if a.dtype == torch.float32 else torch.int16
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ---------------------------------------------------------------- host emulation (C++)

@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    """host_check.cpp (the kernels' per-thread code) built as a shared library."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler for the host emulation")
    out = tmp_path_factory.mktemp("qtip_host") / "libqtip_host_check.so"
    cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wno-unknown-pragmas",
           "-I", str(kernels.SOURCE_DIR), str(kernels.SOURCE_DIR / "host_check.cpp"), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"host_check.cpp did not compile:\n{done.stderr}"
    lib = ctypes.CDLL(str(out))
    for fn in (lib.qtip_host_decode, lib.qtip_host_matvec):
        fn.restype = ctypes.c_int
    return lib


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def host_decode(lib, packed, tlut, m, n, K):
    packed, tlut = packed.cpu().contiguous(), tlut.float().cpu().contiguous()
    out = torch.full((m, n), float("nan"))
    assert lib.qtip_host_decode(K, _ptr(packed), _ptr(tlut), m, n, _ptr(out)) == 0
    return out


def host_matvec(lib, x, packed, tlut, m, n, K):
    x = x.float().cpu().contiguous()
    packed, tlut = packed.cpu().contiguous(), tlut.float().cpu().contiguous()
    out = torch.full((x.shape[0], m), float("nan"))
    assert lib.qtip_host_matvec(K, _ptr(x), x.shape[0], _ptr(packed), _ptr(tlut), m, n, _ptr(out)) == 0
    return out


# ---------------------------------------------------------------- CPU

@pytest.mark.parametrize("K", KS)
def test_random_words_are_valid_tailbiting_streams(K):
    """Any T K-bit stream is a tail-biting stream (its states are its cyclic windows), so
    uniform random words are fair kernel inputs: unpack gives valid cycles, pack inverts."""
    spec = TrellisSpec(16, K, 2, 256)
    packed = random_packed(16 * 8, 16 * 8, K, torch.Generator().manual_seed(K))
    states = unpack(packed, spec)
    assert bool(is_tailbiting(states, spec).all())
    assert torch.equal(pack(states, spec), packed)


@pytest.mark.parametrize("K", KS)
def test_host_emulation_decode_is_bit_exact(host_lib, K):
    generator = torch.Generator().manual_seed(10 + K)
    for m, n in HOST_SHAPES:
        packed = random_packed(m, n, K, generator)
        tlut = random_table(generator)
        ref = reference_weight(packed, tlut, m, n, K)
        out = host_decode(host_lib, packed, tlut, m, n, K)
        assert same_bits(out, ref), (m, n, K, (out - ref).abs().max().item())


@pytest.mark.parametrize("K", KS)
def test_host_emulation_matvec_matches_float64(host_lib, K):
    generator = torch.Generator().manual_seed(20 + K)
    for m, n in HOST_SHAPES:
        packed = random_packed(m, n, K, generator)
        tlut = random_table(generator)
        weight = reference_weight(packed, tlut, m, n, K).double()
        for k in ROWS:
            x = torch.randn(k, n, generator=generator)
            out = host_matvec(host_lib, x, packed, tlut, m, n, K)
            assert torch.isfinite(out).all(), (m, n, K, k)
            assert rel_err(out, x.double() @ weight.T) < 1e-5, (m, n, K, k)


def test_host_emulation_of_a_hand_made_stream(host_lib):
    """One tile whose stream is all zero bits except a known first state: step 0's state
    s = 0xB7A5 (K = 2: the first 16 bits), the other steps' states follow by shifting."""
    K, s0 = 2, 0xB7A5
    packed = torch.zeros(1, 32, dtype=torch.int16)
    packed[0, 0] = s0 - (1 << 16)   # as int16
    tlut = torch.arange(1024, dtype=torch.float32).reshape(512, 2) + 0.5
    out = host_decode(host_lib, packed, tlut, 16, 16, K)
    h = (s0 + 1) * s0
    index, flip = (h >> 6) & 511, (h >> 15) & 1
    assert out[0, 0].item() == (-1.0 if flip else 1.0) * tlut[index, 0].item()
    assert out[0, 1].item() == tlut[index, 1].item()
    s1 = (s0 << 4) & 0xFFFF  # step 1 shifts in KV = 4 zero bits
    h1 = (s1 + 1) * s1
    assert out[0, 3].item() == tlut[(h1 >> 6) & 511, 1].item()
    assert same_bits(out, reference_weight(packed, tlut, 16, 16, K))


def test_loader_returns_none_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only behaviour")
    assert kernels.load_qtip_kernels() is None
    assert kernels.load_qtip_kernels() is None  # cached, still no exception
    assert "no CUDA device" in kernels.unavailable_reason()
    generator = torch.Generator().manual_seed(0)
    packed, tlut = random_packed(32, 64, 2, generator), random_table(generator)
    assert kernels.trellis_decode(packed, tlut, 32, 64, 2) is None
    assert kernels.trellis_matvec(torch.randn(1, 64), packed, tlut, 32, 64, 2) is None
    codebook = BitshiftTrellis(16, 2, 2, get_code("quantlut_sym", tlut))
    assert kernels.linear_product(codebook, torch.randn(3, 64), packed) is None
    assert kernels.transform_extension(torch.randn(3, 64)) is None


def test_codebook_kernel_args_covers_only_the_fast_config():
    tlut = torch.randn(512, 2)
    for K in KS:
        args = kernels.codebook_kernel_args(BitshiftTrellis(16, K, 2, get_code("quantlut_sym", tlut)))
        assert args is not None and args[0] == K and args[1] is tlut
    not_covered = (
        BitshiftTrellis(16, 1, 2, get_code("quantlut_sym", tlut)),                # K = 1
        BitshiftTrellis(16, 5, 2, get_code("quantlut_sym", tlut)),                # K = 5
        BitshiftTrellis(12, 2, 2, get_code("quantlut_sym", tlut)),                # L = 12
        BitshiftTrellis(16, 2, 2, get_code("quantlut_sym", tlut), T=64),          # T = 64
        BitshiftTrellis(16, 2, 2, get_code("quantlut_sym", torch.randn(256, 2))),  # tlut_bits 8
        BitshiftTrellis(16, 2, 1, get_code("1mad")),
        BitshiftTrellis(16, 2, 1, get_code("3inst")),
        object(),
    )
    for codebook in not_covered:
        assert kernels.codebook_kernel_args(codebook) is None


def test_codebook_kernel_args_reads_the_pipeline_codebook():
    trellis_codebook = pytest.importorskip("lib.codebook.trellis_codebook")
    tlut = torch.randn(512, 2)
    bound = trellis_codebook.TrellisCodebook(L=16, K=3, V=2, tlut=tlut)
    assert kernels.codebook_kernel_args(bound) == (3, tlut)
    assert kernels.codebook_kernel_args(trellis_codebook.TrellisCodebook(K=3)) is None  # unbound
    assert kernels.codebook_kernel_args(
        trellis_codebook.TrellisCodebook(K=2, V=1, decode_mode="1mad", tlut_bits=0)) is None
    assert kernels.codebook_kernel_args(
        trellis_codebook.TrellisCodebook(K=2, td_x=8, td_y=32, tlut=tlut)) is None


def test_weight_shape():
    codes = torch.zeros(36 * 96, 32, dtype=torch.int16)
    assert kernels.weight_shape(codes, 1536, 2) == (576, 1536)
    assert kernels.weight_shape(codes.view(36, 96, 32), 1536, 2) == (576, 1536)
    assert kernels.weight_shape(codes, 1536, 3) is None       # 32 words are K = 2
    assert kernels.weight_shape(codes, 1000, 2) is None       # n not a multiple of 16
    assert kernels.weight_shape(codes, 16 * 97, 2) is None    # tiles don't fill whole stripes
    assert kernels.weight_shape(torch.zeros(0, 32, dtype=torch.int16), 64, 2) is None


# ---------------------------------------------------------------- GPU

@pytest.fixture(scope="module")
def qtip_module():
    module = kernels.load_qtip_kernels()
    assert module is not None, f"qtip_kernels did not load: {kernels.unavailable_reason()}"
    return module


@pytest.fixture(scope="module")
def generator():
    return torch.Generator().manual_seed(1234)


def poison_allocator(numel):
    """Leave a freed NaN block of `numel` float32 in the caching allocator, so an output the
    kernel fails to write shows up as NaN."""
    block = torch.full((numel,), float("nan"), device="cuda")
    del block


@pytest.mark.gpu
@pytest.mark.parametrize("m, n", SHAPES)
@pytest.mark.parametrize("K", KS)
def test_decode_is_bit_exact(qtip_module, generator, K, m, n):
    packed = random_packed(m, n, K, generator, "cuda")
    tlut = random_table(generator, "cuda")
    ref = reference_weight(packed, tlut, m, n, K)
    poison_allocator(m * n)
    out = kernels.trellis_decode(packed, tlut, m, n, K)
    assert out is not None and out.shape == (m, n) and out.dtype == torch.float32
    assert same_bits(out, ref), f"K={K} {m}x{n}: {(out != ref).sum().item()} weights differ"
    half = kernels.trellis_decode(packed, tlut, m, n, K, torch.float16)
    assert same_bits(half, ref.half()), f"fp16 out, K={K} {m}x{n}"
    table16 = tlut.half()   # fp16 tables (the checkpoint's dtype) are read exactly
    assert same_bits(kernels.trellis_decode(packed, table16, m, n, K),
                     reference_weight(packed, table16.float(), m, n, K))


@pytest.mark.gpu
@pytest.mark.parametrize("m, n", SHAPES)
@pytest.mark.parametrize("K", KS)
def test_matvec_matches_float64(qtip_module, generator, K, m, n):
    packed = random_packed(m, n, K, generator, "cuda")
    tlut = random_table(generator, "cuda")
    weight = reference_weight(packed, tlut, m, n, K).double()
    for k in ROWS:
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(k, n, generator=generator).to(dtype).cuda()
            poison_allocator(k * m)
            # where the kernel lets its successor launch must not change the result
            out = kernels.trellis_matvec(x, packed, tlut, m, n, K, early_successor=k % 2 == 1)
            assert out is not None and out.shape == (k, m) and out.dtype == torch.float32
            assert torch.isfinite(out).all(), f"K={K} {m}x{n} k={k} {dtype}: unwritten output"
            err = rel_err(out, x.double() @ weight.T)
            assert err < MATVEC_TOL, f"K={K} {m}x{n} k={k} {dtype}: relative error {err:.3g}"


@pytest.mark.gpu
def test_matvec_with_fp16_table_and_bf16_rows(qtip_module, generator):
    m, n, K = 960, 576, 3
    packed = random_packed(m, n, K, generator, "cuda")
    tlut = random_table(generator, "cuda").half()
    weight = reference_weight(packed, tlut.float(), m, n, K).double()
    x = torch.randn(4, n, generator=generator).to(torch.bfloat16).cuda()
    out = kernels.trellis_matvec(x, packed, tlut, m, n, K)
    assert rel_err(out, x.double() @ weight.T) < MATVEC_TOL


@pytest.mark.gpu
def test_matvec_is_deterministic(qtip_module, generator):
    m, n, K = 4096, 4096, 2
    packed = random_packed(m, n, K, generator, "cuda")
    tlut = random_table(generator, "cuda")
    x = torch.randn(8, n, generator=generator).cuda()
    first = kernels.trellis_matvec(x, packed, tlut, m, n, K)
    for _ in range(3):
        assert torch.equal(kernels.trellis_matvec(x, packed, tlut, m, n, K), first)


@pytest.mark.gpu
@pytest.mark.parametrize("K", KS)
def test_device_equals_host_emulation(qtip_module, host_lib, generator, K):
    """The device runs the same per-thread code and reduction order as the host emulation:
    decode and fp32 matvec must agree bit for bit. (A decode mismatch is an indexing bug;
    a matvec-only mismatch of ~1e-7 would mean the compiler reordered the fp32 sums.)"""
    for m, n in ((576, 1536), (64, 4096), (48, 80)):
        packed = random_packed(m, n, K, generator, "cuda")
        tlut = random_table(generator, "cuda")
        device = kernels.trellis_decode(packed, tlut, m, n, K)
        assert same_bits(device.cpu(), host_decode(host_lib, packed, tlut, m, n, K)), (m, n)
        for k in (1, 3, 8):
            x = torch.randn(k, n, generator=generator).cuda()
            out = kernels.trellis_matvec(x, packed, tlut, m, n, K).cpu()
            host = host_matvec(host_lib, x, packed, tlut, m, n, K)
            assert torch.equal(out, host), (
                f"K={K} {m}x{n} k={k}: device != host emulation, max relative difference "
                f"{((out - host).abs().max() / host.abs().max()).item():.3g}")


@pytest.mark.gpu
@pytest.mark.parametrize("K", KS)
def test_decode_of_viterbi_codes(qtip_module, K):
    """Codes from the real quantizer (two-pass tail-biting Viterbi on the GPU) decode to
    the quantizer's own X_hat."""
    generator = torch.Generator().manual_seed(7)
    tlut = build_hyb_tlut(9, seed=1, n_samples=1 << 16)
    quantizer = BitshiftTrellis(16, K, 2, get_code("quantlut_sym", tlut))
    m, n = 64, 128
    W = torch.randn(m, n, generator=generator).cuda()
    tiles = W.reshape(m // 16, 16, n // 16, 16).permute(0, 2, 1, 3).reshape(-1, 256)
    X_hat, packed = quantizer.quantize(tiles)
    W_hat = X_hat.reshape(m // 16, n // 16, 16, 16).permute(0, 2, 1, 3).reshape(m, n)
    out = kernels.trellis_decode(packed, tlut.cuda(), m, n, K)
    assert same_bits(out, W_hat.float())
    x = torch.randn(2, n, generator=generator).cuda()
    y = kernels.trellis_matvec(x, packed, tlut.cuda(), m, n, K)
    assert rel_err(y, x.double() @ W_hat.double().T) < MATVEC_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("K", KS)
def test_linear_product_dispatch(qtip_module, generator, monkeypatch, K):
    m, n = 1536, 576
    tlut = random_table(generator)          # a CPU table: copied to the GPU once
    codebook = BitshiftTrellis(16, K, 2, get_code("quantlut_sym", tlut))
    packed = random_packed(m, n, K, generator, "cuda")
    weight = reference_weight(packed.cpu(), tlut, m, n, K).cuda()
    for k in (1, 5, 8, 9, 40):
        rows = torch.randn(k, n, generator=generator).cuda()
        out = kernels.linear_product(codebook, rows, packed)
        assert out is not None and out.shape == (k, m) and out.dtype == torch.float32
        assert rel_err(out, rows.double() @ weight.double().T) < MATVEC_TOL, k
        if k > kernels.MAX_MATVEC_ROWS:   # kernel decode + the torch product
            assert rel_err(out, rows @ weight.T) < 1e-6, k
    rows = torch.randn(3, n, generator=generator).cuda()
    assert kernels.linear_product(codebook, rows.cpu(), packed.cpu()) is None
    # 3456 tiles don't make whole stripes of 80 / 16 = 5 tiles: the codes can't be this n's
    assert kernels.linear_product(codebook, rows[:, :80].contiguous(), packed) is None
    assert kernels.linear_product(BitshiftTrellis(16, 1, 2, get_code("quantlut_sym", tlut)),
                                  rows, random_packed(m, n, 1, generator, "cuda")) is None
    assert kernels.linear_product(BitshiftTrellis(16, K, 1, get_code("1mad")), rows, packed) is None
    monkeypatch.setenv(kernels.KERNELS_ENV, "0")
    assert kernels.linear_product(codebook, rows, packed) is None
    assert kernels.trellis_decode(packed, tlut.cuda(), m, n, K) is None


@pytest.mark.gpu
def test_cpu_tables_are_never_confused(qtip_module, generator):
    """A cached GPU copy belongs to its CPU table: a new table at a freed table's address
    (the allocator reuses it) gets its own copy, as does a table changed in place."""
    device = torch.device("cuda")
    for _ in range(8):
        table = random_table(generator)
        assert torch.equal(kernels._table_arg(table, device).cpu(), table)
        del table
    table = random_table(generator)
    kernels._table_arg(table, device)
    table.mul_(2)
    assert torch.equal(kernels._table_arg(table, device).cpu(), table)


@pytest.mark.gpu
def test_linear_product_with_the_pipeline_codebook(qtip_module, generator):
    trellis_codebook = pytest.importorskip("lib.codebook.trellis_codebook")
    m, n, K = 576, 960, 2
    tlut = random_table(generator, "cuda")
    codebook = trellis_codebook.TrellisCodebook(L=16, K=K, V=2, tlut=tlut)
    packed = random_packed(m, n, K, generator, "cuda")
    weight = codebook.decode_matrix(packed, m, n)   # the pipeline's torch path
    assert same_bits(kernels.trellis_decode(packed, tlut, m, n, K), weight.float())
    for k in (1, 8, 16):
        rows = torch.randn(k, n, generator=generator).cuda()
        out = kernels.linear_product(codebook, rows, packed)
        assert rel_err(out, rows.double() @ weight.double().T) < MATVEC_TOL, k


@pytest.mark.gpu
def test_linear_product_replays_in_a_cuda_graph(qtip_module, generator):
    m, n, K = 2560, 960, 4
    tlut = random_table(generator, "cuda")
    codebook = BitshiftTrellis(16, K, 2, get_code("quantlut_sym", tlut))
    packed = random_packed(m, n, K, generator, "cuda")
    static_rows = torch.randn(1, n, generator=generator).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.linear_product(codebook, static_rows, packed)   # warm-up: loads, attributes
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = kernels.linear_product(codebook, static_rows, packed)
    for _ in range(3):
        static_rows.copy_(torch.randn(1, n, generator=generator))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, kernels.linear_product(codebook, static_rows, packed))


@pytest.mark.gpu
@pytest.mark.parametrize("incoh_mode", ("had", "harp"))
def test_quantized_linear_replays_in_a_cuda_graph(qtip_module, generator, incoh_mode):
    """Input transform, matvec, output transform (programmatic dependent launches)
    captured in a graph and replayed: the torch path's result."""
    linear = random_quantized_linear(1536, 576, incoh_mode, default_codebook_flags(), generator,
                                     0.02, "cuda")
    static_x = torch.randn(1, 576, generator=generator).cuda()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            linear(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = linear(static_x)
        for _ in range(3):
            static_x.copy_(torch.randn(1, 576, generator=generator))
            graph.replay()
            torch.cuda.synchronize()
            linear.use_kernels = False
            ref = linear(static_x)
            linear.use_kernels = True
            assert rel_err(static_out, ref) < MATVEC_TOL


@pytest.mark.gpu
def test_bad_arguments_raise_clearly(qtip_module, generator):
    m, n, K = 64, 128, 2
    packed = random_packed(m, n, K, generator, "cuda")
    tlut = random_table(generator, "cuda")
    with pytest.raises(ValueError, match="1 <= k <= 8"):
        kernels.trellis_matvec(torch.randn(9, n).cuda(), packed, tlut, m, n, K)
    with pytest.raises(ValueError, match=r"\(k, 128\)"):
        kernels.trellis_matvec(torch.randn(1, n + 16).cuda(), packed, tlut, m, n, K)
    with pytest.raises(ValueError, match="do not hold"):
        kernels.trellis_decode(packed, tlut, m, n, 3)
    with pytest.raises(ValueError, match="float32 or float16"):
        kernels.trellis_decode(packed, tlut, m, n, K, torch.bfloat16)
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(RuntimeError, match="int16"):
        qtip_module.decode(packed.int(), tlut, m, n, K, False, stream)
    with pytest.raises(RuntimeError, match="512, 2"):
        qtip_module.decode(packed, tlut[:256].contiguous(), m, n, K, False, stream)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        qtip_module.decode(packed, tlut, m + 8, n, K, False, stream)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        qtip_module.matvec(torch.randn(1, n), packed, tlut, m, n, K, True, stream)
