"""The incoherence transforms of QuantizedLinear on the GPU: `had` (QuIP#'s RHT) and
`harp` (HARP's StructuredRotation), with the signs SU / scales SV folded in.

Shared by both backends (mirrored byte for byte into harp_qtip): the kernels are
transforms.cu + transforms_binding.h, compiled into each backend's extension
(quiptools, qtip_kernels). Every function takes that extension module `ext` (from the
backend's lib/linear/kernels.py, which decides whether the kernels may run).

  hadamard_rows(ext, x, transpose, scale_in, scale_out, out_dtype)
      QuIP#'s normalized Hadamard (H_K (x) H_p) / sqrt(n): one hadamard launch (the FWHT
      of the 2^k segments and the K x K base product).
  rotation_rows(ext, rotation, x, transpose, scale_in, scale_out, out_dtype)
      a StructuredRotation: its stages in groups of consecutive mixed-radix digits
      (rotation_plan; rotation_groups for a rotation), one rotation_group launch per group.
  processor_input(ext, processor, rows), processor_output(ext, processor, rows, out_dtype)
      (SU * x) R_n and SV * (y R_m^T) of a `had` or `harp` processor, or None where the
      kernels don't apply (then the torch path runs).
  output_launches_early(processor, max_block_bytes)
      whether the decode-matvec before processor_output should let it launch at its start
      (the threshold is the backend's: its kernels.EARLY_OUTPUT_MAX_BLOCK_BYTES)

Numerical contract: fp32 like the torch path; the FWHT performs the torch butterfly's
additions in the same order and the base product sums K fp32 products (GPU tests:
< 1e-6 relative), HARP's stages the same products summed in another order (< 1e-5).
A float16 `out_dtype` rounds the fp32 result once, as the torch path's cast does.
"""
import math

import torch

from lib.incoherence.harp import StructuredRotation
from lib.incoherence.rht import HadamardRotation
from lib.utils.hadamard import base_operator, hadamard_factor

MAX_HADAMARD = 32768          # longest row of the hadamard kernel
MAX_GROUP = 4096              # coordinates of one rotation_group launch
MAX_GROUP_BYTES = 32 * 1024   # block bytes one CTA of a rotation_group launch reads
MAX_TRANSFORM_ROWS = 65535


def _stream(device):
    return torch.cuda.current_stream(device).cuda_stream


def _scale_arg(scale):
    return None if scale is None else scale.float().contiguous()


def _rows_arg(x):
    return x.contiguous() if x.dtype in (torch.float32, torch.float16) else x.float().contiguous()


def _out_half(out_dtype):
    return out_dtype == torch.float16


def hadamard_rows(ext, x, transpose, scale_in=None, scale_out=None, out_dtype=torch.float32):
    """scale_out * hadamard_transform(scale_in * x, transpose) on CUDA rows x (R, n) in
    one hadamard launch, as `out_dtype` (float32 or float16). None if n > MAX_HADAMARD."""
    n = x.shape[1]
    if n > MAX_HADAMARD:
        return None
    k, _ = hadamard_factor(n)
    base = base_operator(k, transpose, x.device, torch.float32) if k > 1 else None
    with torch.cuda.device(x.device):
        return ext.hadamard(_rows_arg(x), k, base, 1.0 / math.sqrt(n), _scale_arg(scale_in),
                            _scale_arg(scale_out), _out_half(out_dtype), _stream(x.device))


def _group_bytes(radices, strides, group):
    """Block bytes one CTA of a rotation_group launch reads (G * sum of radices * 4), or
    None when `group` (stage indices in application order) is not one launch: its
    strides must be consecutive digits of the mixed-radix index and, unless it is a
    single stage, G <= MAX_GROUP and the read <= MAX_GROUP_BYTES."""
    digits = sorted((strides[t], radices[t]) for t in group)
    if any(s_next != s * b for (s, b), (s_next, _) in zip(digits, digits[1:])):
        return None
    size = math.prod(radices[t] for t in group)
    read = size * sum(radices[t] for t in group) * 4
    if len(group) > 1 and (size > MAX_GROUP or read > MAX_GROUP_BYTES):
        return None
    return read


def rotation_plan(radices, strides, transpose):
    """Split a StructuredRotation's stages into rotation_group launches.

    `radices`, `strides`: per stage in application order of the forward rotation (passes
    repeat them). Returns lists of stage indices in the order to apply (reversed for the
    transpose): runs of consecutive stages whose strides are consecutive digits of the
    mixed-radix index, at most MAX_GROUP coordinates and MAX_GROUP_BYTES of blocks per
    CTA (a single stage is always a group). Of the plans with the fewest launches, the
    one whose largest per-CTA block read is smallest: a launch's CTAs each read their
    blocks at one SM's bandwidth, so 4096 = 8^4 runs as 64 + 64 coordinates (4 KB of
    blocks per CTA, 64 CTAs twice) rather than 512 + 8 (48 KB, 8 CTAs first). The 32 KB
    cap is measured in the decode step (H200): a CTA reading 48-50 KB costs more than one
    more launch (SmolLM2's 576 = 8 8 3 3 in one launch of one CTA per row: 4.47 ms a step,
    split in two: 3.88 ms; Llama-2-7B's 22016 output as 3 launches instead of 2: 0.5%
    faster), one reading 20 KB less (11008 as 3 launches instead of 2: 1.7% slower)."""
    order = list(range(len(radices)))
    if transpose:
        order.reverse()
    best = [(0, 0, [])]  # per prefix of `order`: (launches, largest CTA read, groups)
    for end in range(1, len(order) + 1):
        options = []
        for start in range(end):
            group = order[start:end]
            read = _group_bytes(radices, strides, group)
            if read is None:
                continue
            launches, largest, groups = best[start]
            options.append((launches + 1, max(largest, read), groups + [group]))
        best.append(min(options, key=lambda option: option[:2]))
    return best[-1][2]


