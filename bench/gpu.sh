#!/usr/bin/env bash
# The whole GPU run in ONE device call: build for this GPU, the GPU tests, the benchmark, ncu.
#
#   bash bench/gpu.sh [--out DIR] [--dry-run] [--plan]
#
# On a lent device (bench/README.md, "GPU": timeout_s 540, the files that come back):
#   FSGLD_COMMIT=<sha> bash bench/gpu.sh --out "$OUT"
# The run ends inside FSGLD_GPU_BUDGET_S (default 480 s) of wall time, build included. Its steps
# (PLAN below) run in order of value, each under `timeout` at its own cap; a step that would start
# past the budget is skipped and says so, and the benchmark rewrites bench.json after every row,
# so a step cut short keeps what it measured. The caps add up to at most the budget: --plan
# prints them and their sum and fails when they do not (tests/test_gpu_script.py runs it in CI).
# --dry-run walks the same steps on a CPU-only machine: tiny sizes, no GPU rows, the same files,
# no rebuild when the extension is already built (tests/test_gpu_script.py runs it too).
#
# Out folder (at most 8 files come back from the device): run.json (the plan; each step's exit
# code, seconds and result; the environment; the GPU tests' outcomes), run.log (every step's
# output, the build log included), bench.json (the results), bench.png, ncu.csv.
set -uo pipefail
cd "$(dirname "$0")/.."

