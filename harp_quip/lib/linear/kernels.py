"""The quiptools CUDA kernels (harp_quip/quiptools): loader, wrappers and dispatch rules.

`load_quiptools()` returns the compiled extension or None, once per process: first an
installed `quiptools` module (`pip install --no-build-isolation ./quiptools`), else,
when CUDA is available and HARP_QUIPTOOLS_JIT is not "0", a JIT build of the sources
with torch.utils.cpp_extension.load for the current GPU's architecture. It never
raises; when the kernels are off it logs the reason once.

Wrappers (CUDA tensors; they raise if the kernels are unavailable):
  decode_e8p12(codes, dtype)     E8P12 codes (..., g) -> (..., 8 g) fp16 (or fp32), exact
  e8p12_matvec(x, codes)         x (k, n) fp32/fp16, k <= 8, codes (m, n/8) -> fp32 (k, m)
  rvq_decode(codebook, codes)    E8P12RVQ3B/4B int32 codes -> fp32, bit-exact with
                                 codebook.decode
  rvq_matvec(codebook, x, codes) fused decode + product for the residual codebooks
  linear_product(codebook, rows, codes)
                                 what QuantizedLinear.forward uses: rows @ W'^T through the
                                 kernels, or None where the torch path must run.
  transform_extension(rows)      the extension, if the transform kernels shared with the
                                 other backend (lib/linear/transform_kernels.py: the `had`
                                 and `harp` processors) may run on `rows`, else None

Numerical contract. Decoding is bit-exact (E8P12 points are multiples of 1/4, exact in
fp16; the residual points are formed in fp32 with the same roundings as the torch
tables). The matvec multiplies exact weights by the fp32 (or fp16) inputs and sums in
fp32 in a different order than torch's matmul, and folds the +-1/4 shift and the
E8P12RVQ4B stage-2 scale 1/s into per-row sums; its relative difference to the torch
path is fp32 rounding (~1e-6 in a host emulation of the kernel's arithmetic; the GPU
tests assert < 1e-4 against a float64 reference). For E8P12 with 1-2 rows (decode) the
product runs on the tensor cores: exact bf16 weights times x split into three bf16 terms
(24 significant bits, fp32's) with fp32 accumulation, again fp32 rounding (the tests
assert < 1e-5 there). Above 8 rows the kernels only decode
W' (exactly) and torch does the fp32 product, so the result equals the torch path's.

Environment: HARP_KERNELS=0 turns every kernel off (the torch path everywhere);
HARP_QUIPTOOLS_JIT=0 forbids the JIT build.
"""
import os
import sys
from pathlib import Path

import glog
import torch

from lib.codebook.e8p12 import E8P12, packed_abs_table
from lib.codebook.e8p12_rvq import E8P12RVQ3B, E8P12RVQ4B

MAX_MATVEC_ROWS = 8
# transform_kernels.output_launches_early: every output transform launches at the matvec's
# start. Decode step, Llama-2-7B shape, H200, ms per step, harp: 6.30 with every output
# early, 6.36 with outputs of >= 1 MiB of HARP blocks (qkv, up) launched late, 6.36 all late.
EARLY_OUTPUT_MAX_BLOCK_BYTES = None
MODE_E8P12, MODE_RVQ4B, MODE_RVQ3B = 0, 1, 2
KERNELS_ENV = "HARP_KERNELS"
JIT_ENV = "HARP_QUIPTOOLS_JIT"
SOURCE_DIR = Path(__file__).resolve().parents[2] / "quiptools"
SOURCES = ("quiptools.cu", "transforms.cu", "quiptools_binding.cpp")
_OFF_VALUES = ("0", "false", "off", "no")

_state = {}          # "module": the extension or None, "reason": why it is None, "source"
_abs_tables = {}     # torch.device -> int32 (256,) packed abs table on that device


def _env_off(name):
    return os.environ.get(name, "").strip().lower() in _OFF_VALUES


