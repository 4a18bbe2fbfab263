#!/usr/bin/env bash
# The prepared GPU run: on a machine with one CUDA GPU (the H200 one: Python 3.12, torch 2.11,
# triton 3.6, nvcc 13.0, no network), from a bare copy of the repository, in at most 8 minutes:
#   1. builds mgpp_kernels._C in place for that GPU only (sm_90 on an H200);
#   2. runs the tests marked gpu and the CUDA build tests on the real device (no interpreter);
#   3. verify on all 12 BERT-base layers for the cuda and triton backends;
#   4. benchmarks/gpu/bench_gpu.py: JSON and a markdown table into OUT_DIR.
# Usage: benchmarks/gpu/run.sh OUT_DIR [--dry-run]
# --dry-run: no build and no GPU, tiny sizes, triton through the interpreter (the test suite runs
# it so that this script cannot rot).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: benchmarks/gpu/run.sh OUT_DIR [--dry-run]}
DRY_RUN=${2:-}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() { echo "== $* ($(date +%T))" | tee -a "$OUT/run.log"; }

if [[ "$DRY_RUN" == "--dry-run" ]]; then
  step "dry run: bench_gpu.py on the CPU"
  exec "$PYTHON" benchmarks/gpu/bench_gpu.py "$OUT" --dry-run
fi

step "build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:=9.0})"
export TORCH_CUDA_ARCH_LIST CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TRITON_INTERPRET=0
"$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
"$PYTHON" -m mgpp_kernels info | tee "$OUT/info.txt"

status=0
step "tests on the GPU: every suite's cuda and triton rows, the CUDA build, the rounding"
"$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/ --junitxml="$OUT/tests_gpu.xml" \
  2>&1 | tail -40 | tee "$OUT/tests_gpu.txt" || status=1
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda_build.py tests/test_rounding.py \
  --junitxml="$OUT/tests_build.xml" 2>&1 | tail -20 | tee "$OUT/tests_build.txt" || status=1

step "verify, 12 BERT-base layers, cuda and triton"
"$PYTHON" -m mgpp_kernels verify --backend cuda --backend triton --layers 12 \
  2>&1 | tee "$OUT/verify.txt" || status=1

step "benchmark"
"$PYTHON" benchmarks/gpu/bench_gpu.py "$OUT" 2>&1 | tee "$OUT/bench.txt" || status=1
step "done (status $status)"
exit $status
