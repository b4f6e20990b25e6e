#!/usr/bin/env bash
# GPTQ W4A16 of an 8B-shaped Llama on 1 GPU (plain), 2 GPUs (torchrun) and 1 GPU through torchrun
# (the distributed code path with one rank); compares the packed codes of the 1- and 2-GPU runs,
# with the default float32 statistics (32 blocks) and with float64 sums (8 blocks, to save time).
# Run on a machine with >= 2 GPUs:  bash bench/gptq_scaling.sh OUT_DIR
# NVLink multicast stays off in every process (the lent machines require it).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
out=${1:?OUT_DIR}
mkdir -p "$out"
run() { echo "## $1"; shift; "$@" 2>&1 | grep -v "Loading weights\|^W1\|^\s*$\|^\*\*\*\|OMP_NUM_THREADS" | tail -6; }
tr() { python3 -m torch.distributed.run --nproc-per-node "$@"; }
run "1 GPU, plain" python3 bench/gptq_8b.py --json "$out/gpu1.json" --save-codes /tmp/c1.st
run "2 GPUs, torchrun" tr 2 bench/gptq_8b.py --json "$out/gpu2.json" --save-codes /tmp/c2.st
run "codes, float32 sums: 1 GPU vs 2 GPUs" python3 bench/compare_codes.py /tmp/c1.st /tmp/c2.st
rm -f /tmp/c1.st /tmp/c2.st
run "1 GPU, torchrun (one rank)" tr 1 bench/gptq_8b.py --json "$out/gpu1_torchrun.json"
run "1 GPU, plain, float64 sums, 8 blocks" python3 bench/gptq_8b.py --layers 8 --accumulate float64 \
    --json "$out/gpu1_f64.json" --save-codes /tmp/d1.st
run "2 GPUs, torchrun, float64 sums, 8 blocks" tr 2 bench/gptq_8b.py --layers 8 --accumulate float64 \
    --json "$out/gpu2_f64.json" --save-codes /tmp/d2.st
run "codes, float64 sums: 1 GPU vs 2 GPUs" python3 bench/compare_codes.py /tmp/d1.st /tmp/d2.st
