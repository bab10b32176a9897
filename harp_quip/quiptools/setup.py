"""Build and install the quiptools CUDA extension (E8P12 decode + fused decode-matvec).

    cd harp_quip && pip install --no-build-isolation ./quiptools

Needs a CUDA build of torch and a matching nvcc (CUDA_HOME). The code is built for
Hopper (sm_90, H100/H200) only; QUIPTOOLS_GENCODE replaces the target, e.g.
QUIPTOOLS_GENCODE=arch=compute_80,code=sm_80. Without an install,
lib/linear/kernels.py compiles the same sources on first use (JIT, for the GPU it runs
on; HARP_QUIPTOOLS_JIT=0 turns that off).
"""
import os
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

HERE = Path(__file__).resolve().parent
GENCODE = os.environ.get("QUIPTOOLS_GENCODE", "arch=compute_90,code=sm_90")

setup(
    name="quiptools",
    version="0.1.0",
    description="HARP's E8P12 CUDA kernels (our code layout, not upstream QuIP#'s)",
    ext_modules=[
        CUDAExtension(
            name="quiptools",
            sources=[str(HERE / name) for name in ("quiptools.cu", "transforms.cu", "quiptools_binding.cpp")],
            include_dirs=[str(HERE)],
            extra_compile_args={
                "cxx": ["-O3"],
                "nvcc": ["-O3", f"-gencode={GENCODE}", "-lineinfo"],
            },
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
