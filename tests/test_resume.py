"""Resumable quantization: kill a real process mid-run, run again, get the identical checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import quantkit
from quantkit import resume

WORKER = os.path.join(os.path.dirname(__file__), "_resume_worker.py")
RECIPE = {"quantizer": {"type": "gptq", "act_order": True, "static_groups": True},
          "format": {"type": "int", "bits": 4, "group_size": 16, "sym": False},
          "calibration": {"batch_size": 2}}
# cheaper, still calibrated (MSE clipping weighs columns by activations): for the in-process test
RECIPE_MSE = {"quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": 16, "clip": "mse"},
              "calibration": {"batch_size": 2}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1)
    d = str(tmp_path_factory.mktemp("m") / "tiny")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def run_worker(model_dir, work, out, recipe=RECIPE, seed=1, env=None):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run([sys.executable, WORKER, model_dir, str(work), str(out), json.dumps(recipe), str(seed)],
                       capture_output=True, text=True, env=e, timeout=300)
    return p


def same_tensors(a, b):
    ta, tb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k
    ca = json.load(open(os.path.join(a, "config.json")))["quantization_config"]["layers"]
    cb = json.load(open(os.path.join(b, "config.json")))["quantization_config"]["layers"]
    assert ca == cb


def test_killed_run_resumes_bit_identical(model_dir, tmp_path):
    # the reference: one uninterrupted run, in this process with the worker's settings (1 thread)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = quantkit.quantize(model_dir, RECIPE, calibration=_ids(1), device="cpu", progress=False,
                                resume_dir=str(tmp_path / "w_ref"))
    finally:
        torch.set_num_threads(n)
    assert ref.meta["resume"]["resumed_from_block"] is None
    ref.save(str(tmp_path / "ref"))

    work, out = tmp_path / "w", tmp_path / "out"
    # 1) SIGKILL right after block 0 is committed (from the pipeline's on_block_done)
    p = run_worker(model_dir, work, out, env={"QK_KILL_AFTER_BLOCK": "0"})
    assert p.returncode == -9, p.stderr[-3000:]
    st = resume.read_state(str(work))
    assert st["next_block"] == 1 and not os.path.exists(out)
    # 2) resume; SIGKILL after block 1's files are written but before state.json commits them
    p = run_worker(model_dir, work, out, env={"QK_KILL_BEFORE_COMMIT": "1"})
    assert p.returncode == -9, p.stderr[-3000:]
    assert "resuming from block 1 of 3" in p.stderr
    assert resume.read_state(str(work))["next_block"] == 1  # block 1 never committed
    # 3) resume again and finish
    p = run_worker(model_dir, work, out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from block 1 of 3" in p.stderr
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["resumed_from_block"] == 1 and info["restart_reason"] is None
    same_tensors(str(tmp_path / "ref"), str(out))
    run = json.load(open(os.path.join(out, "quantkit_run.json")))["report"]
    assert [b["block"] for b in run["blocks"]] == [0, 1, 2]
    assert len(run["layers"]) == 3 * 7


def _ids(seed):
    return torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(seed))


def test_changed_inputs_start_afresh_and_say_why(model_dir, tmp_path, monkeypatch, capfd):
    work = str(tmp_path / "w")
    stop = {"after": 1}

    class Stop(Exception):
        pass

    commit = resume.ResumeObserver.on_block_done

    def stop_after(self, block, report, inputs, float_inputs=None):
        commit(self, block, report, inputs, float_inputs)
        if block.index == stop["after"]:
            raise Stop

    def run(recipe, seed):
        return quantkit.quantize(model_dir, recipe, calibration=_ids(seed), device="cpu", progress=False,
                                 resume_dir=work)

    def last_message():
        return [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("quantkit: ")][-1]

    monkeypatch.setattr(resume.ResumeObserver, "on_block_done", stop_after)
    with pytest.raises(Stop):
        run(RECIPE_MSE, 1)
    assert resume.read_state(work)["next_block"] == 2
    assert not os.path.exists(os.path.join(work, resume.LOCK_FILE))  # released on the way out
    # same inputs: resumes
    stop["after"] = 2
    with pytest.raises(Stop):
        run(RECIPE_MSE, 1)
    assert last_message().startswith("quantkit: resuming from block 2")
    monkeypatch.setattr(resume.ResumeObserver, "on_block_done", commit)
    # another recipe: afresh, and says the recipe changed
    r2 = json.loads(json.dumps(RECIPE_MSE))
    r2["format"]["group_size"] = 32
    qm = run(r2, 1)
    msg = last_message()
    assert "the recipe changed" in msg and "starting afresh" in msg
    assert qm.meta["resume"]["resumed_from_block"] is None
    # other calibration data: afresh, and says the data changed
    qm = run(r2, 2)
    msg = last_message()
    assert "calibration data changed" in msg
    assert "recipe" not in msg
    # a finished run resumes at the end: nothing is recomputed, the result is the same
    again = run(r2, 2)
    assert again.meta["resume"]["resumed_from_block"] == 3
    assert [b["block"] for b in again.report.blocks] == [0, 1, 2]  # the report of the run that did the work
    for (n, a), (_, b) in zip(qm.quantized_layers().items(), again.quantized_layers().items()):
        assert torch.equal(a.dequantized_weight(), b.dequantized_weight()), n
    # the report keeps every field across a resume (world_size, capture_seconds were dropped once)
    assert again.report.world_size == 1 and again.report.capture_seconds > 0
    again.clear_resume_state()
    assert resume.read_state(work) is None


def test_lock_refuses_a_live_owner(tmp_path):
    from quantkit.errors import QuantkitError

    d = str(tmp_path)
    with open(os.path.join(d, resume.LOCK_FILE), "w") as f:
        f.write(str(os.getppid()))  # a live process that is not us
    with pytest.raises(QuantkitError, match="in use"):
        with resume._Lock(d):
            pass
    with open(os.path.join(d, resume.LOCK_FILE), "w") as f:
        f.write("999999999")  # dead owner: taken over
    with resume._Lock(d):
        pass
    assert not os.path.exists(os.path.join(d, resume.LOCK_FILE))
