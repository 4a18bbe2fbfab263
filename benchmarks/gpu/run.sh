#!/usr/bin/env bash
# shellcheck disable=SC2317  # the stage functions are called by name, as "stage_$2"
# The prepared GPU run: on a machine with one CUDA GPU (a lease: one H100 or H200, Python 3.12,
# torch 2.11, triton 3.6, nvcc 13.0, 16 cores, no network), from a bare copy of the repository, the
# stages below in this order, each under its own time limit (STAGE_LIMITS, at most 8 minutes in
# all). A stage that fails or runs out of time is recorded and the next one runs.
#   build   mgpp_kernels._C in place for sm_90 only, with the nvcc found through CUDA_HOME, PATH
#           or /usr/local/cuda (recorded); a build without the CUDA kernels fails this stage, with
#           the build info in the summary, and the later stages run the backends that were built
#   smoke   one tiny step of each backend against the reference (bench_gpu.py --part smoke)
#   bench   benchmarks/gpu/bench_gpu.py: the GPU-only checks, then the speed rows
#   verify  python -m mgpp_kernels verify on 12 BERT-base layers
#   tests   pytest -m "gpu and not slow", the CUDA build's and the rounding tests first
#
# OUT_DIR receives 5 files (a lease brings back at most 8): summary.txt (one screen: every stage,
# its status, seconds and key numbers), gpu_bench.json and gpu_bench.md (rewritten after every
# section), run.log (every stage's output; the compiler's is in the archive) and logs.tar.gz (the
# build log, `mgpp_kernels info`, pytest's JUnit XML, each stage's log). The summary and the
# archive are rewritten after every stage, so that a run cut short keeps what it finished.
#
# Usage: benchmarks/gpu/run.sh OUT_DIR [--dry-run]
#        benchmarks/gpu/run.sh --stages     the stage table: a stage and its limit (s) a line
# --dry-run: the same stages, limits and files on the CPU: nothing compiled (the checkout's
# extension is checked), tiny sizes, triton through the interpreter and the cpu backend in the
# place of cuda (tests/test_gpu_script.py runs it, so that this script cannot rot).
# MGPP_GPU_RUN_FAIL=<stage>[,<stage>...] or "all" makes those stages fail (the build as if the
# CUDA kernels were skipped, smoke and bench in their first section, verify and tests at once),
# to test that the others still report.
set -uo pipefail

# The stages in their order and each one's limit in seconds: 8 minutes in all, so that one
# 10-minute command of a 15-minute lease (its machine's start included) brings everything back.
# The build compiles the CPU kernels three times and four torch-including files in parallel
# (launch.cu alone takes 4 s for sm_90); verify's limit is its dry run's (about 30 s on two idle
# cores, twice that when they are shared).
STAGE_LIMITS=(build=150 smoke=30 bench=140 verify=75 tests=85)
# The test files the tests stage runs first: the CUDA build and the numerics against the cpu
# backend and the reference.
FIRST_TESTS=(tests/test_cuda_build.py tests/test_rounding.py tests/test_step_bounds.py
             tests/test_threshold.py tests/test_device_schedule.py tests/test_amp.py)
MAX_FAILED_TESTS=25

SCRIPT=$(realpath "${BASH_SOURCE[0]}")
REPO=$(dirname "$(dirname "$(dirname "$SCRIPT")")")
cd "$REPO" || exit 1

injected() {   # whether MGPP_GPU_RUN_FAIL names stage $1
  [[ ",${MGPP_GPU_RUN_FAIL:-}," == *",$1,"* || ${MGPP_GPU_RUN_FAIL:-} == all ]]
}

summary() {   # a line of the stage's key numbers, for summary.txt
  echo "summary: $*"
}

built_backends() {   # the kernel backends the build stage found built (all before it ran)
  if [[ -f $WORK/backends ]]; then cat "$WORK/backends"; else echo "$KERNEL_BACKENDS"; fi
}

