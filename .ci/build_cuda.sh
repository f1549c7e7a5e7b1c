#!/usr/bin/env bash
# CI: compile lstm_ext with its CUDA kernels on a machine without a GPU, then run tests/test_cuda.py,
# whose registration tests need only the build (the GPU tests skip cleanly).
#
# It builds in a temporary copy of the repository, with its own virtualenv (a CUDA build of torch),
# so the CPU build and the .venv of the source tree are left as they are.
#
#   bash .ci/build_cuda.sh
#
# Environment: CUDA_VENV (default <repo>/.ci-venv-cuda; reused when it already has the right torch),
# TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 2), KEEP_BUILD_COPY=1 to keep the copy.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${CUDA_VENV:-$repo/.ci-venv-cuda}"
torch_spec="torch==2.14.1"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"

start=$(date +%s)
stage_start=$start
stage() {
  local now
  now=$(date +%s)
  echo "[build_cuda] $1: $((now - stage_start)) s"
  stage_start=$now
}

if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
echo "[build_cuda] nvcc: $(command -v nvcc || echo "${CUDA_HOME:-?}/bin/nvcc")," \
  "archs $TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"

# --- virtualenv with a CUDA build of torch ------------------------------------------------------
py="$venv/bin/python"
if [ -x "$py" ] && "$py" -c "import sys, torch; sys.exit(not (torch.__version__.startswith('${torch_spec#torch==}') and torch.version.cuda))" 2>/dev/null; then
  echo "[build_cuda] reusing $venv"
else
  rm -rf "$venv"
  python3 -m venv "$venv"
  pip_log="$(mktemp)"
  # The CUDA build of torch pulls several GB of nvidia-* wheels; the output goes to a log.
  if ! "$py" -m pip install "$torch_spec" numpy pytest ninja pybind11 setuptools wheel >"$pip_log" 2>&1; then
    grep -v "^WARNING: Location" "$pip_log" | tail -40
    echo "[build_cuda] pip install failed"
    exit 1
  fi
  rm -f "$pip_log"
fi
# The venv's tools first: torch's build runs `ninja` from PATH.
export PATH="$venv/bin:$PATH"
"$py" -c "import torch; print('[build_cuda] torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU visible:', torch.cuda.is_available())"
stage "virtualenv"

# --- a copy of the repository to build in -------------------------------------------------------
copy="$(mktemp -d "${TMPDIR:-/tmp}/lstm_ext_cuda_build.XXXXXX")"
if [ "${KEEP_BUILD_COPY:-0}" != "1" ]; then
  trap 'rm -rf "$copy"' EXIT
fi
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # Tracked files plus untracked ones git does not ignore: no venv, build folder or built library.
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) \
    | tar -xf - -C "$copy"
else
  (cd "$repo" && tar --exclude=./.venv --exclude=./.ci-venv-cuda --exclude=./build \
    --exclude='*.so' --exclude='*.o' -cf - .) | tar -xf - -C "$copy"
fi
echo "[build_cuda] building in $copy"
stage "copy"

# --- build ---------------------------------------------------------------------------------------
cd "$copy"
build_log="$copy/build_cuda.log"
# FORCE_CUDA: a CUDA build is what this script checks, whatever setup.py's own detection thinks.
if ! FORCE_CUDA=1 "$py" setup.py build_ext --inplace >"$build_log" 2>&1; then
  grep -E "error|Error|FAILED" "$build_log" | head -40 || true
  tail -40 "$build_log"
  echo "[build_cuda] build failed"
  exit 1
fi
grep "^lstm_ext build:" "$build_log" || true
ninja_log="$(find build -name .ninja_log | head -1)"
if [ -n "$ninja_log" ]; then
  echo "[build_cuda] compile time per file (wall, $MAX_JOBS jobs in parallel):"
  awk -F'\t' '!/^#/ { n = split($4, p, "/csrc/"); printf "  %6.1f s  csrc/%s\n", ($2 - $1) / 1000, p[n] }' \
    "$ninja_log" | sort -rn
fi
ls -la lstm_ext/_C*.so
stage "build"

# --- tests ----------------------------------------------------------------------------------------
"$py" -c "import lstm_ext; print('[build_cuda] build_info:', lstm_ext.build_info())"
# LSTM_EXT_EXPECT_CUDA turns "this build has no CUDA kernels" into failures instead of skips.
LSTM_EXT_EXPECT_CUDA=1 "$py" -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider
stage "tests"
echo "[build_cuda] total: $(($(date +%s) - start)) s"