def rotation_groups(rotation, transpose):
    """rotation_plan of a StructuredRotation (its stages over all passes): the stage
    indices of each rotation_group launch, in the order to apply for `transpose`."""
    radices = rotation.schedule * rotation.opts.passes
    strides = rotation.strides * rotation.opts.passes
    return rotation_plan(radices, strides, transpose)


def rotation_rows(ext, rotation, x, transpose, scale_in=None, scale_out=None,
                  out_dtype=torch.float32):
    """scale_out * (scale_in * x) R (R^T when `transpose`) for a StructuredRotation on
    CUDA rows x (R, n), with the rotation's cached blocks, as `out_dtype` (float32 or
    float16). None if a stage is wider than MAX_GROUP (the torch path runs). The Kronecker
    fallback's H_K mixer is a torch matmul, and the scales are then applied by torch too."""
    radices = rotation.schedule * rotation.opts.passes
    if max(radices) > MAX_GROUP:
        return None
    strides = rotation.strides * rotation.opts.passes
    blocks = [K.float().contiguous() for K in rotation.stage_blocks()]
    R, k = x.shape[0], rotation.kron_k
    fold = k == 1
    y = _rows_arg(x if fold or scale_in is None else x * scale_in)
    if k > 1 and transpose:
        y = (rotation.kron_mixer.to(torch.float32) @ y.float().reshape(R, k, rotation.inner))
    y = y.reshape(R * k, rotation.inner)
    groups = rotation_groups(rotation, transpose)
    with torch.cuda.device(x.device):
        for index, group in enumerate(groups):
            y = ext.rotation_group(
                y, [blocks[t] for t in group], [radices[t] for t in group],
                [strides[t] for t in group], transpose,
                _scale_arg(scale_in) if fold and index == 0 else None,
                _scale_arg(scale_out) if fold and index == len(groups) - 1 else None,
                fold and index == len(groups) - 1 and _out_half(out_dtype), _stream(x.device))
    if fold:
        return y.reshape(R, rotation.n)
    y = y.reshape(R, k, rotation.inner)
    if not transpose:
        y = rotation.kron_mixer.to(torch.float32).T @ y
    y = y.reshape(R, rotation.n)
    return (y if scale_out is None else y * scale_out).to(out_dtype)


def _transform_rows(ext, rotation, x, transpose, scale_in, scale_out, out_dtype):
    if ext is None or not x.is_cuda or x.shape[0] == 0 or x.shape[0] > MAX_TRANSFORM_ROWS:
        return None
    if isinstance(rotation, HadamardRotation):
        # transform(x) = x U_n = hadamard_transform(x, transpose=True); inverse: False.
        return hadamard_rows(ext, x, not transpose, scale_in, scale_out, out_dtype)
    if isinstance(rotation, StructuredRotation):
        return rotation_rows(ext, rotation, x, transpose, scale_in, scale_out, out_dtype)
    return None


def processor_input(ext, processor, rows):
    """(SU * rows) R_n (fp32) through the transform kernels of `ext` (the backend's
    extension, kernels.transform_extension), or None where they don't apply (no
    extension, not CUDA rows, a `kron` processor or too many rows: the torch path)."""
    return _transform_rows(ext, processor.right, rows, False, processor.SU, None, torch.float32)


def output_launches_early(processor, max_block_bytes):
    """Whether the decode-matvec should let the processor's output transform launch at its
    own start (True) or only after its main loop (False): early, unless the output is a
    HARP rotation with at least `max_block_bytes` of blocks (4 n sum(radices) bytes; None:
    always early). Early hides a launch, but a large rotation launched early can slow the
    matvec down more; whether it does depends on the backend's matvec, so each backend
    passes the threshold it measured (kernels.EARLY_OUTPUT_MAX_BLOCK_BYTES)."""
    rotation = processor.left
    if max_block_bytes is None or not isinstance(rotation, StructuredRotation):
        return True
    block_bytes = 4 * rotation.n * sum(rotation.schedule) * rotation.opts.passes
    return block_bytes < max_block_bytes


def processor_output(ext, processor, rows, out_dtype=torch.float32):
    """SV * (rows R_m^T) as `out_dtype` (float32 or float16) through the transform kernels,
    or None (as processor_input)."""
    return _transform_rows(ext, processor.left, rows, True, None, processor.SV, out_dtype)
