#!/usr/bin/env bash
# Run HERE (the CPU machine, with PyPI and the fetched mirrors) before the device call of
# `bash bench/gpu_kernels.sh peers` (carry [".whl", ".peers"]). It fills two git-ignored folders:
#   .peers/marlin  IST-DASLab/marlin's source, from the mirror that the search tool's `fetch` brought
#                  (github:IST-DASLab/marlin), with the nvcc-13 patch below; built on the device.
#   .whl/          wheels the device lacks: gemlite (PyPI ships an sdist only: built into a
#                  py3-none-any wheel here), its import deps (tqdm; numpy 2.3.x, since the device's
#                  numpy 2.5 is too new for its Triton 3.6), and quantkit's (pydantic & co.).
# Fetched code is built and run beside the project for comparison only, never committed into it.
# Usage: bash bench/peers_prep.sh   (env: MARLIN_GIT_DIR, GEMLITE_VERSION, PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MARLIN_GIT_DIR=${MARLIN_GIT_DIR:-/work/.mirror/IST-DASLab+marlin/repo}
GEMLITE_VERSION=${GEMLITE_VERSION:-0.6.0.post2}

# ---- Marlin source ------------------------------------------------------------------------------
if ! git --git-dir="$MARLIN_GIT_DIR" rev-parse -q --verify HEAD >/dev/null; then
  echo "peers_prep: no Marlin mirror at $MARLIN_GIT_DIR: fetch github:IST-DASLab/marlin with the" \
       "search tool's fetch first (or set MARLIN_GIT_DIR to its git directory)" >&2
  exit 2
fi
rm -rf .peers/marlin.tmp && mkdir -p .peers/marlin.tmp
git --git-dir="$MARLIN_GIT_DIR" archive HEAD marlin setup.py LICENSE | tar -x -C .peers/marlin.tmp
git --git-dir="$MARLIN_GIT_DIR" rev-parse HEAD > .peers/marlin.tmp/COMMIT
# nvcc 13: cp_async4_stream's `createpolicy` + `cp.async...L2::cache_hint` form traps with an illegal
# instruction (IST-DASLab/marlin issue 44); use the plain cp.async.cg form (same data movement, no
# L2 eviction hint).
"$PY" - .peers/marlin.tmp/marlin/marlin_cuda_kernel.cu <<'EOF'
import re, sys
p = sys.argv[1]
src = open(p).read()
old = re.compile(r'"\{\\n"\s*"\s*\.reg \.b64 p;\\n"\s*"\s*createpolicy\.fractional\.L2::evict_first\.b64 p, 1\.0;"\s*'
                 r'"\s*cp\.async\.cg\.shared\.global\.L2::cache_hint \[%0\], \[%1\], %2, p;\\n"\s*"\}\\n"')
new = '"cp.async.cg.shared.global [%0], [%1], %2;\\n"'
src2, n = old.subn(lambda m: new, src)
if n != 1:
    sys.exit(f"peers_prep: the cp_async4_stream patch matched {n} times in {p} (expected 1): the "
             "Marlin source changed; patch it by hand (see /work/shared/ANCHORS.md)")
open(p + ".tmp", "w").write(src2)
import os; os.replace(p + ".tmp", p)
print("peers_prep: patched cp_async4_stream (no createpolicy / L2::cache_hint)")
EOF
rm -rf .peers/marlin && mv .peers/marlin.tmp .peers/marlin

# ---- wheels -------------------------------------------------------------------------------------
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps --only-binary :all: "${PLAT[@]}" --python-version 3.12 --implementation cp \
  -d .whl "numpy==2.3.5" "pydantic-core==2.50.5"
"$PY" -m pip download -q --no-deps --only-binary :all: -d .whl \
  "tqdm>=4.66,<5" "pydantic==2.14.4" annotated-types typing-inspection "typing-extensions==4.16.*"
rm -rf .whl/gemlite-*
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "gemlite==$GEMLITE_VERSION" \
  || "$PY" -m pip wheel -q --no-deps -w .whl "gemlite==$GEMLITE_VERSION"
ls .whl/gemlite-*-py3-none-any.whl >/dev/null
echo "peers_prep: marlin at $(cat .peers/marlin/COMMIT)"
ls -la .whl
du -sh .whl .peers
total=$(du -sbc .whl .peers | tail -1 | cut -f1)
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then
  echo "peers_prep: .whl + .peers hold $total bytes, over the 64 MiB carry limit with room to spare" >&2
  exit 2
fi