bench_gpu() {   # benchmarks/gpu/bench_gpu.py on the run's folder: it finds which backends are
  # built, runs their rows and names the others
  local arguments=("$OUT" --backends "${KERNEL_BACKENDS// /,}" "$@")
  [[ -n $DRY_RUN ]] && arguments+=(--dry-run)
  "$PYTHON" benchmarks/gpu/bench_gpu.py "${arguments[@]}"
}

# ---- the stages (each runs in its own process, under its limit) ----------------------------------

is_cuda_toolkit() {   # what setup.py builds the CUDA kernels with
  [[ -x $1/bin/nvcc && -f $1/include/cuda_runtime.h ]]
}

find_cuda_home() {   # prints the toolkit's root, a tab, and how it was found; nothing if none
  local nvcc root
  if [[ -n ${CUDA_HOME:-} ]] && is_cuda_toolkit "$CUDA_HOME"; then
    printf '%s\t%s\n' "$CUDA_HOME" "CUDA_HOME"
    return
  fi
  # nvcc on PATH may be a wrapper script outside the toolkit (setup.py looks the same way).
  if nvcc=$(command -v nvcc); then
    root=$(dirname "$(dirname "$(realpath "$nvcc")")")
    if is_cuda_toolkit "$root"; then
      printf '%s\t%s\n' "$root" "nvcc on PATH ($nvcc)"
      return
    fi
  fi
  if is_cuda_toolkit /usr/local/cuda; then
    printf '%s\t%s\n' /usr/local/cuda \
      "/usr/local/cuda${nvcc:+ (nvcc on PATH, $nvcc, is not in a toolkit)}"
  fi
}

stage_build() {
  local root how build_status=0 build_info backends=() backend kernels=CUDA candidates
  local stand_in=${KERNEL_BACKENDS%% *}   # cuda, or cpu in its place in the dry run
  [[ -n $DRY_RUN ]] && kernels=cpu
  if IFS=$'\t' read -r root how < <(find_cuda_home); then
    summary "nvcc: $root/bin/nvcc, found through $how," \
      "$("$root/bin/nvcc" --version | grep -o 'release [0-9.]*')"
    if [[ -n ${CUDA_HOME:-} && $CUDA_HOME != "$root" ]]; then
      summary "CUDA_HOME=$CUDA_HOME is no toolkit (bin/nvcc, include/cuda_runtime.h): $root instead"
    fi
    export CUDA_HOME=$root
  else
    summary "nvcc: none (CUDA_HOME=${CUDA_HOME:-unset}, none on PATH, no /usr/local/cuda)"
  fi
  if [[ -n $DRY_RUN ]]; then
    summary "dry run: nothing compiled; the checkout's extension is checked"
  else
    echo "TORCH_CUDA_ARCH_LIST=9.0 $PYTHON setup.py build_ext --inplace > build.log (archived)"
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) "$PYTHON" setup.py build_ext --inplace \
      > "$WORK/build.log" 2>&1 || build_status=$?
    tail -n 15 "$WORK/build.log"
    if ((build_status != 0)); then
      summary "setup.py failed (exit $build_status):" \
        "$(grep -m 2 -iE 'error|fatal' "$WORK/build.log" | cut -c 1-200)"
    fi
  fi
  "$PYTHON" -m mgpp_kernels info > "$WORK/info.txt" 2>&1
  cat "$WORK/info.txt"
  summary "$(head -n 2 "$WORK/info.txt" | paste -s -d ';' | sed 's/;/; /')"
  build_info=$(grep -m 1 '^cpu kernels:' "$WORK/info.txt")
  read -r -a candidates <<< "$KERNEL_BACKENDS"
  for backend in "${candidates[@]}"; do
    # A build made to fail counts as one that skipped the CUDA kernels.
    if injected build && [[ $backend == "$stand_in" ]]; then
      continue
    fi
    if grep -q "^backend $backend: built" "$WORK/info.txt"; then
      backends+=("$backend")
    fi
  done
  echo "${backends[*]}" > "$WORK/backends"
  summary "backends built: ${backends[*]:-none} (of $KERNEL_BACKENDS)"
  if injected build; then
    summary "failure injected (MGPP_GPU_RUN_FAIL); build info: ${build_info:-none}"
    return 1
  fi
  if [[ -n $DRY_RUN && $build_info == *"cpu kernels:"* ]]; then
    summary "${build_info:0:150}"
    return 0
  fi
  if [[ -z $DRY_RUN ]] && ((build_status == 0)) && [[ $build_info == *"cuda kernels:"* ]]; then
    summary "${build_info##*; }"
    return 0
  fi
  if ((build_status != 0)); then
    summary "the build failed; build info of the extension there is: ${build_info:-none}"
  else
    summary "the build has no $kernels kernels; build info: ${build_info:-none}"
  fi
  return 1
}

