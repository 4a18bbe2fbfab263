"""Builds mgpp_kernels._C: the torch.ops.mgpp CPU kernels (and, where CUDA is available, the CUDA
kernels). Metadata lives in pyproject.toml."""
import os
import re
import shutil
import subprocess
import sys

import torch
from setuptools import setup

FLAGS_FILE = "csrc/compile_flags.txt"
SOURCES = ["csrc/ops/schema.cpp", "csrc/ops/cpu.cpp", "csrc/cpu/kernels.cpp"]
CUDA_SOURCES = ["csrc/ops/cuda.cpp", "csrc/cuda/launch.cu"]
# The 32 KB kernel argument tables of the CUDA kernels need this toolkit version or newer.
MIN_NVCC = (12, 1)


def read_compile_flags(path: str, cpu_arch: str) -> dict[str, list[str]]:
    """The flags of each [section] of csrc/compile_flags.txt (CMakeLists.txt reads the same file),
    with @MGPP_CPU_ARCH@ replaced by the -march target."""
    sections: dict[str, list[str]] = {}
    current = None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], [])
            elif current is None:
                raise ValueError(f"{path}:{number}: flag {line!r} outside a [section]")
            else:
                current.append(line.replace("@MGPP_CPU_ARCH@", cpu_arch))
    return sections


# The kernels are built for the machine that builds them; MGPP_CPU_ARCH=x86-64-v3 (or another
# -march value) builds a binary for other machines. Every target rounds the same (csrc/core/step.h).
CPU_ARCH = os.environ.get("MGPP_CPU_ARCH", "native")
FLAGS = read_compile_flags(FLAGS_FILE, CPU_ARCH)
CXX_FLAGS = FLAGS["cxx"] + ["-fopenmp"]
NVCC_FLAGS = FLAGS["nvcc"] + ["-Xcompiler", ",".join(FLAGS["nvcc-host"])]
# TORCH_CUDA_ARCH_LIST spelling ("8.0;9.0") of the default compute capabilities.
DEFAULT_CUDA_ARCHS = ";".join(f"{c[:-1]}.{c[-1]}" for c in FLAGS["cuda-archs"])
DEFINES = [("MGPP_CPU_ARCH", CPU_ARCH)]


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


def nvcc_version(root):
    """(major, minor) of the toolkit's nvcc, from its `release X.Y` line."""
    output = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True,
                            text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", output)
    if match is None:
        sys.exit(f"mgpp_kernels: cannot read the version of {root}/bin/nvcc from:\n{output}")
    return int(match.group(1)), int(match.group(2))


cuda_home, skip_reason = find_cuda_toolkit()
if cuda_home is not None:
    version = nvcc_version(cuda_home)
    if version < MIN_NVCC:
        sys.exit(f"mgpp_kernels: the CUDA kernels need nvcc {MIN_NVCC[0]}.{MIN_NVCC[1]} or newer "
                 f"(their 32 KB kernel argument tables), but {cuda_home} has nvcc "
                 f"{version[0]}.{version[1]}. Set CUDA_HOME to a newer toolkit, or "
                 f"MGPP_SKIP_CUDA=1 to build the CPU kernels only.")
    # torch.utils.cpp_extension reads both when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if cuda_home is not None:
    extension = CUDAExtension(
        "mgpp_kernels._C",
        sources=SOURCES + CUDA_SOURCES,
        define_macros=DEFINES + [("MGPP_WITH_CUDA", None)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        extra_link_args=["-fopenmp"],
    )
else:
    print(f"mgpp_kernels: building the CPU kernels only, without the CUDA kernels ({skip_reason})")
    extension = CppExtension(
        "mgpp_kernels._C",
        sources=SOURCES,
        define_macros=DEFINES,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )

setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension})
