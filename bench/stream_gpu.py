"""GPU: GPTQ W4A16 of an 8B-shaped random checkpoint, streamed (quantkit.stream) against loaded whole:
wall time, peak CPU RSS (each run a fresh child, its own VmHWM) and peak GPU memory (the child's
``torch.cuda.max_memory_allocated``). The checkpoint (bf16, ~15 GiB, one shard per block) is written to
local disk first (random values generated on the GPU), and deleted at the end.

    python bench/stream_gpu.py                      # H200: about 5 minutes; table + $OUT/stream_gpu.json
    python bench/stream_gpu.py --smoke              # tiny, on CPU, seconds

All blocks are quantized (``--blocks N`` limits it), calibration 128 x 2048 random token ids as in
bench/gptq_8b.py. Random weights are fine for time and memory (the work does not depend on the values).
"""

from __future__ import annotations

import importlib.util
import os
import sys


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("stream_memory", os.path.join(here, "stream_memory.py"))
    sm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sm)
    argv = sys.argv[1:]
    out = os.environ.get("OUT") or "."
    if "--smoke" in argv:
        base = ["--smoke", "--kinds", "gptq", "--blocks", "4", "--dir", os.path.join("/tmp", "stream-gpu-smoke")]
        argv = [a for a in argv if a != "--smoke"]
    else:
        base = ["--shape", "8b", "--device", "cuda", "--dtype", "bfloat16", "--kinds", "gptq", "--blocks", "32",
                "--samples", "128", "--seq-len", "2048", "--batch-size", "8",
                "--dir", os.path.join(os.environ.get("TMPDIR", "/tmp"), "stream-gpu-8b")]
    sm.main(base + ["--json", os.path.join(out, "stream_gpu.json")] + argv)


if __name__ == "__main__":
    main()