stage_smoke() {
  bench_gpu --part smoke
}

stage_bench() {
  bench_gpu --part bench
}

stage_verify() {
  local arguments=() backends backend verify_status=0 theta m v tau mask final final_mask status
  if injected verify; then
    summary "failure injected (MGPP_GPU_RUN_FAIL)"
    return 1
  fi
  read -r -a backends < <(built_backends)
  for backend in "${backends[@]}"; do
    arguments+=(--backend "$backend")
  done
  if ((${#arguments[@]} == 0)); then
    summary "no backend was built"
    return 1
  fi
  "$PYTHON" -m mgpp_kernels verify "${arguments[@]}" --layers "$VERIFY_LAYERS" \
    > "$WORK/verify.txt" 2>&1 || verify_status=$?
  cat "$WORK/verify.txt"
  # Its table's rows: backend, elements, θ, m and v error/bound, τ exact, mask diff, final
  # relative error and mask diff, status.
  grep -E "^($(built_backends | tr ' ' '|')) " "$WORK/verify.txt" | while read -r row; do
    read -r backend _ theta m v tau mask final final_mask status <<< "$row"
    summary "$backend $status: θ $theta, m $m, v $v of the bound; τ exact $tau; mask diff" \
      "$mask; end to end $final, mask diff $final_mask"
  done
  summary "$(tail -n 1 "$WORK/verify.txt")"
  return "$verify_status"
}

stage_tests() {
  local files=("${FIRST_TESTS[@]}") file tests_status
  if injected tests; then
    summary "failure injected (MGPP_GPU_RUN_FAIL)"
    return 1
  fi
  for file in tests/test_*.py; do
    [[ " ${FIRST_TESTS[*]} " == *" $file "* ]] || files+=("$file")
  done
  "$PYTHON" -m pytest -q -p no:cacheprovider -m "gpu and not slow" --maxfail="$MAX_FAILED_TESTS" \
    -rfE --junitxml="$WORK/tests.xml" "${files[@]}" 2>&1 | tee "$WORK/pytest.txt"
  tests_status=${PIPESTATUS[0]}
  summary "pytest -m \"gpu and not slow\":" "$(tail -n 1 "$WORK/pytest.txt" | tr -d '=' \
    | sed 's/^ *//')"
  grep -m 3 -E '^(FAILED|ERROR) ' "$WORK/pytest.txt" | while read -r line; do
    summary "${line:0:150}"
  done
  return "$tests_status"
}

# ---- the run -------------------------------------------------------------------------------------

run_stage() {   # runs stage $1 under its limit of $2 seconds, records how it went; 1 unless ok
  local name=$1 limit=$2 started status elapsed
  echo "== $name: at most ${limit}s ($(date -u +%T))" | tee -a "$OUT/run.log"
  started=$(date +%s%N)
  timeout --kill-after=10 "$limit" bash "$SCRIPT" --stage "$name" 2>&1 \
    | tee "$WORK/stage_$name.log" | tee -a "$OUT/run.log"
  status=${PIPESTATUS[0]}
  elapsed=$((($(date +%s%N) - started) / 100000000))
  case $status in
    0) status=ok ;;
    124 | 137) status="TIMEOUT" ;;
    *) status="FAILED ($status)" ;;
  esac
  printf '%s\t%s\t%d.%d\t%s\n' "$name" "$status" $((elapsed / 10)) $((elapsed % 10)) "$limit" \
    >> "$WORK/stages.tsv"
  echo "== $name: $status after $((elapsed / 10)).$((elapsed % 10))s" | tee -a "$OUT/run.log"
  [[ $status == ok ]]
}

