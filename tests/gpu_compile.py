"""Compiles every Triton kernel of mgpp_kernels, in every variant the triton backend launches,
for NVIDIA GPU targets without a GPU, and prints a JSON summary of the PTX (tests/test_triton.py
runs it). Usage: python tests/gpu_compile.py CAPABILITY... (e.g. 80 90)."""
import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mgpp_kernels.backends.triton import kernels
from mgpp_kernels.backends.triton import backend
from mgpp_kernels.patterns import NMPattern

SIGNATURES = {
    "schedule_kernel": {"table": "*fp64", "num_rows": "i32", "position": "*i64",
                        "found_inf": "*fp32", "current": "*fp64"},
    "prepare_kernel": {"prepare_table": "*i64", "scalars": "*fp64",
                       "grad_scale": "*fp32", "rows": "*fp32", "num_tensors": "i32",
                       "current": "*fp64"},
    "update_kernel": {"update_table": "*i64", "block_table": "*i32", "rows": "*fp32",
                      "histograms": "*i64", "currents": "*fp64"},
    "histogram_kernel": {"value_table": "*i64", "block_table": "*i32", "histogram": "*i64",
                         "selection": "*i64", "current": "*fp64"},
    "select_kernel": {"histogram": "*i64", "selection": "*i64", "rank_source": "*fp64",
                      "tau": "*fp32", "current": "*fp64"},
    "threshold_kernel": {"value_table": "*i64", "block_table": "*i32", "selection": "*i64",
                         "current": "*fp64"},
}
DTYPE_PAIRS = [(0, 0), (1, 0), (1, 1), (2, 0), (2, 2)]  # (parameter, state): fp32 0, bf16 1, fp16 2
# N:M pools of a power-of-two group, of one that is not (its lanes padded) and of the largest.
PATTERNS = [NMPattern(2, 4), NMPattern(2, 6), NMPattern(4, 16)]
# Approximate float32 division and square root (Triton's `/` and tl.sqrt) and flushing of
# denormals to zero: none may appear in the per-element math, whose AdamW division and square
# root are IEEE (docs/spec.md §4; its fused multiply-adds are allowed). (prepare_kernel's float64
# exp2/log2 come from libdevice, which uses such instructions inside exact algorithms.)
APPROXIMATE = re.compile(r"\b(?:div\.full|div\.approx|sqrt\.approx|rcp\.approx|ex2\.approx)"
                         r"[\w.]*|\b\w+\.ftz\.[\w.]+")
FUSED_F32 = re.compile(r"\bfma\.rn\.f32\b")
APPROXIMATE_F32_DIVISION = re.compile(r"\b(?:div\.full|div\.approx|sqrt\.approx)\.[\w.]*f32")


def variants():
    """Every kernel with every dtype (pair) and flag the backend launches it with (SCHEDULED: the
    device schedule's variants, which read the step's row and may do nothing)."""
    blocks = backend.GPU_BLOCKS
    unstructured = backend.pattern_constexprs(None)
    for has_found_inf in (True, False):
        yield "schedule_kernel", dict(HAS_FOUND_INF=has_found_inf)
    for has_grad_scale, scheduled in ((True, False), (False, False), (True, True)):
        yield "prepare_kernel", dict(HAS_GRAD_SCALE=has_grad_scale, SCHEDULED=scheduled,
                                     BLOCK=blocks["prepare"])
    # Every dtype (pair) with every flag on but SCHEDULED; then the flags off once and SCHEDULED
    # once (they drop or gate code).
    for param, state in DTYPE_PAIRS:
        yield "update_kernel", dict(PARAM_DTYPE=param, STATE_DTYPE=state, COUNT=True,
                                    SCHEDULED=False, ALIGNED=True, BLOCK=blocks["update"])
    yield "update_kernel", dict(PARAM_DTYPE=0, STATE_DTYPE=0, COUNT=False, SCHEDULED=False,
                                ALIGNED=False, BLOCK=blocks["update"])
    yield "update_kernel", dict(PARAM_DTYPE=1, STATE_DTYPE=0, COUNT=True, SCHEDULED=True,
                                ALIGNED=True, BLOCK=blocks["update"])
    for dtype in (0, 1, 2):
        for level in (0, 1):
            for scheduled in (False, True):
                yield "histogram_kernel", dict(DTYPE=dtype, LEVEL=level, SCHEDULED=scheduled,
                                               ALIGNED=True, **unstructured)
        for scheduled in (False, True):
            yield "threshold_kernel", dict(DTYPE=dtype, WRITE_MASKS=True, SCHEDULED=scheduled,
                                           ALIGNED=True, **unstructured)
    yield "threshold_kernel", dict(DTYPE=0, WRITE_MASKS=False, SCHEDULED=False, ALIGNED=False,
                                   **unstructured)
    # N:M pools: both levels and the threshold with the freeze's masks, one dtype each.
    for dtype, pattern in zip((0, 1, 2), PATTERNS):
        grouped = backend.pattern_constexprs(pattern)
        for level in (0, 1):
            yield "histogram_kernel", dict(DTYPE=dtype, LEVEL=level, SCHEDULED=True,
                                           ALIGNED=True, **grouped)
        yield "threshold_kernel", dict(DTYPE=dtype, WRITE_MASKS=True, SCHEDULED=True,
                                       ALIGNED=True, **grouped)
    for level, bins in ((0, kernels.HIGH_BINS.value), (1, kernels.LOW_BINS.value)):
        for scheduled in (False, True):
            yield "select_kernel", dict(LEVEL=level, SCHEDULED=scheduled, BINS=bins,
                                        CHUNK=min(blocks["select"], bins))


def compile_ptx(name, constexprs, capability):
    signature = dict(SIGNATURES[name], **{key: "constexpr" for key in constexprs})
    # Pointer arguments 16-byte aligned, as the JIT specialises torch's allocations.
    attrs = {(i,): [["tt.divisibility", 16]]
             for i, kind in enumerate(signature.values()) if kind.startswith("*")}
    source = ASTSource(getattr(kernels, name), signature, constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options=dict(backend.LAUNCH_OPTIONS))
    return compiled.asm["ptx"]


def main(capabilities):
    if backend.INTERPRETED:
        sys.exit("run without TRITON_INTERPRET=1: the interpreter's kernels do not compile")
    builds = []
    for capability in capabilities:
        for name, constexprs in variants():
            ptx = compile_ptx(name, constexprs, capability)
            builds.append(dict(
                name=name, constexprs=constexprs, capability=capability,
                target=re.search(r"\.target\s+(\w+)", ptx).group(1),
                approximate=sorted(set(APPROXIMATE.findall(ptx))),
                approximate_f32_division=sorted(set(APPROXIMATE_F32_DIVISION.findall(ptx))),
                fused_f32=len(FUSED_F32.findall(ptx)),
                v4_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx)),
                v4_stores=len(re.findall(r"st\.global(?:\.\w+)*\.v4\.b32", ptx))))
    json.dump(builds, sys.stdout)


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]])