def kernels_enabled():
    """False when HARP_KERNELS=0 (read on every call, so tests can toggle it)."""
    return not _env_off(KERNELS_ENV)


def _is_extension(module):
    # harp_quip/quiptools (the source folder) imports as an empty namespace package
    # when the extension is not installed; it has none of the functions.
    return all(hasattr(module, name) for name in ("decode", "matvec", "hadamard", "rotation_group"))


def _import_installed():
    try:
        import quiptools
    except ImportError as err:
        return None, f"no installed quiptools module ({err})"
    if not _is_extension(quiptools):
        sys.modules.pop("quiptools", None)  # the source folder, not the extension
        return None, "no installed quiptools module"
    return quiptools, None


def _jit_build():
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    gencode = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
    module = load(name="quiptools", sources=[str(SOURCE_DIR / name) for name in SOURCES],
                  extra_cflags=["-O3"], extra_cuda_cflags=["-O3", gencode, "-lineinfo"],
                  verbose=False)
    if not _is_extension(module):
        raise RuntimeError("the JIT-built module lacks some of its functions")
    return module


def _load():
    """(module or None, reason it is None, where it came from)."""
    if not torch.cuda.is_available():
        return None, "no CUDA device", None
    module, reason = _import_installed()
    if module is not None:
        return module, None, "installed"
    if _env_off(JIT_ENV):
        return None, f"{reason} and {JIT_ENV}=0 forbids the JIT build", None
    try:
        return _jit_build(), None, "JIT build"
    except Exception as err:  # a compiler or toolchain failure must not stop inference
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return None, f"{reason}; the JIT build failed: {first_line}", None


def load_quiptools():
    """The quiptools extension module, or None (cached; never raises; logs once)."""
    if "module" not in _state:
        try:
            module, reason, source = _load()
        except Exception as err:  # belt and braces: the loader must never raise
            module, reason, source = None, f"loader error: {err}", None
        _state.update(module=module, reason=reason, source=source)
        if module is None:
            glog.info(f"quiptools kernels off ({reason}); QuantizedLinear uses the torch path")
        else:
            glog.info(f"quiptools kernels on ({source})")
    return _state["module"]


def unavailable_reason():
    """Why `load_quiptools()` returned None (None if it loaded or was not called)."""
    return _state.get("reason")


def extension():
    """The loaded extension; RuntimeError naming the reason when it did not load."""
    module = load_quiptools()
    if module is None:
        raise RuntimeError(f"quiptools kernels unavailable: {unavailable_reason()}")
    return module


def abs_table_on(device):
    """packed_abs_table() (int32, 256) on `device`, copied there once."""
    device = torch.device(device)
    if device not in _abs_tables:
        _abs_tables[device] = packed_abs_table().to(device)
    return _abs_tables[device]


def codebook_mode(codebook):
    """The kernel mode of a codebook instance, None if the kernels don't cover it."""
    if isinstance(codebook, E8P12):
        return MODE_E8P12
    if isinstance(codebook, E8P12RVQ4B) and isinstance(codebook.stage1, E8P12):
        return MODE_RVQ4B
    if isinstance(codebook, E8P12RVQ3B) and isinstance(codebook.stage1, E8P12):
        return MODE_RVQ3B
    return None


def _storage(codes, dtype):
    """codes as contiguous `dtype` (int16 / int32), reinterpreting values >= 2^(bits-1)."""
    if codes.dtype != dtype:
        bits = torch.iinfo(dtype).bits
        wide = codes.to(torch.int64) & ((1 << bits) - 1)
        codes = (wide - (wide >= (1 << (bits - 1))).to(torch.int64) * (1 << bits)).to(dtype)
    return codes.contiguous()


def _mode_args(mode, codebook, device):
    """(table2 or None, resid_scale) for the kernel launch."""
    if mode == MODE_RVQ3B:
        return codebook.scaled_stage2_on(device), codebook.resid_scale
    if mode == MODE_RVQ4B:
        return None, codebook.resid_scale
    return None, 0.0


