#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU (no network; its own torch with CUDA): build
# lstm_ext with its CUDA kernels, record the machine, run the CUDA tests (and the CPU suite when
# time allows), benchmark float32 and bfloat16 against torch.nn.LSTM, and write it all down.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
#
# RESULTS_DIR defaults to benchmarks/results/gpu_check-<UTC time>; with the device tool, pass
# "$OUT/gpu_check" so the results come back. It receives: gpu_check.log (everything), env.json
# (device, driver, versions, date, commit), summary.md, per test stage a JUnit XML and its output
# as .txt, and bench_<dtype>.json / .txt. Every stage runs under its own time limit; a failed stage
# is recorded and the next one still runs. The whole run aims at ~8 minutes
# (GPU_CHECK_BUDGET_S=480); a stage that no longer fits is skipped and says so. Set
# LSTM_EXT_COMMIT=<sha> when the tree has no .git (a copied working tree), so env.json names it.
set -uo pipefail

cd "$(dirname "$0")/.."
budget_s="${GPU_CHECK_BUDGET_S:-480}"
start=$(date +%s)
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
results="${1:-benchmarks/results/gpu_check-$stamp}"
mkdir -p "$results"
results="$(cd "$results" && pwd)"
log="$results/gpu_check.log"
summary="$results/summary.md"
: >"$log"
PY="${PYTHON:-python}"

say() { echo "$*" | tee -a "$log"; }
elapsed() { echo $(($(date +%s) - start)); }

declare -a stage_rows=()
# run_stage NAME LIMIT_S OUT COMMAND...: runs COMMAND under `timeout` with its output in the log
# (and in the file OUT too, unless OUT is -), unless fewer than LIMIT_S/2 seconds of the budget
# remain; the limit is cut to what remains.
run_stage() {
  local name="$1" limit="$2" out="$3"
  shift 3
  local left=$((budget_s - $(elapsed)))
  if [ "$left" -lt $((limit / 2)) ]; then
    say "=== $name: SKIPPED (only ${left} s of the ${budget_s} s budget left)"
    stage_rows+=("| $name | skipped (time) | 0 |")
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  say "=== $name (limit ${limit} s, at $(elapsed) s)"
  local t0 rc status
  t0=$(date +%s)
  if [ "$out" = "-" ]; then
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
  else
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out" >>"$log"
    rc=${PIPESTATUS[0]}
  fi
  case $rc in
    0) status="ok" ;;
    124 | 137) status="TIMED OUT" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  say "=== $name: $status in $(($(date +%s) - t0)) s"
  stage_rows+=("| $name | $status | $(($(date +%s) - t0)) |")
  return 0
}

# --- the machine -----------------------------------------------------------------------------------
say "lstm_ext GPU check, $stamp, results in $results"
{
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
  command -v nvcc && nvcc --version || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
  "$PY" --version
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|numpy|pytest|ninja|pybind11|setuptools|nvidia-cuda)" || true
} >>"$log" 2>&1

commit="${LSTM_EXT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
dirty="$(git status --porcelain 2>/dev/null | grep -q . && echo true || echo false)"
RESULTS="$results" COMMIT="$commit" DIRTY="$dirty" STAMP="$stamp" "$PY" - >>"$log" 2>&1 <<'EOF'
import json, os, platform, subprocess
import torch

def smi(field):
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    except Exception:
        return None

env = {
    "date_utc": os.environ["STAMP"],
    "commit": os.environ["COMMIT"],
    "tree_dirty": os.environ["DIRTY"] == "true",
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    "gpu_available": torch.cuda.is_available(),
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if torch.cuda.is_available() else None,
    "gpu_count": torch.cuda.device_count(),
    "driver": smi("driver_version"),
    "python": platform.python_version(),
    "host": platform.node(),
    "cpu_count": os.cpu_count(),
}
print(json.dumps(env, indent=2))
json.dump(env, open(os.path.join(os.environ["RESULTS"], "env.json"), "w"), indent=2)
EOF

# --- build -------------------------------------------------------------------------------------------
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || true)"
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS="${MAX_JOBS:-$(($(nproc) < 8 ? $(nproc) : 8))}"
say "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<none>} MAX_JOBS=$MAX_JOBS"
# FORCE_CUDA: on this machine a build without the CUDA kernels is a failure, not a fallback.
run_stage "build" 240 - env FORCE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
run_stage "build_info" 60 - "$PY" -c "import lstm_ext, json; print(json.dumps(lstm_ext.build_info()))"

# --- tests -------------------------------------------------------------------------------------------
run_stage "tests/test_cuda.py" 240 "$results/test_cuda.txt" env LSTM_EXT_EXPECT_CUDA=1 "$PY" -m pytest tests/test_cuda.py \
  -q -rs -p no:cacheprovider --junitxml="$results/test_cuda.xml"

# --- benchmarks --------------------------------------------------------------------------------------
for dtype in float32 bfloat16; do
  run_stage "bench $dtype" 90 "$results/bench_$dtype.txt" "$PY" benchmarks/bench_lstm.py --device cuda --dtype "$dtype" \
    --target-time 2 --json "$results/bench_$dtype.json"
done

# The CPU suite last: the CUDA results matter most here, and it is what this machine adds least to.
run_stage "tests (CPU suite)" 150 "$results/test_cpu.txt" "$PY" -m pytest tests -x -q -p no:cacheprovider \
  --ignore=tests/test_cuda.py --junitxml="$results/test_cpu.xml"

# --- summary -----------------------------------------------------------------------------------------
{
  echo "# lstm_ext GPU check, $stamp"
  echo
  echo '```'
  cat "$results/env.json" 2>/dev/null || echo "(no env.json)"
  echo
  echo '```'
  echo
  echo "| stage | result | seconds |"
  echo "| --- | --- | --- |"
  printf '%s\n' "${stage_rows[@]}"
  echo
  echo "Test totals (pytest's closing lines):"
  echo
  echo '```'
  grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error)" "$log" || echo "(none)"
  echo '```'
  echo
  echo "Total: $(elapsed) s. Full log: gpu_check.log."
} >"$summary"
# The benchmark's own report, per dtype, for reading without the log.
for dtype in float32 bfloat16; do
  if [ -s "$results/bench_$dtype.txt" ]; then
    {
      echo
      echo "## bench $dtype"
      echo
      echo '```'
      tail -n 80 "$results/bench_$dtype.txt"
      echo '```'
    } >>"$summary"
  fi
done
cat "$summary"
say "done in $(elapsed) s"
