"""QTIP's CUDA kernels (harp_qtip/qtip-kernels): loader, wrappers and dispatch rules.

`load_qtip_kernels()` returns the compiled extension or None, once per process: first an
installed `qtip_kernels` module (`pip install --no-build-isolation ./qtip-kernels`), else,
when CUDA is available and HARP_QTIP_JIT is not "0", a JIT build of the sources with
torch.utils.cpp_extension.load for the current GPU's architecture. It never raises; when
the kernels are off it logs the reason once.

The kernels cover the fast config: L = 16, V = 2, code quantlut_sym (HYB) with a
(512, 2) table (tlut_bits 9), K = 2, 3, 4, 16 x 16 row-major tiles (T = 256), m and n
multiples of 16. Codes: the pipeline's packed int16 tensor (m/16 * n/16, 16 K), tile
(i, j) at row i * (n/16) + j (lib/codebook/trellis.py packs each tile's stream).

Wrappers (CUDA tensors; None where the kernels don't apply, so the torch path runs):
  trellis_decode(packed, tlut, m, n, K, dtype=float32)
                                 W' (m, n) fp32 or fp16, bit-exact with the torch decode
                                 (fp16: the fp32 values rounded to nearest, = .half())
  trellis_matvec(x, packed, tlut, m, n, K)
                                 x (k, n) fp32/fp16 (bf16 converted), 1 <= k <= 8, times
                                 W'^T: fp32 (k, m), fp32 accumulation
  linear_product(codebook, rows, codes)
                                 what QuantizedLinear.forward uses: rows @ W'^T through the
                                 kernels, or None where the torch path must run
  transform_extension(rows)      the extension, if the transform kernels shared with the
                                 other backend (lib/linear/transform_kernels.py: the `had`
                                 and `harp` processors) may run on `rows`, else None

Numerical contract. Decoding is exact (HYB values are table entries, the sign flip an XOR
of the sign bit). The matvec multiplies the exact fp32 weights by the fp32 (or fp16) rows
and sums in fp32 in a fixed order (deterministic), not torch's order: relative
difference ~1e-7 to 1e-6 against float64 (the GPU tests assert < 1e-4). Above 8 rows the
kernels only decode W' (fp32, exact) and torch multiplies, so the result equals the torch
path's. The kernels apply no scale: the caller multiplies by Wscale and SU / SV.

Environment: HARP_KERNELS=0 turns every kernel off (the torch path everywhere);
HARP_QTIP_JIT=0 forbids the JIT build.
"""
import functools
import os
import sys
from pathlib import Path

import glog
import torch

KERNEL_L, KERNEL_V, KERNEL_T, KERNEL_TILE = 16, 2, 256, 16
KERNEL_KS = (2, 3, 4)
KERNEL_CODE = "quantlut_sym"
KERNEL_TLUT_SHAPE = (512, 2)   # tlut_bits 9
MAX_MATVEC_ROWS = 8
# transform_kernels.output_launches_early: HARP outputs with >= 1 MiB of blocks (Llama-2-7B's
# qkv and up: 1.7 and 5.9 MB) launch after the matvec's main loop, the rest at its start.
# Decode step, Llama-2-7B shape, H200, ms per step, harp: 6.79 with this threshold, 6.95 every
# output early, 6.79 every output late; SmolLM2 (every output < 0.4 MB): 3.75 early, 3.91 late.
EARLY_OUTPUT_MAX_BLOCK_BYTES = 1 << 20
KERNELS_ENV = "HARP_KERNELS"
JIT_ENV = "HARP_QTIP_JIT"
MODULE_NAME = "qtip_kernels"
SOURCE_DIR = Path(__file__).resolve().parents[2] / "qtip-kernels"
SOURCES = ("qtip_kernels.cu", "transforms.cu", "qtip_kernels_binding.cpp")
_OFF_VALUES = ("0", "false", "off", "no")
_TABLE_CACHE_SIZE = 16

