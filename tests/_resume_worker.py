"""Helper process for tests/test_resume.py: quantize a saved tiny model resumably, optionally dying.

    python _resume_worker.py MODEL_DIR WORK_DIR OUT_DIR RECIPE_JSON DATA_SEED

Env: QK_KILL_AFTER_BLOCK=k   SIGKILL itself right after block k is committed (the observer's on_block_done);
     QK_KILL_BEFORE_COMMIT=k SIGKILL itself after block k's files are written, before state.json commits.
Prints one JSON line with meta["resume"] on success.
"""

import json
import os
import signal
import sys

import torch

import quantkit
import quantkit.resume as resume


def main() -> None:
    model_dir, work_dir, out_dir, recipe_json, data_seed = sys.argv[1:6]
    torch.set_num_threads(1)
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(int(data_seed)))
    kill_after = os.environ.get("QK_KILL_AFTER_BLOCK")
    kill_commit = os.environ.get("QK_KILL_BEFORE_COMMIT")

    commit = resume.ResumeObserver.on_block_done

    def on_block_done(self, block, report, inputs, float_inputs=None):
        commit(self, block, report, inputs, float_inputs)
        if kill_after is not None and block.index == int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)
    resume.ResumeObserver.on_block_done = on_block_done

    if kill_commit is not None:
        def hook(bi):
            if bi == int(kill_commit):
                os.kill(os.getpid(), signal.SIGKILL)
        resume._before_commit = hook
    qm = quantkit.quantize(model_dir, json.loads(recipe_json), calibration=ids, device="cpu", progress=False,
                           resume_dir=work_dir)
    qm.save(out_dir, overwrite=True)
    print(json.dumps(qm.meta["resume"]))


if __name__ == "__main__":
    main()
