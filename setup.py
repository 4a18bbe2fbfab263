"""Builds mgpp_kernels._C: the torch.ops.mgpp CPU kernels (and, where CUDA is available, the CUDA
kernels). Metadata lives in pyproject.toml."""
import os
import shutil

import torch
from setuptools import setup

# -O3 and -fno-math-errno let GCC vectorise sqrt; -fno-trapping-math lets it vectorise selects on
# AVX2 (FP exception flags are never read); -ffp-contract=off keeps results independent of FMA
# contraction. Never -ffast-math: the prior relies on exp overflowing to +inf (SPEC §2).
# The kernels are built for the machine that builds them; MGPP_CPU_ARCH=x86-64-v3 (or another
# -march value) builds a binary for other machines.
CPU_ARCH = os.environ.get("MGPP_CPU_ARCH", "native")
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp",
             f"-march={CPU_ARCH}"]
# Never --use_fast_math; --fmad=false makes the device round as the CPU kernel does.
NVCC_FLAGS = ["-O3", "--fmad=false", "-Xcompiler", "-fno-math-errno,-fno-trapping-math,-ffp-contract=off"]
SOURCES = ["csrc/torch_ops.cpp", "csrc/cpu/mgpp_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda_ops.cpp", "csrc/cuda/mgpp_cuda.cu"]
# Built for these when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible to ask.
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def is_cuda_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_toolkit():
    """(toolkit root, None) to build the CUDA kernels with, or (None, why they are skipped)."""
    if os.environ.get("MGPP_SKIP_CUDA") == "1":
        return None, "MGPP_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is built without CUDA"
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(variable)
        if root:
            if is_cuda_toolkit(root):
                return root, None
            return None, f"{variable}={root} has no bin/nvcc and include/cuda_runtime.h"
    # nvcc on PATH may be a wrapper script outside the toolkit: check its directory's parent, then
    # the usual install location.
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for root in candidates + ["/usr/local/cuda"]:
        if is_cuda_toolkit(root):
            return root, None
    return None, "no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)"


cuda_home, skip_reason = find_cuda_toolkit()
if cuda_home is not None:
    # torch.utils.cpp_extension reads both when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if cuda_home is not None:
    extension = CUDAExtension(
        "mgpp_kernels._C",
        sources=SOURCES + CUDA_SOURCES,
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        extra_link_args=["-fopenmp"],
    )
else:
    print(f"mgpp_kernels: building the CPU kernels only, without the CUDA kernels ({skip_reason})")
    extension = CppExtension(
        "mgpp_kernels._C",
        sources=SOURCES,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )

setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension})
