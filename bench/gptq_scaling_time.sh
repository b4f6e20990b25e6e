#!/usr/bin/env bash
# Timing only: a warm-up run (Triton/cuBLAS caches), then GPTQ W4A16 of an 8B-shaped Llama plain on
# 1 GPU, through torchrun with one rank, and on 2 GPUs. bash bench/gptq_scaling_time.sh OUT_DIR
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
out=${1:?OUT_DIR}
mkdir -p "$out"
run() { echo "## $1"; shift; "$@" 2>&1 | grep -v "Loading weights\|^W1\|^\s*$\|^\*\*\*\|OMP_NUM_THREADS" | tail -3; }
tr() { python3 -m torch.distributed.run --nproc-per-node "$@"; }
run "warm-up (2 blocks, 2 ranks)" tr 2 bench/gptq_8b.py --layers 2 --samples 16
run "1 GPU, plain" python3 bench/gptq_8b.py --json "$out/t_gpu1.json"
run "1 GPU, torchrun (one rank)" tr 1 bench/gptq_8b.py --json "$out/t_gpu1_torchrun.json"
run "2 GPUs, torchrun" tr 2 bench/gptq_8b.py --json "$out/t_gpu2.json"