_state = {}          # "module": the extension or None, "reason": why it is None, "source"
_tables = {}         # (data_ptr, version, shape, dtype, device) -> (source table, its copy)


def _env_off(name):
    return os.environ.get(name, "").strip().lower() in _OFF_VALUES


def kernels_enabled():
    """False when HARP_KERNELS=0 (read on every call, so tests can toggle it)."""
    return not _env_off(KERNELS_ENV)


# ---------------------------------------------------------------- loading

def _is_extension(module):
    return all(hasattr(module, name) for name in ("decode", "matvec", "hadamard", "rotation_group"))


def _import_installed():
    try:
        import qtip_kernels
    except ImportError as err:
        return None, f"no installed {MODULE_NAME} module ({err})"
    if not _is_extension(qtip_kernels):
        sys.modules.pop(MODULE_NAME, None)
        return None, f"the installed {MODULE_NAME} module lacks some of its functions"
    return qtip_kernels, None


def _jit_build():
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    gencode = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
    module = load(name=MODULE_NAME, sources=[str(SOURCE_DIR / name) for name in SOURCES],
                  extra_include_paths=[str(SOURCE_DIR)], extra_cflags=["-O3"],
                  extra_cuda_cflags=["-O3", gencode, "-lineinfo"], verbose=False)
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
        text = str(err).strip()
        first_line = text.splitlines()[0] if text else type(err).__name__
        return None, f"{reason}; the JIT build failed: {first_line}", None


def load_qtip_kernels():
    """The qtip_kernels extension module, or None (cached; never raises; logs once)."""
    if "module" not in _state:
        try:
            module, reason, source = _load()
        except Exception as err:  # belt and braces: the loader must never raise
            module, reason, source = None, f"loader error: {err}", None
        _state.update(module=module, reason=reason, source=source)
        if module is None:
            glog.info(f"qtip-kernels off ({reason}); QuantizedLinear uses the torch path")
        else:
            glog.info(f"qtip-kernels on ({source})")
    return _state["module"]


def unavailable_reason():
    """Why `load_qtip_kernels()` returned None (None if it loaded or was not called)."""
    return _state.get("reason")


# ---------------------------------------------------------------- what the kernels cover

def supported(L, K, V, T, decode_mode, tlut, td_x=KERNEL_TILE, td_y=KERNEL_TILE):
    """Whether the kernels cover this trellis config and table."""
    return (L == KERNEL_L and V == KERNEL_V and T == KERNEL_T and K in KERNEL_KS
            and td_x == KERNEL_TILE and td_y == KERNEL_TILE and decode_mode == KERNEL_CODE
            and torch.is_tensor(tlut) and tuple(tlut.shape) == KERNEL_TLUT_SHAPE
            and tlut.is_floating_point())


def _code_table(code):
    """The HYB table of a computed_codes.Code (its `tlut`, or the `tlut` bound into its fn)."""
    tlut = getattr(code, "tlut", None)
    if tlut is None and isinstance(getattr(code, "fn", None), functools.partial):
        tlut = code.fn.keywords.get("tlut")
    return tlut


def codebook_kernel_args(codebook):
    """(K, tlut) when the kernels cover `codebook`, else None.

    The only place that reads the codebook object. It accepts
      * the pipeline's bound TrellisCodebook (lib/codebook/trellis_codebook.py): `spec`
        (TrellisSpec: L, K, V, T), `td_x`, `td_y`, `decode_mode` and `tlut` (the linear's
        stored (2^tlut_bits, 2) table; None when unbound, then the torch path runs);
      * a BitshiftTrellis (lib/codebook/bitshift.py): `spec` and `code` (a Code with
        `name`, its table bound in `code.fn`).
    """
    spec = getattr(codebook, "spec", None)
    if spec is None or not all(hasattr(spec, name) for name in ("L", "K", "V", "T")):
        return None
    decode_mode = getattr(codebook, "decode_mode", None)
    tlut = getattr(codebook, "tlut", None)
    if decode_mode is None:
        code = getattr(codebook, "code", None)
        decode_mode = getattr(code, "name", None)
        tlut = _code_table(code)
    td_x = getattr(codebook, "td_x", KERNEL_TILE)
    td_y = getattr(codebook, "td_y", KERNEL_TILE)
    if not supported(spec.L, spec.K, spec.V, spec.T, decode_mode, tlut, td_x, td_y):
        return None
    return spec.K, tlut