write_summary() {
  local entry name status seconds limit total=0
  {
    echo "MGPP GPU run, $(date -u '+%Y-%m-%d %H:%M UTC'): $MACHINE"
    printf '%-7s %-12s %8s %6s\n' stage status seconds limit
    for entry in "${STAGE_LIMITS[@]}"; do
      name=${entry%%=*}
      limit=${entry#*=}
      total=$((total + limit))
      if ! IFS=$'\t' read -r _ status seconds limit < <(grep "^$name"$'\t' "$WORK/stages.tsv"); then
        printf '%-7s %-12s %8s %6s\n' "$name" "not run yet" "" "$limit"
        continue
      fi
      printf '%-7s %-12s %8s %6s\n' "$name" "$status" "$seconds" "$limit"
      sed -n 's/^summary: /        /p' "$WORK/stage_$name.log"
    done
    echo "limits: ${total}s in all. Files: gpu_bench.json, gpu_bench.md, run.log, logs.tar.gz" \
      "($(find "$WORK" -type f -printf '%f ' | sed 's/ $//'))"
  } > "$WORK.summary"
  mv "$WORK.summary" "$OUT/summary.txt"
  tar -czf "$WORK.tar.gz" -C "$WORK" . && mv "$WORK.tar.gz" "$OUT/logs.tar.gz"
}

if [[ ${1:-} == --stages ]]; then
  for entry in "${STAGE_LIMITS[@]}"; do
    echo "${entry%%=*} ${entry#*=}"
  done
  exit 0
fi

if [[ ${1:-} == --stage ]]; then
  declare -F "stage_$2" > /dev/null || { echo "no stage $2" >&2; exit 2; }
  "stage_$2"
  exit
fi

OUT=${1:?usage: benchmarks/gpu/run.sh OUT_DIR [--dry-run] | --stages}
if [[ $OUT == -* ]]; then
  echo "usage: benchmarks/gpu/run.sh OUT_DIR [--dry-run] | --stages" >&2
  exit 2
fi
case ${2:-} in
  --dry-run) DRY_RUN=1 ;;
  "") DRY_RUN= ;;
  *) echo "unknown option $2 (usage: benchmarks/gpu/run.sh OUT_DIR [--dry-run])" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mgpp-gpu-run.XXXXXX")
trap 'rm -rf "$WORK" "$WORK.tar.gz" "$WORK.summary"' EXIT
rm -f "$OUT"/{summary.txt,run.log,gpu_bench.json,gpu_bench.md,logs.tar.gz}
PYTHON=${PYTHON:-python3}
if [[ -n $DRY_RUN ]]; then
  KERNEL_BACKENDS="cpu triton" VERIFY_LAYERS=1 TRITON_INTERPRET=1
  MACHINE="dry run on the CPU (cpu in the place of cuda, triton through the interpreter)"
  # One thread, as in the tests: on shared cores an OpenMP barrier can wait milliseconds for a
  # descheduled sibling, which turns the tiny sizes' steps into scheduler slices.
  export OMP_NUM_THREADS=1
else
  KERNEL_BACKENDS="cuda triton" VERIFY_LAYERS=12 TRITON_INTERPRET=0
  MACHINE=$(timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader 2>&1 | head -n 1)
  [[ -n $MACHINE ]] || MACHINE="nvidia-smi printed nothing"
fi
export OUT WORK DRY_RUN PYTHON KERNEL_BACKENDS VERIFY_LAYERS TRITON_INTERPRET
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

echo "MGPP GPU run in $REPO: $MACHINE" | tee "$OUT/run.log"
failed=0
for entry in "${STAGE_LIMITS[@]}"; do
  run_stage "${entry%%=*}" "${entry#*=}" || failed=1
  write_summary
done
cat "$OUT/summary.txt"
exit "$failed"
