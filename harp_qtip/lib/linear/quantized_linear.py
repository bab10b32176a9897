"""A quantized linear layer: codes (any codebook of the pipeline contract,
lib/codebook/base.py) + incoherence processor.

y = SV * ((decode(codes) ((SU * x) R_n)^T)^T R_m^T): the transforms run on the
activations; the dense weight W^ is never formed (see lib/incoherence/base.py).

Pure PyTorch everywhere (decode to a dense float32 W', then a matmul), except on CUDA
when the backend's kernels are loaded (lib/linear/kernels.py; each backend has its own)
and no gradient is needed. harp_quip (quiptools): the product with the codes of E8P12,
E8P12RVQ3B and E8P12RVQ4B runs in the fused decode-matvec kernel for up to 8 rows (fp32
accumulation; equal to the torch path up to fp32 rounding, relative ~1e-6) and as kernel
decode + torch matmul for more rows (the same W', so the same result), and the `had` and
`harp` transforms (signs included) run in the rotation kernels (fp32, the same products
in another order). `use_kernels = False` on an instance (or HARP_KERNELS=0 in the
environment) forces the torch path. CPU results are never affected.
"""
import torch
from torch import nn

from lib.codebook import get_codebook
from lib.incoherence import empty_processor
from lib.linear import kernels, transform_kernels


class QuantizedLinear(nn.Module):
    use_kernels = True  # set False on an instance to force the torch path on CUDA

    def __init__(self, in_features, out_features, codebook, processor_config):
        """`codebook`: a codebook name or the dict of `Codebook.config()` (name and options)."""
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.codebook = get_codebook(**codebook) if isinstance(codebook, dict) else get_codebook(codebook)
        self.register_buffer(
            "Qidxs", torch.zeros(self.codebook.code_shape(out_features, in_features),
                                 dtype=self.codebook.storage_dtype))
        for name, value in self.codebook.empty_state().items():   # e.g. QTIP's code table
            self.register_buffer(name, value)
        self.processor = empty_processor(processor_config, out_features, in_features)
        self._decoded = None

    def load_quantized(self, codes, processor):
        self.Qidxs = codes.to(device=self.Qidxs.device, dtype=self.codebook.storage_dtype)
        for name, value in self.codebook.state().items():
            setattr(self, name, value.to(self.Qidxs.device))
        self.processor.load_state_dict(processor.state_dict())
        self.freeze()

    def freeze(self):
        """Call after loading a state: precomputes the processor's inference state."""
        self.processor.freeze()

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "codebook": self.codebook.config(), "processor": self.processor.config()}

    @classmethod
    def from_config(cls, config):
        return cls(config["in_features"], config["out_features"], config["codebook"],
                   config["processor"])

    def bound_codebook(self):
        """The codebook with this linear's stored state (e.g. QTIP's table); what decodes."""
        return self.codebook.bind(**{name: getattr(self, name) for name in self.codebook.state_names})

    def decoded_weight(self):
        """The decoded grid matrix W'^ (m x n, float32), before the output scales."""
        if self._decoded is not None:
            return self._decoded
        return self.bound_codebook().decode_matrix(self.Qidxs, self.out_features, self.in_features)

    def cache_decoded(self, enabled=True):
        """Keep the decoded codes on their current device (fine-tuning's --ft_train_mode:
        no decode per step; the codes never change)."""
        self._decoded = None
        if enabled:
            self._decoded = self.decoded_weight()

    def dequantize(self):
        """Dense W^ (m x n, float32); for tests and analysis, not for inference."""
        return self.processor.restore_weight(self.decoded_weight())

    def _kernels_apply(self, rows):
        """Whether the kernels may run on `rows`: kernels on for this layer, CUDA rows, no
        cached decoded weight (fine-tuning) and no gradient needed, neither for the rows nor
        for the layer's parameters (the kernels have no backward)."""
        if not self.use_kernels or not rows.is_cuda or self._decoded is not None:
            return False
        if not torch.is_grad_enabled():
            return True
        state = (*self.parameters(), self.processor.SU, self.processor.SV)
        return not rows.requires_grad and not any(t.requires_grad for t in state)

    def kernel_product(self, rows):
        """rows @ W'^T through the quiptools kernels, or None where the torch path runs."""
        if not self._kernels_apply(rows):
            return None
        return kernels.linear_product(self.bound_codebook(), rows, self.Qidxs)

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        fast = self._kernels_apply(rows)   # then also for the processed rows (same device, no grad)
        ext = kernels.transform_extension(rows) if fast else None
        processed = transform_kernels.processor_input(ext, self.processor, rows)
        if processed is None:
            processed = self.processor.input_transform(rows.float())
        out = None
        if fast:
            early = transform_kernels.output_launches_early(
                self.processor, kernels.EARLY_OUTPUT_MAX_BLOCK_BYTES)
            out = kernels.linear_product(self.bound_codebook(), processed, self.Qidxs, early)
        if out is None:
            out = processed @ self.decoded_weight().T
        out_dtype = x.dtype if x.dtype in (torch.float16, torch.float32) else torch.float32
        result = transform_kernels.processor_output(ext, self.processor, out, out_dtype)
        if result is None:
            result = self.processor.output_transform(out)
        return result.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
