"""Helper process for tests/test_distributed.py: quantize a saved tiny model, under a launcher or not.

    python _dist_worker.py MODEL_DIR OUT_DIR RECIPE_JSON [RESUME_DIR]

Started by torchrun (or with RANK/WORLD_SIZE/MASTER_* set by the test) it runs distributed through
``quantkit.quantize`` unchanged; without them, in one process. Writes OUT_DIR (rank 0) and
OUT_DIR.stats.safetensors: every linear's calibration statistics as the solves saw them.
Env: QK_DIE_AT_BLOCK=k   rank 1 exits (os._exit) when block k's solves start;
     QK_FAIL_SOLVE=name  rank 1 raises a NumericalError while solving layer ``name``.
"""

import json
import os
import sys

import torch

import quantkit
from quantkit import pipeline, solve
from quantkit.errors import NumericalError, QuantkitError


def main() -> int:
    model_dir, out_dir, recipe_json = sys.argv[1:4]
    resume_dir = sys.argv[4] if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    ids = torch.randint(0, 256, (12, 32), generator=torch.Generator().manual_seed(3))
    stats: dict[str, torch.Tensor] = {}
    finish = pipeline._StatsCollector.finish

    def recording_finish(self):
        finish(self)
        for n, s in self.stats.items():
            stats[f"{n}.nsamples"] = torch.tensor([s.nsamples])
            stats[f"{n}.absmax"] = s.act_absmax.clone()
            stats[f"{n}.sum"] = (s.hessian if s.hessian is not None else s.act_sqsum).clone()
    pipeline._StatsCollector.finish = recording_finish

    die = os.environ.get("QK_DIE_AT_BLOCK")
    fail = os.environ.get("QK_FAIL_SOLVE")
    solve_linear = solve.solve_linear

    def patched(name, mod, scheme, st, seed=0, **kw):
        if die is not None and rank == 1 and seed == int(die):
            os._exit(17)
        if fail is not None and rank == 1 and name == fail:
            raise NumericalError(f"{name}: injected failure")
        return solve_linear(name, mod, scheme, st, seed, **kw)
    solve.solve_linear = patched
    try:
        qm = quantkit.quantize(model_dir, json.loads(recipe_json), calibration=ids, device="cpu", progress=False,
                               resume_dir=resume_dir)
        qm.save(out_dir, overwrite=True)
    except QuantkitError as e:
        print(f"quantkit: error: {e}", file=sys.stderr, flush=True)
        from quantkit.api import exit_if_distributed

        exit_if_distributed(2)  # as the CLI does
        return 2
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in stats.items()}, out_dir + ".stats.safetensors")
        print(json.dumps({"world": qm.report.world_size, "layers": {k: v.get("row_ranges", 1)
                                                                    for k, v in qm.report.layers.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
