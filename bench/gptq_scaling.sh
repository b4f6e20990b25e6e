#!/usr/bin/env bash
# GPTQ W4A16 of an 8B-shaped Llama on 1 GPU (plain), 2 GPUs (torchrun) and 1 GPU through torchrun
# (the distributed code path with one rank); compares the packed codes of the 1- and 2-GPU runs,
# with the default float32 statistics (32 blocks) and with float64 sums (8 blocks, to save time).
# Run on a machine with >= 2 GPUs:  bash bench/gptq_scaling.sh OUT_DIR
# NVLink multicast stays off in every process (the lent machines require it).
set -u
source "$(dirname "$0")/_gpu_env.sh"
out=${1:?OUT_DIR}
mkdir -p "$out"
run "1 GPU, plain" python3 bench/gptq_8b.py --json "$out/gpu1.json" --save-codes /tmp/c1.st
run "2 GPUs, torchrun" trun 2 bench/gptq_8b.py --json "$out/gpu2.json" --save-codes /tmp/c2.st
run "codes, float32 sums: 1 GPU vs 2 GPUs" python3 bench/compare_codes.py /tmp/c1.st /tmp/c2.st
rm -f /tmp/c1.st /tmp/c2.st
run "1 GPU, torchrun (one rank)" trun 1 bench/gptq_8b.py --json "$out/gpu1_torchrun.json"
run "1 GPU, plain, float64 sums, 8 blocks" python3 bench/gptq_8b.py --layers 8 --accumulate float64 \
    --json "$out/gpu1_f64.json" --save-codes /tmp/d1.st
run "2 GPUs, torchrun, float64 sums, 8 blocks" trun 2 bench/gptq_8b.py --layers 8 --accumulate float64 \
    --json "$out/gpu2_f64.json" --save-codes /tmp/d2.st
run "codes, float64 sums: 1 GPU vs 2 GPUs" python3 bench/compare_codes.py /tmp/d1.st /tmp/d2.st