def _decode(mode, codebook, codes, out_half):
    dtype = torch.int16 if mode == MODE_E8P12 else torch.int32
    flat = _storage(codes, dtype).reshape(-1, codes.shape[-1])
    device = flat.device
    table2, resid_scale = _mode_args(mode, codebook, device)
    with torch.cuda.device(device):
        out = extension().decode(flat, abs_table_on(device), mode, table2, resid_scale, out_half,
                               torch.cuda.current_stream(device).cuda_stream)
    return out.reshape(*codes.shape[:-1], codes.shape[-1] * E8P12.codesz)


def _matvec(mode, codebook, x, codes, early_successor=True):
    if x.dtype not in (torch.float32, torch.float16):
        x = x.float()
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    dtype = torch.int16 if mode == MODE_E8P12 else torch.int32
    codes = _storage(codes, dtype)
    device = codes.device
    table2, resid_scale = _mode_args(mode, codebook, device)
    with torch.cuda.device(device):
        return extension().matvec(x, codes, abs_table_on(device), mode, table2, resid_scale,
                                  early_successor, torch.cuda.current_stream(device).cuda_stream)


def decode_e8p12(codes, dtype=torch.float16):
    """E8P12 codes (..., g) (int16 storage or any integer dtype) -> points (..., 8 g) in
    fp16 or fp32, equal to E8P12().decode(codes) (exactly)."""
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"decode_e8p12 writes float16 or float32, not {dtype}")
    return _decode(MODE_E8P12, None, codes, dtype == torch.float16)


def e8p12_matvec(x, codes, early_successor=True):
    """x (k, n) fp32/fp16 with 1 <= k <= 8 times the decoded E8P12 codes (m, n/8),
    transposed: fp32 (k, m). `early_successor`: see linear_product."""
    return _matvec(MODE_E8P12, None, x, codes, early_successor)


def _rvq_mode(codebook):
    mode = codebook_mode(codebook)
    if mode not in (MODE_RVQ4B, MODE_RVQ3B):
        raise ValueError(f"{getattr(codebook, 'name', codebook)} is not E8P12RVQ3B/E8P12RVQ4B")
    return mode


def rvq_decode(codebook, codes):
    """E8P12RVQ3B/4B codes (..., g) -> fp32 points (..., 8 g), equal to codebook.decode."""
    return _decode(_rvq_mode(codebook), codebook, codes, False)


def rvq_matvec(codebook, x, codes):
    """x (k, n), 1 <= k <= 8, times the decoded residual codes (m, n/8): fp32 (k, m)."""
    return _matvec(_rvq_mode(codebook), codebook, x, codes)


def linear_product(codebook, rows, codes, early_successor=True):
    """rows (k, n) @ decode(codes)^T as fp32 (k, m) through the kernels, or None when they
    don't apply (HARP_KERNELS=0, no kernels, a codebook they don't cover, CPU or
    mismatched devices, no rows). k <= MAX_MATVEC_ROWS: the fused decode-matvec; more
    rows: the kernel decodes W' (fp32, exact) and torch multiplies. `early_successor`:
    whether the tensor-core matvec lets the next kernel launch at its start or only after
    its main loop (transform_kernels.output_launches_early); the result is the same."""
    mode = codebook_mode(codebook)
    if (mode is None or not rows.is_cuda or rows.device != codes.device or rows.shape[0] == 0
            or not kernels_enabled() or load_quiptools() is None):
        return None
    if rows.shape[0] <= MAX_MATVEC_ROWS:
        return _matvec(mode, codebook, rows, codes, early_successor)
    return rows @ _decode(mode, codebook, codes, False).T


def transform_extension(rows):
    """The extension whose transform kernels may run on `rows` (lib/linear/transform_kernels),
    or None: not CUDA, HARP_KERNELS=0 or the kernels unavailable."""
    if not rows.is_cuda or not kernels_enabled():
        return None
    return load_quiptools()
