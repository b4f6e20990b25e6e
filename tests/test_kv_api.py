"""A recipe's kv_cache section is measured at quantize time, saved in the config and re-attached on load."""

import json
import os

import torch

import quantkit

from conftest import tiny_model


def test_kv_allocation_saved_and_reattached(tmp_path, calib_ids):
    recipe = {"name": "kv", "quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": 16},
              "kv_cache": {"bits": "k4v2", "residual": 4, "key_group_size": 4, "value_group_size": 16}}
    qm = quantkit.quantize(tiny_model("llama"), recipe, calibration=calib_ids, device="cpu", progress=False)
    assert "kv_cache" in qm.meta
    qm.save(tmp_path / "ck")
    cfg = json.load(open(os.path.join(tmp_path, "ck", "config.json")))
    assert cfg["quantization_config"]["kv_cache"] == json.loads(json.dumps(qm.meta["kv_cache"]))
    back = quantkit.load(str(tmp_path / "ck"))
    ids = calib_ids[:1, :8]
    with torch.no_grad():
        a = qm.model.generate(ids, max_new_tokens=6, do_sample=False)
        b = back.model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
