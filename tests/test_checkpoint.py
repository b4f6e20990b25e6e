"""Native checkpoint: exact reload, atomic writes, clear errors, no pickle."""

import json
import os

import pytest
import torch

import quantkit
from quantkit.errors import CheckpointError

from conftest import tiny_model

RECIPE = {"quantizer": "gptq", "format": {"type": "int", "bits": 4, "group_size": 16}}


@pytest.fixture
def saved(tmp_path, calib_ids):
    qm = quantkit.quantize(tiny_model("llama"), RECIPE, calibration=calib_ids, device="cpu", progress=False)
    path = tmp_path / "ck"
    qm.save(path)
    return qm, str(path)


def test_reload_equals_in_memory(saved, calib_ids):
    qm, path = saved
    back = quantkit.load(path)
    with torch.no_grad():
        assert torch.equal(qm(calib_ids).logits, back(calib_ids).logits)
    assert back.bits_per_weight() == pytest.approx(qm.bits_per_weight())
    cfg = json.load(open(os.path.join(path, "config.json")))
    layer = cfg["quantization_config"]["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["format"]["bits"] == 4 and layer["quantizer"]["type"] == "gptq"
    assert os.path.exists(os.path.join(path, "quantkit_run.json"))


def test_existing_output_never_overwritten_without_flag(saved):
    qm, path = saved
    before = open(os.path.join(path, "model.safetensors"), "rb").read()
    with pytest.raises(CheckpointError, match="already exists"):
        qm.save(path)
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == before


def test_failed_save_leaves_old_checkpoint_and_no_temp(saved, monkeypatch):
    qm, path = saved
    before = sorted(os.listdir(path))
    import quantkit.checkpoint.native as native

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(CheckpointError, match="disk is full.*intact"):
        qm.save(path, overwrite=True)
    assert sorted(os.listdir(path)) == before
    parent = os.path.dirname(path)
    assert [f for f in os.listdir(parent) if f.startswith(".ck")] == []
    del native


def test_overwrite_replaces_atomically(saved, calib_ids):
    qm, path = saved
    qm.save(path, overwrite=True)
    assert quantkit.load(path) is not None


def test_missing_and_corrupt_files(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        quantkit.load(str(tmp_path / "nope"))
    st = os.path.join(path, "model.safetensors")
    data = open(st, "rb").read()
    open(st, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        quantkit.load(path)
    open(st, "wb").write(b"\x00" * 4)
    with pytest.raises(CheckpointError, match="truncated"):
        quantkit.load(path)
    os.remove(st)
    torch.save({"x": torch.zeros(1)}, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        quantkit.load(path)


def test_config_that_does_not_match_tensors(saved):
    _, path = saved
    cfgp = os.path.join(path, "config.json")
    cfg = json.load(open(cfgp))
    cfg["quantization_config"]["layers"]["model.layers.0.self_attn.q_proj"]["format"]["group_size"] = 32
    json.dump(cfg, open(cfgp, "w"))
    with pytest.raises(CheckpointError, match="scales"):
        quantkit.load(path)
    cfg["quantization_config"]["layers"]["model.layers.0.self_attn.q_proj"]["format"]["group_size"] = 16
    cfg["quantization_config"]["layers"]["model.layers.9.self_attn.q_proj"] = \
        cfg["quantization_config"]["layers"]["model.layers.0.self_attn.q_proj"]
    json.dump(cfg, open(cfgp, "w"))
    with pytest.raises(CheckpointError, match="does not exist"):
        quantkit.load(path)


def test_broken_config_json(saved):
    _, path = saved
    open(os.path.join(path, "config.json"), "w").write("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        quantkit.load(path)


def test_float_folder_is_not_a_quantized_checkpoint(tmp_path):
    m = tiny_model("llama")
    m.save_pretrained(tmp_path / "f")
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        quantkit.load(str(tmp_path / "f"))
