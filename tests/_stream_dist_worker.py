"""Helper process for tests/test_stream_dist.py: quantize a sharded model folder streamed, under torchrun or not.

    python _stream_dist_worker.py MODEL_DIR OUT_PREFIX DIST_READ NAME=RECIPE_JSON [NAME=RECIPE_JSON ...]

Each recipe is quantized with ``quantkit.quantize(MODEL_DIR, ..., save_to=OUT_PREFIX + NAME, dist_read=DIST_READ)``
(streamed in, written block by block). Rank 0 prints one JSON line: {NAME: meta["load"]}.
Env: QK_PIECE_BYTES=n       quantkit.stream.PIECE_BYTES (small: every tensor is sent in several pieces);
     QK_BREAK_READ_BLOCK=k  rank 0's read of block k raises (a corrupt shard met mid-run).
"""

import json
import os
import sys

import torch

import quantkit
from quantkit import stream
from quantkit.errors import CheckpointError, QuantkitError


def main() -> int:
    model_dir, out, dist_read = sys.argv[1:4]
    recipes = dict(a.split("=", 1) for a in sys.argv[4:])
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get("QK_PIECE_BYTES"):
        stream.PIECE_BYTES = int(os.environ["QK_PIECE_BYTES"])
    brk = os.environ.get("QK_BREAK_READ_BLOCK")
    if brk is not None:
        read = stream.read_tensors

        def broken(files, dtype, strip=""):
            if any(k.startswith(f"model.layers.{brk}.") for ks in files.values() for k in ks):
                raise CheckpointError(f"{next(iter(files))}: injected corrupt shard")
            return read(files, dtype, strip)
        stream.read_tensors = broken
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(3))
    got = {}
    try:
        for name, rec in recipes.items():
            qm = quantkit.quantize(model_dir, json.loads(rec), calibration=ids, device="cpu", progress=False,
                                   save_to=out + name, overwrite=True, dist_read=dist_read)
            got[name] = qm.meta["load"]
    except QuantkitError as e:
        print(f"quantkit: error: {e}", file=sys.stderr, flush=True)
        from quantkit.api import exit_if_distributed

        exit_if_distributed(2)
        return 2
    if rank == 0:
        print(json.dumps(got))
    return 0


if __name__ == "__main__":
    sys.exit(main())
