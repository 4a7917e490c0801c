#!/usr/bin/env bash
# The GPU run in one command: build for this GPU, the GPU tests, check, the benchmark, ncu.
#
#   bash bench/gpu.sh [--dry-run] [--out DIR] [--stage build-test|bench|all]
#
# On a lent device, two calls of under 10 minutes each (bench/README.md, "GPU"):
#   FSGLD_COMMIT=<sha> bash bench/gpu.sh --stage build-test --out "$OUT"
#   FSGLD_COMMIT=<sha> bash bench/gpu.sh --stage bench --out "$OUT"
# Each stage ends inside FSGLD_STAGE_BUDGET_S (default 540 s): every step runs under `timeout`,
# and the benchmark rewrites its JSON after every row, so a step cut short keeps what it measured.
# --dry-run walks the same steps on a CPU-only machine: tiny sizes, no GPU rows, the same JSON
# files, no rebuild when the extension is already built (tests/test_gpu_script.py runs it).
#
# Out folder (at most 8 files, as the device tool returns): build-test.{json,log} (steps, their exit
# codes and times, the environment; every step's output), bench-stage.{json,log}, bench.json (the
# results), bench.png, ncu.csv.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
DRY=0
STAGE=all
OUT_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR=${2:?--out needs a folder}; shift ;;
    --out=*) OUT_DIR=${1#--out=} ;;
    --stage) STAGE=${2:?--stage needs build-test, bench or all}; shift ;;
    --stage=*) STAGE=${1#--stage=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case "$STAGE" in build-test|bench|all) ;; *) echo "gpu.sh: --stage $STAGE: use build-test, bench or all" >&2; exit 2 ;; esac

PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd -P)
STAGE_BUDGET_S=${FSGLD_STAGE_BUDGET_S:-540}
# The tree on a device has no .git: the caller passes the commit; else git; else "unknown".
FSGLD_COMMIT=${FSGLD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export FSGLD_COMMIT PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET  # compiled Triton kernels on the GPU; tests/conftest.py decides for the tests
# A dry run shares a small CPU with others: one thread keeps OpenMP barriers from spinning on a busy core.
[ $DRY = 1 ] && export OMP_NUM_THREADS=1
FAILED=0

say() { echo "[gpu.sh $(date -u +%H:%M:%S) +$((SECONDS - STAGE_START))s] $*" | tee -a "$STAGE_LOG"; }
remaining() { echo $((STAGE_BUDGET_S - (SECONDS - STAGE_START))); }

# run_step NAME CAP_S [--show] -- CMD...: CMD under `timeout`, limited to CAP_S and to what is left of
# the stage (minus a margin for the table); output to the stage log (and the terminal with --show).
run_step() {
  local name=$1 cap=$2 show=0
  shift 2
  [ "$1" = --show ] && { show=1; shift; }
  [ "$1" = -- ] && shift
  local limit
  limit=$(remaining)
  limit=$((limit - 20 < cap ? limit - 20 : cap))
  if [ "$limit" -lt 10 ]; then
    say "SKIP $name: the stage's ${STAGE_BUDGET_S} s are spent"
    "$PY" bench/gpu_report.py step "$STAGE_JSON" "$name" 0 0 "stage time budget spent"
    return 0
  fi
  say "$name (limit ${limit} s): $*"
  local start=$SECONDS rc
  if [ $show = 1 ]; then
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$STAGE_LOG"
    rc=${PIPESTATUS[0]}
  else
    timeout --kill-after=10 "$limit" "$@" >>"$STAGE_LOG" 2>&1
    rc=$?
  fi
  "$PY" bench/gpu_report.py step "$STAGE_JSON" "$name" "$rc" $((SECONDS - start))
  if [ "$rc" -ne 0 ]; then
    FAILED=1
    if [ $show = 0 ]; then tail -n 40 "$STAGE_LOG"; fi
    say "$name: $([ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "TIMED OUT after ${limit} s" || echo "FAILED (rc $rc)")"
  else
    say "$name: ok in $((SECONDS - start)) s"
  fi
  return 0
}

skip_step() {
  say "SKIP $1: $2"
  "$PY" bench/gpu_report.py step "$STAGE_JSON" "$1" 0 0 "$2"
}

begin_stage() {  # begin_stage NAME JSON LOG
  STAGE_START=$SECONDS
  STAGE_JSON="$OUT_DIR/$2"
  STAGE_LOG="$OUT_DIR/$3"
  : >"$STAGE_LOG"
  "$PY" bench/gpu_report.py env "$STAGE_JSON" "$1$([ $DRY = 1 ] && echo ' (dry run)')"
  say "stage $1 -> $OUT_DIR (commit $FSGLD_COMMIT, budget ${STAGE_BUDGET_S} s$([ $DRY = 1 ] && echo ', DRY RUN: CPU, tiny sizes'))"
  if [ $DRY = 0 ]; then
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
      --format=csv 2>&1 | tee -a "$STAGE_LOG"
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
              triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU VISIBLE')" \
      2>&1 | tee -a "$STAGE_LOG"
  fi
}

# The extension built for this GPU's arch (offline; skipped when the build stamp still matches).
ensure_built() {
  local import_check="import fsgld_fused._C, fsgld_fused.kernels"
  if [ $DRY = 1 ]; then
    if (cd / && "$PY" -c "$import_check") >/dev/null 2>&1; then
      skip_step build "dry run: the extension is already built"
      return 0
    fi
  else
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || {
      say "torch sees no GPU: nothing to build for (use --dry-run on a CPU machine)"
      "$PY" bench/gpu_report.py step "$STAGE_JSON" build 1 0
      FAILED=1
      return 1
    }
    export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-$(nproc)}
    import_check="$import_check; import fsgld_fused.kernels.triton_ops"
  fi
  local cuda_check="; from fsgld_fused import _ops; _ops.require_extension(cuda=$([ $DRY = 0 ] && echo True || echo False))"
  build_step build
  if (cd / && "$PY" -c "$import_check$cuda_check") >>"$STAGE_LOG" 2>&1; then
    return 0
  fi
  FAILED=1
  if [ $DRY = 0 ]; then
    # Without the CUDA kernels the Triton backend can still be tested and timed: build CPU-only.
    say "the CUDA build failed or does not load (see $STAGE_LOG): building CPU-only so that Triton still runs"
    FSGLD_FORCE_CPU=1 build_step "build (CPU-only fallback)"
    (cd / && "$PY" -c "$import_check") >>"$STAGE_LOG" 2>&1 && return 0
  fi
  say "the built extension does not load: see $STAGE_LOG"
  return 1
}

