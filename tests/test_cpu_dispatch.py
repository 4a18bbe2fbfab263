"""Runtime dispatch of the CPU kernels by instruction set (csrc/cpu/dispatch.h): build_info names
every build of the kernels and the path taken, which is the best build this CPU supports; each
path the CPU supports, forced by MGPP_CPU_CAPABILITY in a fresh process, stays within
docs/spec.md §4 of the reference and is deterministic across 1 and 2 threads (tests/
dispatch_worker.py; the paths may differ from each other in bits, so each is compared with the
oracle, not with the others); an unknown or unsupported capability is a clear error."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import mgpp_kernels._C  # noqa: F401  (registers torch.ops.mgpp)

from backends import BY_NAME
from helpers import REPO_ROOT, TESTS_DIR

CPU = BY_NAME["cpu"]
pytestmark = pytest.mark.skipif(CPU.unavailable is not None,
                                reason=f"the cpu backend does not run here: {CPU.unavailable}")

# What each x86-64 capability of csrc/compile_flags.txt needs, as /proc/cpuinfo names it.
NEEDS = {
    "baseline": set(),
    "avx2": {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2"},
    "avx512": {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "avx512f", "avx512bw", "avx512vl",
               "avx512dq", "avx512cd"},
}
INFO = re.compile(r"cpu kernels: path (\S+) \((the best this CPU supports|forced by "
                  r"MGPP_CPU_CAPABILITY); built: ((?:[\w.-]+ \(-march=[\w.-]+\)(?:, )?)+)\), "
                  r"-march=(\S+) \(")


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def parse_info(info: str):
    """(path, how chosen, [(capability, -march) of every build], the path's -march)."""
    match = INFO.match(info)
    assert match, info
    builds = re.findall(r"([\w.-]+) \(-march=([\w.-]+)\)", match.group(3))
    return match.group(1), match.group(2), builds, match.group(4)


BUILDS = parse_info(torch.ops.mgpp.build_info())[2]


def supported(capability: str) -> bool:
    return capability in NEEDS and NEEDS[capability] <= cpu_flags()


def run_python(args: list[str], capability: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MGPP_CPU_CAPABILITY", None)
    if capability is not None:
        env["MGPP_CPU_CAPABILITY"] = capability
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), str(TESTS_DIR),
                                                      env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_build_info_names_every_build_and_the_path():
    path, how, builds, march = parse_info(torch.ops.mgpp.build_info())
    assert (path, march) in builds
    if os.environ.get("MGPP_CPU_CAPABILITY"):
        return
    assert how == "the best this CPU supports"
    if [c for c, _ in builds] == ["baseline", "avx2", "avx512"]:
        assert path == [c for c, _ in builds if supported(c)][-1]


@pytest.mark.parametrize("capability", sorted(NEEDS))
def test_each_supported_path_within_bounds_and_deterministic(capability):
    if capability not in dict(BUILDS):
        pytest.skip(f"this build has no {capability} kernels (built: {BUILDS})")
    if not supported(capability):
        pytest.skip(f"this CPU lacks {sorted(NEEDS[capability] - cpu_flags())}")
    result = run_python([str(TESTS_DIR / "dispatch_worker.py")], capability)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    lines = result.stdout.splitlines()
    path, how, _, march = parse_info(lines[0])
    assert (path, how, march) == (capability, "forced by MGPP_CPU_CAPABILITY",
                                  dict(BUILDS)[capability])
    assert lines[-1] == "OK"


def test_info_command_names_the_path():
    capability = BUILDS[0][0]
    result = run_python(["-m", "mgpp_kernels", "info"], capability)
    assert result.returncode == 0, result.stderr
    assert f"cpu kernels: path {capability} (forced by MGPP_CPU_CAPABILITY; built: " in \
        result.stdout


STEP = ("import torch, mgpp_kernels\n"
        "p = torch.nn.Parameter(torch.ones(10))\n"
        "opt = mgpp_kernels.MGPP([{'params': [p], 'prune': True}], num_train_examples=10,\n"
        "                        initial_warmup_steps=1, total_steps=10, backend='cpu')\n"
        "p.grad = torch.ones(10)\n"
        "try:\n"
        "    opt.step()\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, error)\n"
        "else:\n"
        "    print('stepped')\n")


def test_unknown_capability_is_an_error():
    result = run_python(["-c", STEP], "sse9")
    assert result.returncode == 0, result.stderr
    assert "mgpp: MGPP_CPU_CAPABILITY=sse9 names no build of the CPU kernels; this binary has " \
        f"{BUILDS[0][0]} (-march={BUILDS[0][1]})" in result.stdout, result.stdout
    assert "stepped" not in result.stdout


def test_unsupported_capability_is_an_error():
    missing = [c for c, _ in BUILDS if c in NEEDS and not supported(c)]
    if not missing:
        pytest.skip("this CPU supports every build (csrc/tests/test_cpu_dispatch.cpp forces "
                    "one on fewer features)")
    result = run_python(["-c", STEP], missing[-1])
    assert result.returncode == 0, result.stderr
    assert f"MGPP_CPU_CAPABILITY={missing[-1]} forces the CPU kernels built with" in result.stdout
    assert "this CPU lacks" in result.stdout and "stepped" not in result.stdout