def weight_shape(codes, n, K):
    """(m, n) of W' for packed codes with n input columns, or None if they don't fit the
    layout (m/16 * n/16 tiles of 16 K words)."""
    words = KERNEL_TILE * K
    if n <= 0 or n % KERNEL_TILE or codes.dim() < 1 or codes.shape[-1] != words:
        return None
    tiles = codes.numel() // words
    tiles_n = n // KERNEL_TILE
    if tiles == 0 or tiles % tiles_n:
        return None
    return tiles // tiles_n * KERNEL_TILE, n


# ---------------------------------------------------------------- wrappers

def extension():
    """The loaded extension; RuntimeError naming the reason when it did not load."""
    module = load_qtip_kernels()
    if module is None:
        raise RuntimeError(f"qtip-kernels unavailable: {unavailable_reason()}")
    return module


def _stream(device):
    return torch.cuda.current_stream(device).cuda_stream


def _packed_arg(packed, m, n, K):
    """packed as a contiguous (m/16 * n/16, 16 K) int16 tensor, 8-byte aligned (other integer
    dtypes are read as their low 16 bits, as trellis.unpack does)."""
    if packed.dtype != torch.int16:
        if packed.is_floating_point() or packed.is_complex():
            raise ValueError(f"packed trellis codes must be int16, got {packed.dtype}")
        low = packed.to(torch.int64) & 0xFFFF
        packed = (low - (low >> 15) * 0x10000).to(torch.int16)
    packed = packed.reshape(m // KERNEL_TILE * (n // KERNEL_TILE), KERNEL_TILE * K).contiguous()
    return packed if packed.data_ptr() % 8 == 0 else packed.clone()


def _table_arg(tlut, device):
    """The table on `device`, float32 or float16, contiguous; copies are cached so that a
    CPU table costs one transfer per device, not one per call. The cache holds the source
    table too: alive, its address can't be reused by another table (the key's data_ptr), and
    an in-place change bumps its _version."""
    if tlut.device == device and tlut.dtype in (torch.float32, torch.float16) and tlut.is_contiguous():
        return tlut
    key = (tlut.data_ptr(), tlut._version, tuple(tlut.shape), tlut.dtype, str(tlut.device), str(device))
    entry = _tables.get(key)
    if entry is None:
        dtype = tlut.dtype if tlut.dtype in (torch.float32, torch.float16) else torch.float32
        entry = (tlut, tlut.detach().to(device=device, dtype=dtype).contiguous())
        if len(_tables) >= _TABLE_CACHE_SIZE:
            _tables.pop(next(iter(_tables)))
        _tables[key] = entry
    return entry[1]


def _applies(packed, tlut, m, n, K):
    """Whether the kernels can run these arguments (else the caller uses torch)."""
    return (packed.is_cuda and K in KERNEL_KS and m > 0 and n > 0 and m % KERNEL_TILE == 0
            and n % KERNEL_TILE == 0 and torch.is_tensor(tlut)
            and tuple(tlut.shape) == KERNEL_TLUT_SHAPE and tlut.is_floating_point()
            and kernels_enabled() and load_qtip_kernels() is not None)


def trellis_decode(packed, tlut, m, n, K, dtype=torch.float32):
    """W' (m, n) in `dtype` (float32, or float16 = the float32 values rounded) decoded from
    packed (m/16 * n/16, 16 K) int16 codes with the (512, 2) HYB table, through the
    kernel; None where it doesn't apply (not CUDA, K not in 2..4, another table size,
    m or n not multiples of 16, kernels off or unavailable). Raises on inconsistent
    arguments (codes not matching m, n, K)."""
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"trellis_decode writes float32 or float16, not {dtype}")
    if not _applies(packed, tlut, m, n, K):
        return None
    if packed.numel() != (m // KERNEL_TILE) * (n // KERNEL_TILE) * KERNEL_TILE * K:
        raise ValueError(f"packed codes of shape {tuple(packed.shape)} do not hold the "
                         f"{m // KERNEL_TILE * (n // KERNEL_TILE)} tiles of {KERNEL_TILE * K} "
                         f"words of a {m} x {n} K={K} matrix")
    device = packed.device
    codes = _packed_arg(packed, m, n, K)
    with torch.cuda.device(device):
        return extension().decode(codes, _table_arg(tlut, device), m, n, K, dtype == torch.float16,
                                _stream(device))


def trellis_matvec(x, packed, tlut, m, n, K, early_successor=True):
    """x (k, n) @ W'^T as float32 (k, m) for 1 <= k <= 8 rows, W' decoded from packed
    (m/16 * n/16, 16 K) int16 codes inside the kernel; x float32 or float16 (other float
    dtypes are converted to float32). None where the kernel doesn't apply (as
    trellis_decode); raises on inconsistent arguments. `early_successor`: see
    linear_product."""
    if not _applies(packed, tlut, m, n, K):
        return None
    if x.dim() != 2 or x.shape[1] != n or not 1 <= x.shape[0] <= MAX_MATVEC_ROWS:
        raise ValueError(f"x must be (k, {n}) with 1 <= k <= {MAX_MATVEC_ROWS}, got {tuple(x.shape)}")
    if x.device != packed.device:
        raise ValueError(f"x is on {x.device}, the codes on {packed.device}")
    if packed.numel() != (m // KERNEL_TILE) * (n // KERNEL_TILE) * KERNEL_TILE * K:
        raise ValueError(f"packed codes of shape {tuple(packed.shape)} do not hold the "
                         f"{m // KERNEL_TILE * (n // KERNEL_TILE)} tiles of {KERNEL_TILE * K} "
                         f"words of a {m} x {n} K={K} matrix")
    if x.dtype not in (torch.float32, torch.float16):
        x = x.float()
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    device = packed.device
    codes = _packed_arg(packed, m, n, K)
    with torch.cuda.device(device):
        return extension().matvec(x, codes, _table_arg(tlut, device), m, n, K, early_successor,
                                  _stream(device))


def linear_product(codebook, rows, codes, early_successor=True):
    """rows (k, n) @ W'^T as float32 (k, m) through the kernels, or None where the torch
    path must run: HARP_KERNELS=0, kernels unavailable, a codebook or table they don't
    cover (codebook_kernel_args), CPU or mismatched devices, codes that don't fit n, no
    rows. k <= 8: the fused decode-matvec; more rows: the kernel decodes W' (fp32, exact)
    and torch multiplies. `early_successor`: whether the matvec lets the next kernel
    launch at its start or only after its main loop (transform_kernels.
    output_launches_early); the result is the same."""
    if (not torch.is_tensor(rows) or not rows.is_cuda or rows.dim() != 2 or rows.shape[0] == 0
            or not torch.is_tensor(codes) or codes.device != rows.device or not kernels_enabled()):
        return None
    args = codebook_kernel_args(codebook)
    if args is None:
        return None
    K, tlut = args
    shape = weight_shape(codes, rows.shape[1], K)
    if shape is None:
        return None
    m, n = shape
    if rows.shape[0] <= MAX_MATVEC_ROWS:
        return trellis_matvec(rows, codes, tlut, m, n, K, early_successor)
    weight = trellis_decode(codes, tlut, m, n, K, torch.float32)
    return None if weight is None else rows.float() @ weight.T


def transform_extension(rows):
    """The extension whose transform kernels may run on `rows` (lib/linear/transform_kernels),
    or None: not CUDA, HARP_KERNELS=0 or the kernels unavailable."""
    if not rows.is_cuda or not kernels_enabled():
        return None
    return load_qtip_kernels()