build_step() {  # build_step NAME: .ci/build-ext, its full log kept in the stage log when it built
  local before
  before=$(date +%s)
  run_step "$1" 300 --show -- env PYTHON="$PY" bash .ci/build-ext
  if [ -f build/fsgld-ext-build.log ] && [ "$(stat -c %Y build/fsgld-ext-build.log)" -ge "$before" ]; then
    { echo "----- build/fsgld-ext-build.log -----"; cat build/fsgld-ext-build.log; } >>"$STAGE_LOG"
  fi
}

stage_build_test() {
  begin_stage build-test build-test.json build-test.log
  ensure_built || return 0
  # GPU tests: every test marked gpu (tests/test_gpu.py and any other); a dry run collects
  # test_gpu.py alone (it all skips on a CPU machine; collecting every file costs seconds).
  run_step "pytest -m gpu" 330 --show -- "$PY" -m pytest -q -p no:cacheprovider -m gpu -rfEs \
    "$([ $DRY = 1 ] && echo tests/test_gpu.py || echo tests/)"
  if [ $DRY = 1 ]; then
    run_step check 60 --show -- "$PY" -m fsgld_fused check --device cpu --params 5000 --tensors 8
    skip_step "pytest (CPU subset)" "dry run: the CPU suite is CI's"
  else
    run_step check 120 --show -- "$PY" -m fsgld_fused check
    # Whatever fits: the optimizer's CPU tests on this machine's torch/triton versions.
    run_step "pytest (CPU subset)" 240 -- "$PY" -m pytest -q -p no:cacheprovider -m "not slow" -x \
      tests/test_backends.py tests/test_capturable.py tests/test_optimizer.py tests/test_integration.py
  fi
}

stage_bench() {
  begin_stage bench bench-stage.json bench-stage.log
  ensure_built || return 0
  local bench_json="$OUT_DIR/bench.json" ncu_reserve=0 limit
  [ $DRY = 0 ] && command -v ncu >/dev/null && ncu_reserve=130
  limit=$(($(remaining) - ncu_reserve - 30))
  if [ $DRY = 1 ]; then
    set -- --device cpu --sizes 64K --layout transformer --dtypes float32,bfloat16 --repeat 3 --include ""
  else
    # 16M fits in L2-adjacent sizes, 128M and 1G are DRAM-bound; bf16 runs FSGLD with fp32 masters.
    set -- --device cuda --sizes 16M,128M,1G --layout transformer --dtypes float32,bfloat16 --repeat 10 \
      --include compile
  fi
  # --budget-s: rows that would start late are skipped (and say so); `timeout` is the hard stop.
  run_step bench "$limit" --show -- "$PY" -m fsgld_fused bench "$@" --budget-s $((limit - 40)) --out "$bench_json"
  if [ ! -f "$bench_json" ]; then
    say "no bench.json was written"
  elif [ $DRY = 1 ]; then
    skip_step ncu "dry run: no GPU"
    "$PY" bench/gpu_report.py ncu-skipped "$bench_json" "dry run: no GPU"
  elif [ $ncu_reserve = 0 ]; then
    skip_step ncu "ncu is not on the PATH"
    "$PY" bench/gpu_report.py ncu-skipped "$bench_json" "ncu is not on the PATH"
  else
    # One fp32 step per backend; --clock-control none: the clocks as the benchmark saw them.
    local metrics
    metrics=$(cd bench && "$PY" -c 'import gpu_report; print(",".join(gpu_report.NCU_METRICS))')
    run_step ncu 120 -- sh -c 'out=$1; shift; exec "$@" >"$out"' sh "$OUT_DIR/ncu.csv" \
      ncu --clock-control none --profile-from-start off --csv --metrics "$metrics" "$PY" bench/ncu_step.py
    "$PY" bench/gpu_report.py ncu "$OUT_DIR/ncu.csv" "$bench_json" 2>&1 | tee -a "$STAGE_LOG"
  fi
}

case "$STAGE" in
  build-test) stage_build_test ;;
  bench) stage_bench ;;
  all) stage_build_test; stage_bench ;;
esac
echo
"$PY" bench/gpu_report.py table "$OUT_DIR"
echo "gpu.sh: $([ $FAILED = 0 ] && echo "all steps passed" || echo "SOME STEPS FAILED") (files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' '))"
exit $FAILED
