#!/usr/bin/env bash
# Timing: GPTQ W4A16 of an 8B-shaped Llama, plain on 1 GPU and on 2 GPUs through torchrun
# (bash bench/gptq_scaling_time.sh OUT_DIR [--with-one-rank]). First, on 2 blocks, the block
# prefetch/offload streams are checked against plain copies (codes must be identical); that run also
# fills Triton's kernel cache, so no timed run pays the one-off compile.
set -u
TAIL=3
source "$(dirname "$0")/_gpu_env.sh"
out=${1:?OUT_DIR}
mkdir -p "$out"
run "2 blocks, plain copies" env QUANTKIT_PREFETCH=0 python3 bench/gptq_8b.py --layers 2 --save-codes /tmp/p0.st
run "2 blocks, prefetch/offload streams" python3 bench/gptq_8b.py --layers 2 --save-codes /tmp/p1.st
run "codes: plain copies vs streams" python3 bench/compare_codes.py /tmp/p0.st /tmp/p1.st
run "1 GPU, plain" python3 bench/gptq_8b.py --json "$out/t_gpu1.json"
if [ "${2:-}" = "--with-one-rank" ]; then
  run "1 GPU, torchrun (one rank)" trun 1 bench/gptq_8b.py --json "$out/t_gpu1_torchrun.json"
fi
run "2 GPUs, torchrun" trun 2 bench/gptq_8b.py --json "$out/t_gpu2.json"
