#!/usr/bin/env bash
# On the lent GPU machine (see /work/.library/device/README.md): install, check the compiled kernels,
# then benchmark. Usage: bash bench/gpu_kernels.sh STEP... with steps
#   test                      compiled kernel tests (QUANTKIT_TEST_CUDA=1)
#   bench:ARGS                bench/kernel_bench.py ARGS (commas in ARGS kept; ~ separates arguments)
#   decode:ARGS               bench/decode.py ARGS (same convention)
#   sweep:ARGS                bench/kernel_sweep.py ARGS (same convention): kernel variants, checked and timed
#   wg:ARGS                   the Hopper Gluon GEMMs (kernels/src/_wgmma*.py): their compiled tests, then
#                             kernel_sweep.py --cands wg ARGS (its configs beside bf16, the shipped path, dq);
#                             env WG_TESTS, WG_PROCS, WG_CANDS (a candidate set), WG_KINDS (int4,any4...)
#   peers:ARGS                Marlin built from .peers/marlin, gemlite from .whl, then bench/peers.py ARGS:
#                             bf16, quantkit int4, tinygemm, Marlin, gemlite in one process (peers.md/.json
#                             in $OUT). First, on the CPU machine: bash bench/peers_prep.sh; carry
#                             [".whl", ".peers"]. A peer that fails to build or import is reported, not fatal.
# Outputs (json, tuned configs) go to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/_gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
for step in "$@"; do
  name=${step%%:*}; arg=${step#*:}; [ "$arg" = "$step" ] && arg=""
  args=${arg//\~/ }
  t0=$(date +%s)
  case $name in
    test) QUANTKIT_TEST_CUDA=1 TAIL=15 run "compiled kernel tests" python3 -m pytest -q -p no:cacheprovider \
            -n ${TEST_PROCS:-8} tests/test_kernels_k.py tests/test_kernels.py tests/test_kernels_asm.py ;;
    bench) python3 -u bench/kernel_bench.py $args 2>&1 | grep -v "Warning\|warn" | tail -${TAIL:-400} ;;
    decode) python3 -u bench/decode.py $args 2>&1 | grep -v "Warning\|warn" | tail -60 ;;
    sweep) python3 -u bench/kernel_sweep.py $args 2>&1 | grep -v "Warning\|warn" | tail -${TAIL:-200} ;;
    wg) QUANTKIT_TEST_CUDA=1 TAIL=12 run "wg tests" timeout -k 5 ${WG_TEST_S:-180} \
          python3 -m pytest -q -x -p no:cacheprovider -n ${WG_PROCS:-1} ${WG_TESTS:-tests/test_kernels_wg.py tests/test_kernels_wg_rs.py}
        timeout -k 5 ${WG_SWEEP_S:-400} python3 -u bench/kernel_sweep.py --out "$OUT" --kinds ${WG_KINDS:-int4} --small-ms= --cands ${WG_CANDS:-wg} $args 2>&1 \
          | grep -v "Warning\|warn" | tail -${TAIL:-80} ;;
    peers)
      if [ -f .peers/marlin/setup.py ]; then
        ( cd .peers/marlin && TORCH_CUDA_ARCH_LIST=9.0 timeout 300 python3 setup.py build_ext --inplace \
            >"$OUT/marlin_build.log" 2>&1 ) && echo "## marlin built ($(( $(date +%s) - t0 )) s)" \
          || { echo "## marlin build FAILED (reported by peers.py as unavailable):"; tail -5 "$OUT/marlin_build.log"; }
      else
        echo "## no .peers/marlin: run bash bench/peers_prep.sh on the CPU machine and carry .peers"
      fi
      python3 -c "import gemlite; print('## gemlite', gemlite.__version__)" 2>&1 | tail -1
      python3 -u bench/peers.py --out "$OUT" --marlin-dir .peers/marlin $args 2>&1 \
        | grep -v "Warning\|warn" | tail -${TAIL:-200} ;;
  esac
  echo "## step $name: $(( $(date +%s) - t0 )) s"
done
