"""Builds mgpp_kernels._C: the torch.ops.mgpp CPU kernels (and, where CUDA is available, the CUDA
kernels). Metadata lives in pyproject.toml."""
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# -O3 and -fno-math-errno let GCC vectorise sqrt; -fno-trapping-math lets it vectorise selects on
# AVX2 (FP exception flags are never read); -ffp-contract=off keeps results independent of FMA
# contraction. Never -ffast-math: the prior relies on exp overflowing to +inf (SPEC §2).
# The kernels are built for the machine that builds them; MGPP_CPU_ARCH=x86-64-v3 (or another
# -march value) builds a binary for other machines.
CPU_ARCH = os.environ.get("MGPP_CPU_ARCH", "native")
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp", f"-march={CPU_ARCH}"]

ext_modules = [
    CppExtension(
        "mgpp_kernels._C",
        sources=["csrc/torch_ops.cpp", "csrc/cpu/mgpp_cpu.cpp"],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension})
