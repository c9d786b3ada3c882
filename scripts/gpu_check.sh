#!/usr/bin/env bash
# One command for the lent GPU machine (../shared/DEVICE.md): build the extension there for
# Hopper, run the GPU tests, run compute-sanitizer (memcheck, racecheck, synccheck) on a small
# forward+backward, and benchmark. Full logs go to $OUT (default /tmp/gpu_check); a short
# summary is printed last.
#
#   bash scripts/gpu_check.sh            # everything
#   SKIP_BENCH=1 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The repository root on the path for the scripts run below (memcheck_case.py imports dcnlab); a
# caller's PYTHONPATH is kept after it.
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .device ] && ls .device/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
[ -d /usr/local/cuda/include ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

status=()
python3 -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)' | tee "$OUT/device.txt"

start=$(date +%s)
if TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} DCNLAB_WITH_CUDA=1 \
  python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  status+=("build: ok ($(($(date +%s) - start)) s)")
else
  tail -n 60 "$OUT/build.log"
  echo "build: FAILED (see build.log)"
  exit 1
fi

python3 -m pytest -m gpu tests ${PYTEST_ARGS:-} >"$OUT/gpu_tests.log" 2>&1
rc=$?
status+=("gpu tests: $(tail -n 1 "$OUT/gpu_tests.log") (exit $rc)")
[ $rc -ne 0 ] && grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -n 30

# memcheck: out-of-bounds and misaligned accesses; racecheck: shared-memory hazards between
# threads (the kernels' warp-private stencil slots, the fused kernels' shared tiles); synccheck:
# barriers and warp syncs reached by the wrong threads. SANITIZERS picks the tools.
if command -v compute-sanitizer >/dev/null; then
  for tool in ${SANITIZERS:-memcheck racecheck synccheck}; do
    compute-sanitizer --tool "$tool" --error-exitcode 3 python3 scripts/memcheck_case.py >"$OUT/$tool.log" 2>&1
    rc=$?
    status+=("$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -n 1) (exit $rc)")
  done
else
  status+=("compute-sanitizer: not found")
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  python3 scripts/bench_op.py --device cuda --md "$OUT/bench.md" --json "$OUT/bench.json" --plot "$OUT/bench.png" \
    ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
  status+=("bench: exit $? (bench.md)")
  cat "$OUT/bench.md" 2>/dev/null
fi

printf '\n== summary ==\n'
printf '%s\n' "${status[@]}"
