# Sourced by the GPU benchmark scripts: NVLink multicast stays off in every process (the lent
# machines require it), unbuffered Python, and two helpers: run TITLE CMD... (prints the tail of
# CMD's output under a heading) and trun N ARGS... (torchrun with N processes).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
run() { local title=$1; shift; echo "## $title"; "$@" 2>&1 | grep -v "Loading weights\|^W1\|^\s*$\|^\*\*\*\|OMP_NUM_THREADS" | tail -"${TAIL:-6}"; }
trun() { python3 -m torch.distributed.run --nproc-per-node "$@"; }