# The plan: "name|cap in seconds|what", in order of value. The caps are sized from measurements
# (bench/README.md, "The one-call plan"); the sum must stay within the budget.
PLAN=(
  "start|15|versions, nvidia-smi, run.json"
  "build|95|the extension for this GPU's arch only: 6 translation units in parallel (ninja)"
  "gpu tests|90|pytest -m gpu, 4 processes: every op against the reference, masters, AMP, CUDA graphs, Rademacher, shard offsets"
  "bench 128M fp32|60|device copy, SGD(fused=True), FSGLD cuda and triton (Gaussian, Rademacher), naive eager"
  "bench host-bound|15|100 and 1000 tensors of 16 elements: SGD fused, FSGLD cuda and triton (nonfinite ignore), FSGLD defaults"
  "bench 128M bf16|45|bf16 params: SGD fused and FSGLD cuda and triton (Gaussian), with fp32 masters and without (stochastic rounding)"
  "bench 1B fp32|45|device copy, SGD fused, FSGLD cuda and triton, naive eager at 1B params"
  "bench torch.compile|55|the naive step under torch.compile, 128M fp32 (one row: no row budget, the cap stops it)"
  "ncu|45|one fp32 step per GPU backend under Nsight Compute"
  "report|15|ncu folded into bench.json; the table printed last"
)
BUDGET_S=${FSGLD_GPU_BUDGET_S:-480}

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
DRY=0
PLAN_ONLY=0
OUT_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --plan) PLAN_ONLY=1 ;;
    --out) OUT_DIR=${2:?--out needs a folder}; shift ;;
    --out=*) OUT_DIR=${1#--out=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

cap_of() {  # cap_of NAME: the step's cap in seconds
  local entry
  for entry in "${PLAN[@]}"; do
    [ "${entry%%|*}" = "$1" ] && { entry=${entry#*|}; echo "${entry%%|*}"; return 0; }
  done
  echo "gpu.sh: no step $1 in PLAN" >&2
  exit 2
}

print_plan() {  # the plan and the sum of its caps; fails when the sum exceeds the budget
  local entry name cap what sum=0
  echo "gpu.sh plan (budget ${BUDGET_S} s of wall time in one device call):"
  for entry in "${PLAN[@]}"; do
    name=${entry%%|*}; entry=${entry#*|}; cap=${entry%%|*}; what=${entry#*|}
    sum=$((sum + cap))
    printf '  %-20s %4d s  (%4d s)  %s\n' "$name" "$cap" "$sum" "$what"
  done
  echo "  sum of the caps: ${sum} s of ${BUDGET_S} s"
  if [ "$sum" -gt "$BUDGET_S" ]; then
    echo "gpu.sh: PLAN OVER BUDGET: the caps add up to ${sum} s > ${BUDGET_S} s; the run would not fit one call" >&2
    return 1
  fi
}

if [ $PLAN_ONLY = 1 ]; then
  print_plan
  exit $?
fi

PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd -P)
RUN_JSON="$OUT_DIR/run.json"
RUN_LOG="$OUT_DIR/run.log"
BENCH_JSON="$OUT_DIR/bench.json"
: >"$RUN_LOG"
# Scratch beside the out folder's files, not in it (only what is in it comes back).
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
# The tree on a device has no .git: the caller passes the commit; else git; else "unknown".
FSGLD_COMMIT=${FSGLD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export FSGLD_COMMIT PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET  # compiled Triton kernels on the GPU; tests/conftest.py decides for the tests
# A dry run shares a small CPU with others: one thread keeps OpenMP barriers from spinning on a busy core.
[ $DRY = 1 ] && export OMP_NUM_THREADS=1
FAILED=0
START=$SECONDS

say() { echo "[gpu.sh $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$RUN_LOG"; }
remaining() { echo $((BUDGET_S - (SECONDS - START))); }

print_plan | tee -a "$RUN_LOG" || {
  echo "gpu.sh: fix PLAN (or FSGLD_GPU_BUDGET_S) before spending a device call on it" | tee -a "$RUN_LOG"
  exit 1
}
plan_args=()
for entry in "${PLAN[@]}"; do plan_args+=("${entry%%|*}=$(cut -d'|' -f2 <<<"$entry")"); done
"$PY" bench/gpu_report.py env "$RUN_JSON" "$BUDGET_S" "${plan_args[@]}"
say "run -> $OUT_DIR (commit $FSGLD_COMMIT, budget ${BUDGET_S} s$([ $DRY = 1 ] && echo ', DRY RUN: CPU, tiny sizes'))"
if [ $DRY = 0 ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv 2>&1 | tee -a "$RUN_LOG"
fi
"$PY" bench/gpu_report.py step "$RUN_JSON" start 0 $((SECONDS - START))

skip_step() {
  say "SKIP $1: $2"
  "$PY" bench/gpu_report.py step "$RUN_JSON" "$1" 0 0 "$2"
}

# run_step NAME [--show] -- CMD...: CMD under `timeout` at the step's cap, cut to what the budget
# has left after the report's reserve; skipped when that leaves under 10 s. Output to run.log (and
# the terminal with --show).
run_step() {
  local name=$1 show=0 cap limit
  shift
  [ "$1" = --show ] && { show=1; shift; }
  [ "$1" = -- ] && shift
  cap=$(cap_of "$name")
  limit=$(($(remaining) - $(cap_of report)))
  if [ "$limit" -lt 10 ]; then
    skip_step "$name" "the run's budget is spent ($(remaining) s of ${BUDGET_S} s left, the report keeps $(cap_of report) s)"
    return 0
  fi
  if [ "$limit" -lt "$cap" ]; then
    say "$name: its cap ${cap} s cut to ${limit} s by the budget"
  else
    limit=$cap
  fi
  say "$name (limit ${limit} s): $*"
  local start=$SECONDS rc
  if [ $show = 1 ]; then
    timeout -s INT --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$RUN_LOG"
    rc=${PIPESTATUS[0]}
  else
    timeout -s INT --kill-after=5 "$limit" "$@" >>"$RUN_LOG" 2>&1
    rc=$?
  fi
  "$PY" bench/gpu_report.py step "$RUN_JSON" "$name" "$rc" $((SECONDS - start))
  if [ "$rc" -ne 0 ]; then
    FAILED=1
    if [ $show = 0 ]; then tail -n 40 "$RUN_LOG"; fi
    say "$name: $([ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "TIMED OUT after ${limit} s" || echo "FAILED (rc $rc)")"
  else
    say "$name: ok in $((SECONDS - start)) s"
  fi
  return 0
}

# 1. The extension, built for this GPU's arch only (offline; skipped when the build stamp matches).
step_build() {
  local import_check="import fsgld_fused._C, fsgld_fused.kernels"
  if [ $DRY = 1 ]; then
    if (cd / && "$PY" -c "$import_check") >/dev/null 2>&1; then
      skip_step build "dry run: the extension is already built"
      return 0
    fi
  else
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || {
      say "torch sees no GPU: nothing to build for (use --dry-run on a CPU machine)"
      "$PY" bench/gpu_report.py step "$RUN_JSON" build 1 0
      FAILED=1
      return 1
    }
    export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-$(nproc)}
    import_check="$import_check; import fsgld_fused.kernels.triton_ops"
  fi
  local cuda_check="; from fsgld_fused import _ops; _ops.require_extension(cuda=$([ $DRY = 0 ] && echo True || echo False))"
  build_ext build
  if (cd / && "$PY" -c "$import_check$cuda_check") >>"$RUN_LOG" 2>&1; then
    return 0
  fi
  FAILED=1
  if [ $DRY = 0 ]; then
    # Without the CUDA kernels the Triton backend can still be tested and timed: build CPU-only,
    # from the budget of the steps after it.
    say "the CUDA build failed or does not load (see run.log): building CPU-only so that Triton still runs"
    FSGLD_FORCE_CPU=1 build_ext build
    (cd / && "$PY" -c "$import_check") >>"$RUN_LOG" 2>&1 && return 0
  fi
  say "the built extension does not load: see run.log"
  return 1
}

build_ext() {  # build_ext STEP: .ci/build-ext, its full log kept in run.log when it built
  local before
  before=$(date +%s)
  run_step "$1" --show -- env PYTHON="$PY" bash .ci/build-ext
  if [ -f build/fsgld-ext-build.log ] && [ "$(stat -c %Y build/fsgld-ext-build.log)" -ge "$before" ]; then
    { echo "----- build/fsgld-ext-build.log -----"; cat build/fsgld-ext-build.log; } >>"$RUN_LOG"
  fi
}

# 2. Every test marked gpu, in 4 processes where pytest-xdist is installed (Triton compiles each
# kernel variant on first use, one at a time per process). The block-size choices the tests time
# on a busy GPU go to a scratch cache, not to the one the benchmark reads.
step_gpu_tests() {
  local files workers=()
  files=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
  "$PY" -c "import xdist" 2>/dev/null && workers=(-n "$([ $DRY = 1 ] && echo 2 || echo 4)")
  # shellcheck disable=SC2086  # $files: the test files, one word each
  run_step "gpu tests" --show -- env FSGLD_CACHE_DIR="$SCRATCH/fsgld-cache" "$PY" -m pytest -q -p no:cacheprovider \
    -m gpu -rfEs "${workers[@]}" --junitxml="$SCRATCH/pytest.xml" $files
  "$PY" bench/gpu_report.py tests "$SCRATCH/pytest.xml" "$RUN_JSON" | tee -a "$RUN_LOG"
}

# 3-8. Benchmark rows, each step appending to bench.json (rewritten after every row).
# bench_step NAME [--one-row] BENCH-ARGS...: --budget-s skips the rows that would start in the
# step's last 10 s (and says so in bench.json); a one-row step has only its cap (the benchmark
# keeps 90 s of row budget for a torch.compile row, more than the step has).
bench_step() {
  local name=$1 budget
  shift
  budget=(--budget-s $(($(cap_of "$name") - 10)))
  [ "$1" = --one-row ] && { budget=(); shift; }
  run_step "$name" --show -- "$PY" -m fsgld_fused bench "$@" "${budget[@]}" --append --out "$BENCH_JSON"
}

if [ $DRY = 1 ]; then
  DEV=(--device cpu --layout transformer --repeat 3)
  SIZE=64K BIG=256K
  FSGLD_ROWS="FSGLD cpu,FSGLD cpu rademacher"
  FSGLD_GAUSS="FSGLD cpu"
else
  DEV=(--device cuda --layout transformer --repeat 10)
  SIZE=128M BIG=1G
  FSGLD_ROWS="FSGLD cuda,FSGLD cuda rademacher,FSGLD triton,FSGLD triton rademacher"
  FSGLD_GAUSS="FSGLD cuda,FSGLD triton"
fi

step_build
BUILT=$?
if [ $BUILT = 0 ]; then
  step_gpu_tests
  bench_step "bench 128M fp32" "${DEV[@]}" --sizes $SIZE --dtypes float32 \
    --variants "device copy,SGD fused,$FSGLD_ROWS,naive fSGLD (eager)"
  bench_step "bench host-bound" --one-row "${DEV[@]/transformer/host}" --sizes 1600,16000 --dtypes float32 \
    --variants "SGD fused,$FSGLD_GAUSS,FSGLD auto (defaults)"
  bench_step "bench 128M bf16" "${DEV[@]}" --sizes $SIZE --dtypes bfloat16,bfloat16-sr \
    --variants "device copy,SGD fused,$FSGLD_GAUSS"
  bench_step "bench 1B fp32" "${DEV[@]}" --sizes $BIG --dtypes float32 \
    --variants "device copy,SGD fused,$FSGLD_GAUSS,naive fSGLD (eager)"
  if [ $DRY = 1 ]; then
    skip_step "bench torch.compile" "dry run: Inductor's CPU compile of ~100 tensors takes minutes on 2 cores"
  else
    bench_step "bench torch.compile" --one-row "${DEV[@]}" --sizes $SIZE --dtypes float32 --include compile \
      --variants "naive fSGLD (torch.compile)"
  fi
  if [ ! -f "$BENCH_JSON" ]; then
    skip_step ncu "no bench.json was written"
  elif [ $DRY = 1 ]; then
    skip_step ncu "dry run: no GPU"
    "$PY" bench/gpu_report.py ncu-skipped "$BENCH_JSON" "dry run: no GPU"
  elif ! command -v ncu >/dev/null; then
    skip_step ncu "ncu is not on the PATH"
    "$PY" bench/gpu_report.py ncu-skipped "$BENCH_JSON" "ncu is not on the PATH"
  else
    # One fp32 step per backend; --clock-control none: the clocks as the benchmark saw them.
    metrics=$(cd bench && "$PY" -c 'import gpu_report; print(",".join(gpu_report.NCU_METRICS))')
    run_step ncu -- sh -c 'out=$1; shift; exec "$@" >"$out"' sh "$OUT_DIR/ncu.csv" \
      ncu --clock-control none --profile-from-start off --csv --metrics "$metrics" "$PY" bench/ncu_step.py
    "$PY" bench/gpu_report.py ncu "$OUT_DIR/ncu.csv" "$BENCH_JSON" 2>&1 | tee -a "$RUN_LOG"
  fi
else
  for name in "gpu tests" "bench 128M fp32" "bench host-bound" "bench 128M bf16" "bench 1B fp32" \
    "bench torch.compile" ncu; do
    skip_step "$name" "the extension did not build"
  done
fi
echo
report_start=$SECONDS
"$PY" bench/gpu_report.py table "$OUT_DIR" | tee -a "$RUN_LOG"
"$PY" bench/gpu_report.py step "$RUN_JSON" report 0 $((SECONDS - report_start))
echo "gpu.sh: $([ $FAILED = 0 ] && echo "all steps passed" || echo "SOME STEPS FAILED") in $((SECONDS - START)) s" \
  "(files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' '))"
exit $FAILED
