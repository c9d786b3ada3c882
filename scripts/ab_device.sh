#!/usr/bin/env bash
# Same-machine A/B on the lent GPU (../shared/DEVICE.md): builds an old tree (OLD_TAR, from
# `git archive <commit> | gzip > .device/old.tar.gz`) and this tree in parallel, then runs
# scripts/ab_kernels.py for each variant in turn, ROUNDS times, so that both see the same machine
# start. Optionally runs the GPU tests of the new tree.
#
#   VARIANTS="old:old new:new new8:new:DCNLAB_GRADS_PACK=4" SHAPES=A,B,C ROUNDS=2 bash scripts/ab_device.sh
#
# A variant is tag:tree[:ENV=value,ENV=value]; tree is old or new. TEST_K (pytest -k) or FULL_TESTS=1
# runs the GPU tests afterwards, under TEST_ENV (ENV=value,...). Output: $OUT/ab.txt, build and test logs.
set -u
ROOT=$(pwd)
OUT=${OUT:-/tmp/ab}
OLD_TAR=${OLD_TAR:-.device/old.tar.gz}
mkdir -p "$OUT"
if ls .device/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/*.whl
fi
[ -d /usr/local/cuda/include ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
nvidia-smi --query-gpu=name --format=csv,noheader
build() {  # dir log jobs
  (cd "$1" && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$3 DCNLAB_WITH_CUDA=1 python3 setup.py build_ext --inplace >"$2" 2>&1)
  echo "build $1: exit $?"
}
if [[ "$VARIANTS" == *:old* ]]; then
  if ! ls /tmp/old/dcnlab/_C*.so >/dev/null 2>&1; then
    rm -rf /tmp/old && mkdir -p /tmp/old && tar -xzf "$OLD_TAR" -C /tmp/old
    build /tmp/old "$OUT/build_old.log" 8 &
  fi
  build "$ROOT" "$OUT/build_new.log" 8 &
  wait
else
  build "$ROOT" "$OUT/build_new.log" 16
fi
for round in $(seq 1 "${ROUNDS:-2}"); do
  for variant in $VARIANTS; do
    IFS=: read -r tag tree envs <<<"$variant"
    dir=$ROOT
    [ "$tree" = old ] && dir=/tmp/old
    (
      cd "$dir" && export PYTHONPATH=$dir:/tmp/site
      for kv in ${envs//,/ }; do export "$kv"; done
      python3 "$ROOT/scripts/ab_kernels.py" "${SHAPES:-A,B,C}" "$tag r$round" 2>&1 | grep -v "UserWarning\|warn_once"
    ) | tee -a "$OUT/ab.txt"
  done
done
if [ -n "${TEST_K:-}${FULL_TESTS:-}" ]; then
  (
    export PYTHONPATH=$ROOT:/tmp/site
    TEST_ENV=${TEST_ENV:-}
    for kv in ${TEST_ENV//,/ }; do export "$kv"; done
    python3 -m pytest -m gpu tests -q ${TEST_K:+-k "$TEST_K"} >"$OUT/tests.log" 2>&1
    echo "tests: exit $?"
    tail -n 2 "$OUT/tests.log"
  )
fi
