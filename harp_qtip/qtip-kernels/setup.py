"""Build and install the qtip_kernels CUDA extension (HYB trellis decode + fused decode-matvec,
the HARP / Hadamard inference transforms).

    cd harp_qtip && pip install --no-build-isolation ./qtip-kernels

Needs a CUDA build of torch and a matching nvcc (CUDA_HOME). The code is built for
Hopper (sm_90, H100/H200) only; QTIP_KERNELS_GENCODE replaces the target, e.g.
QTIP_KERNELS_GENCODE=arch=compute_80,code=sm_80. Without an install,
lib/linear/kernels.py compiles the same sources on first use (JIT, for the GPU it runs
on; HARP_QTIP_JIT=0 turns that off).
"""
import os
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

HERE = Path(__file__).resolve().parent
GENCODE = os.environ.get("QTIP_KERNELS_GENCODE", "arch=compute_90,code=sm_90")

setup(
    name="qtip_kernels",
    version="0.1.0",
    description="HARP-QTIP's trellis (HYB) CUDA kernels for the row-major tile layout",
    ext_modules=[
        CUDAExtension(
            name="qtip_kernels",
            sources=[str(HERE / name) for name in ("qtip_kernels.cu", "transforms.cu", "qtip_kernels_binding.cpp")],
            include_dirs=[str(HERE)],
            extra_compile_args={
                "cxx": ["-O3"],
                "nvcc": ["-O3", f"-gencode={GENCODE}", "-lineinfo"],
            },
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
