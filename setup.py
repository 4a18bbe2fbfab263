"""Builds mgpp_kernels._C: the torch.ops.mgpp CPU kernels (and, where CUDA is available, the CUDA
kernels). Metadata lives in pyproject.toml."""
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import torch
from setuptools import setup

FLAGS_FILE = "csrc/compile_flags.txt"
SOURCES = ["csrc/ops/schema.cpp", "csrc/ops/cpu.cpp", "csrc/cpu/dispatch.cpp"]
# Compiled once per build of the CPU kernels (capability), outside torch's BuildExtension.
KERNEL_SOURCES = ["csrc/cpu/kernels.cpp", "csrc/cpu/variant.cpp"]
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


def compiler_takes(compiler: str, flag: str) -> bool:
    """Whether the C++ compiler accepts `flag` (an -march target it may not know)."""
    result = subprocess.run([compiler, flag, "-x", "c++", "-fsyntax-only", "-"], input="",
                            capture_output=True, text=True)
    return result.returncode == 0


def cxx_compiler() -> str:
    return (os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++").split()[0]


def cpu_builds(override: str | None) -> list[tuple[str, str, str]]:
    """(namespace suffix, capability, -march target) of each build of the CPU kernels, lowest
    first: the [cpu-capabilities] of csrc/compile_flags.txt on x86-64 (those the compiler
    takes), else one build for MGPP_CPU_ARCH, or for native off x86-64. csrc/cpu/dispatch.cpp
    runs the best the CPU supports (csrc/cpu/dispatch.h)."""
    if override:
        return [("single", override, override)]
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [("single", "native", "native")]
    builds = []
    for line in read_compile_flags(FLAGS_FILE, "")["cpu-capabilities"]:
        capability, march = line.split()
        if compiler_takes(cxx_compiler(), f"-march={march}"):
            builds.append((capability, capability, march))
        else:
            print(f"mgpp_kernels: the compiler does not take -march={march}: the CPU kernels are "
                  f"built without the {capability} path")
    return builds


# One build covers every machine of its architecture: on x86-64 the kernels are compiled for each
# capability of csrc/compile_flags.txt and picked at run time, the rest for the lowest.
# MGPP_CPU_ARCH=<-march value> (native, say) builds everything for that target alone. Every
# target rounds the same (csrc/core/step.h).
CPU_ARCH_OVERRIDE = os.environ.get("MGPP_CPU_ARCH") or None
CPU_BUILDS = cpu_builds(CPU_ARCH_OVERRIDE)
CPU_ARCH = CPU_BUILDS[0][2]  # the target of everything but the kernels' builds
FLAGS = read_compile_flags(FLAGS_FILE, CPU_ARCH)
CXX_FLAGS = FLAGS["cxx"] + ["-fopenmp"]
NVCC_FLAGS = FLAGS["nvcc"] + ["-Xcompiler", ",".join(FLAGS["nvcc-host"])]
# TORCH_CUDA_ARCH_LIST spelling ("8.0;9.0") of the default compute capabilities.
DEFAULT_CUDA_ARCHS = ";".join(f"{c[:-1]}.{c[-1]}" for c in FLAGS["cuda-archs"])
DEFINES = [(f"MGPP_CPU_BUILD_{suffix.upper()}", None) for suffix, _, _ in CPU_BUILDS]


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


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class BuildWithCpuKernels(BuildExtension):
    """torch's BuildExtension (one set of flags for every C++ source), after compiling
    KERNEL_SOURCES once per entry of CPU_BUILDS with that build's -march, namespace and
    capability; the objects are linked after the extension's own, lowest capability first
    (csrc/cpu/dispatch.cpp says why). The kernels include no torch header: the plain compiler,
    each object rebuilt when its command or a source under csrc/core or csrc/cpu is newer."""

    def build_extensions(self):
        objects = self.compile_cpu_kernels()
        for ext in self.extensions:
            ext.extra_objects = [o for o in ext.extra_objects if o not in objects] + objects
        super().build_extensions()

    def compile_cpu_kernels(self) -> list[str]:
        sources = sorted(f"csrc/{d}/{f}" for d in ("core", "cpu") for f in os.listdir(f"csrc/{d}"))
        newest = max(os.path.getmtime(p) for p in sources + [FLAGS_FILE])
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        jobs = []
        for suffix, capability, march in CPU_BUILDS:
            flags = read_compile_flags(FLAGS_FILE, march)["cxx"]
            out_dir = os.path.join(self.build_temp, "cpu_kernels", suffix)
            os.makedirs(out_dir, exist_ok=True)
            for source in KERNEL_SOURCES:
                obj = os.path.join(out_dir, os.path.basename(source)[:-4] + ".o")
                command = [cxx_compiler(), "-std=c++17", "-fPIC", "-fopenmp", *flags, "-Icsrc",
                           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DMGPP_NAMESPACE=mgpp_{suffix}",
                           f"-DMGPP_CPU_CAPABILITY={capability}", f"-DMGPP_CPU_ARCH={march}",
                           "-c", source, "-o", obj]
                jobs.append((obj, command))

        def compile_one(job):
            obj, command = job
            stamp = obj + ".cmd"
            text = " ".join(command)
            if (os.path.exists(obj) and os.path.getmtime(obj) >= newest and os.path.exists(stamp)
                    and _read(stamp) == text):
                return
            print(text)
            subprocess.run(command, check=True)
            with open(stamp, "w") as f:
                f.write(text)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(compile_one, jobs))
        return [obj for obj, _ in jobs]


setup(ext_modules=[extension], cmdclass={"build_ext": BuildWithCpuKernels})
