#!/usr/bin/env bash
# On the lent GPU machine: the Hopper Gluon GEMM (kernels/src/_wgmma.py, path "wg") — its compiled
# tests, then a sweep of its configs next to bf16 cuBLAS, the shipped path and dequantize + cuBLAS.
# Usage: bash bench/wg_gpu.sh [kernel_sweep.py args...]; carry [".whl"] (pydantic etc., numpy 2.3.5).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/_gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
t0=$(date +%s)
QUANTKIT_TEST_CUDA=1 TAIL=12 run "wg tests" python3 -m pytest -q -p no:cacheprovider -x tests/test_kernels_wg.py
echo "## tests $(( $(date +%s) - t0 )) s"
if [ "${WG_DEBUG:-0}" = 1 ]; then  # diagnose first; sweep with the first variant that is right
  python3 -u bench/wg_debug.py 2>&1 | grep -v "Warning\|warn" | tail -16
  export QK_WG_DBG=$(cat /tmp/wg_dbg 2>/dev/null || echo -1)
  [ "$QK_WG_DBG" = -1 ] && { echo "## no wg variant is right: no sweep"; exit 0; }
fi
python3 -u bench/kernel_sweep.py --out "$OUT" --kinds int4 --small-ms= --cands wg "$@" 2>&1 | grep -v "Warning\|warn" | tail -${TAIL:-80}
echo "## total $(( $(date +%s) - t0 )) s"
