#!/usr/bin/env bash
# bench/moe_quality.py --preset gpu on the lent GPU machine (a larger tiny MoE, trained longer than the CPU
# preset can afford). Two steps:
#   on the CPU machine:  bash bench/moe_quality_gpu.sh prep
#       fills runs/moe_gpu/ (git-ignored, ~30 MB): gensim's wheel for Python 3.12 (the enwiki text lives in it)
#       and SmolLM2's tokenizer files from quantkit's cache. The pydantic wheels the device lacks come from
#       bench/peers_prep.sh's .whl/ (docs/PERFORMANCE.md).
#   on the GPU machine:  bash bench/moe_quality_gpu.sh      (carry [".whl", "runs/moe_gpu"])
#       writes $OUT/moe_gpu.json and $OUT/moe.md (docs/quality/moe.md with the gpu table added): copy
#       both into docs/quality/. Expected: training 1-3 min, the 10 rows 2-4 min (estimates: not run on a GPU yet).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prep ]; then
  PY=${PY:-python3}
  mkdir -p runs/moe_gpu/whl runs/moe_gpu/tokenizer
  "$PY" -m pip download -q --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d runs/moe_gpu/whl gensim==4.4.0
  "$PY" - <<'EOF'
import shutil
from quantkit.models.sources import resolve_model_dir
src = resolve_model_dir("smollm2-135m")
for f in ("tokenizer.json", "tokenizer_config.json", "quantkit_source.json"):
    shutil.copy2(f"{src}/{f}", f"runs/moe_gpu/tokenizer/{f}")
EOF
  du -sh runs/moe_gpu .whl 2>/dev/null
  exit 0
fi
source bench/_gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl runs/moe_gpu/whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name --format=csv,noheader
cp docs/quality/moe.md "$OUT/moe.md"
python3 -u bench/moe_quality.py --preset gpu --device cuda --tokenizer runs/moe_gpu/tokenizer \
  --out /tmp/moe_quality --json "$OUT/moe_gpu.json" --md "$OUT/moe.md" 2>&1 | grep -v "Loading weights\|Writing model\|Warning\|warn"
