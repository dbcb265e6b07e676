"""Only the optional CUDA extension lives here; everything else is in pyproject.toml.

Build it with ``COMPRESSDIT_BUILD_CUDA=1 pip install -e .`` (off by default: the package runs
everywhere on its PyTorch reference implementations).
"""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("COMPRESSDIT_BUILD_CUDA") == "1":
    from pathlib import Path

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(str(p) for pattern in ("*.cu", "*.cpp") for p in Path("cuda_ext").glob(pattern))
    if sources:
        ext_modules = [CUDAExtension("compressdit._cuda_ext", sources,
                                     extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})]
        cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
