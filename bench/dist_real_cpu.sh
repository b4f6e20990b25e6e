#!/usr/bin/env bash
# The real bundled model quantized with GPTQ W4A16 in one process and by 2 gloo ranks on CPU
# (torchrun, the CLI unchanged), then both evaluated on the same held-out text: does the
# distributed run give the same perplexity? bash bench/dist_real_cpu.sh OUT_DIR [SAMPLES]
set -eu
out=${1:?OUT_DIR}; n=${2:-32}
mkdir -p "$out"
rm -rf "$out/one" "$out/two"
args=(quantize smollm2-135m -r w4a16-gptq --samples "$n" --seq-len 512)
/usr/bin/time -f "one process: %e s" env OMP_NUM_THREADS=2 python -m quantkit.cli "${args[@]}" -o "$out/one" 2>&1 | grep -v "it/s\]" | tail -2
/usr/bin/time -f "2 gloo ranks: %e s" env OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc-per-node 2 \
    -m quantkit.cli "${args[@]}" -o "$out/two" 2>&1 | grep -v "it/s\]" | tail -2
python bench/compare_codes.py "$out/one/model.safetensors" "$out/two/model.safetensors"
OMP_NUM_THREADS=2 python -m quantkit.cli eval "$out/one" "$out/two" 2>&1 | grep -v "it/s\]" | tail -8
