#!/usr/bin/env bash
# GPTQ W4A16 of an 8B-shaped Llama on 1 GPU (plain), 2 GPUs (torchrun) and 1 GPU through torchrun
# (the distributed code path with one rank); compares the packed codes of the 1- and 2-GPU runs.
# Run on a machine with >= 2 GPUs:  bash bench/gptq_scaling.sh OUT_DIR [extra gptq_8b.py args]
# NVLink multicast stays off in every process (the lent machines require it).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
out=${1:?OUT_DIR}; shift
mkdir -p "$out"
run() { echo "## $1"; shift; "$@" 2>&1 | grep -v "Loading weights\|^W1\|^\s*$" | tail -8; }
run "1 GPU, plain" python3 bench/gptq_8b.py --json "$out/gpu1.json" --save-codes /tmp/codes1.st "$@"
run "2 GPUs, torchrun" python3 -m torch.distributed.run --nproc-per-node 2 bench/gptq_8b.py \
    --json "$out/gpu2.json" --save-codes /tmp/codes2.st "$@"
run "codes: 1 GPU vs 2 GPUs" python3 bench/compare_codes.py /tmp/codes1.st /tmp/codes2.st
run "1 GPU, torchrun (one rank)" python3 -m torch.distributed.run --nproc-per-node 1 bench/gptq_8b.py \
    --json "$out/gpu1_torchrun.json" "$@"
