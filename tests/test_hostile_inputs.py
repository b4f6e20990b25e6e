"""Hostile and broken inputs: each gives one clear QuantkitError and never a half-written output.

(Some of these found bugs in the loader, the int format and the atomic writer; the fixes are merged.)
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import quantkit
from quantkit.errors import CheckpointError, ModelSourceError, NumericalError, QuantkitError

CFG = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1)
RTN = {"quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": 16}}
Q = "model.layers.0.self_attn.q_proj"
LAYOUTS = ["native", "compressed-tensors", "gptq"]


def tiny(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CFG)).eval()


@pytest.fixture(scope="module")
def qm():
    return quantkit.quantize(tiny(), RTN, calibration=torch.randint(0, 256, (2, 16)), device="cpu", progress=False)


@pytest.fixture(scope="module")
def ckpts(qm, tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    out = {}
    for lay in LAYOUTS:
        out[lay] = str(root / lay)
        qm.save(out[lay], layout=lay)
    return out


def variant(src, tmp_path, mutate=None, name="v"):
    d = str(tmp_path / name)
    shutil.copytree(src, d)
    if mutate is not None:
        mutate(d)
    return d


def edit_config(d, fn):
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    fn(cfg)
    json.dump(cfg, open(p, "w"))


def edit_tensors(d, fn):
    p = os.path.join(d, "model.safetensors")
    t = load_file(p)
    fn(t)
    save_file(t, p)


def raw(d):
    return open(os.path.join(d, "model.safetensors"), "rb").read()


def put(d, data):
    open(os.path.join(d, "model.safetensors"), "wb").write(data)


def header(data):
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def with_header(data, h):
    n, _ = header(data)
    hb = json.dumps(h).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return struct.pack("<Q", len(hb)) + hb + data[8 + n:]


# ---- corrupt files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("how", ["truncated-half", "truncated-4-bytes", "garbage-header", "header-lies-offsets",
                                 "header-huge-length", "header-wrong-dtype", "header-shape-lies"])
def test_corrupt_safetensors(ckpts, tmp_path, layout, how):
    def mutate(d):
        data = raw(d)
        if how == "truncated-half":
            put(d, data[: len(data) // 2])
        elif how == "truncated-4-bytes":
            put(d, data[:4])
        elif how == "garbage-header":
            put(d, data[:8] + b"\xff" * 64 + data[72:])
        elif how == "header-huge-length":
            put(d, struct.pack("<Q", 2 ** 62) + data[8:])
        else:
            _, h = header(data)
            k = next(k for k in h if k.endswith(".scales") or k.endswith(".weight_scale"))
            if how == "header-lies-offsets":
                h[k]["data_offsets"][1] += 10 ** 9
            elif how == "header-wrong-dtype":
                h[k]["dtype"] = "F64"
            else:
                h[k]["shape"] = [h[k]["shape"][0] * 1000] + h[k]["shape"][1:]
            put(d, with_header(data, h))
    with pytest.raises(CheckpointError, match="model.safetensors|header|truncated|corrupt"):
        quantkit.load(variant(ckpts[layout], tmp_path, mutate))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_wrong_tensor_dtype(ckpts, tmp_path, layout):
    key = {"native": f"{Q}.qweight", "compressed-tensors": f"{Q}.weight_packed", "gptq": f"{Q}.qweight"}[layout]

    def mutate(d):
        edit_tensors(d, lambda t: t.__setitem__(key, t[key].to(torch.int16)))
    with pytest.raises(CheckpointError, match=r"q_proj.*(dtype|qweight|weight_packed)"):
        quantkit.load(variant(ckpts[layout], tmp_path, mutate))


@pytest.mark.parametrize("layout,edit", [
    ("native", lambda c: c["quantization_config"]["layers"][Q]["format"].__setitem__("bits", 3)),
    ("native", lambda c: c["quantization_config"]["layers"][Q]["format"].__setitem__("group_size", 8)),
    ("native", lambda c: c.__setitem__("hidden_size", 48)),
    ("compressed-tensors", lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"]
     .__setitem__("num_bits", 8)),
    ("compressed-tensors", lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"]
     .__setitem__("symmetric", True)),
    ("compressed-tensors", lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"]
     .__setitem__("group_size", 32)),
    ("gptq", lambda c: c["quantization_config"].__setitem__("bits", 2)),
    ("gptq", lambda c: c.__setitem__("intermediate_size", 96)),
], ids=["n-bits", "n-group", "n-hidden", "ct-bits", "ct-sym", "ct-group", "g-bits", "g-inter"])
def test_config_does_not_match_tensors(ckpts, tmp_path, layout, edit):
    d = variant(ckpts[layout], tmp_path, lambda d: edit_config(d, edit))
    with pytest.raises(CheckpointError):
        quantkit.load(d)


def test_gptq_group_size_mismatch_without_g_idx(ckpts, tmp_path):
    def mutate(d):
        edit_config(d, lambda c: c["quantization_config"].__setitem__("group_size", 8))
        edit_tensors(d, lambda t: [t.pop(k) for k in list(t) if k.endswith(".g_idx")])
    with pytest.raises(CheckpointError, match="groups"):
        quantkit.load(variant(ckpts["gptq"], tmp_path, mutate))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_missing_tensor_and_extra_tensor(ckpts, tmp_path, layout):
    key = {"native": f"{Q}.scales", "compressed-tensors": f"{Q}.weight_scale", "gptq": f"{Q}.scales"}[layout]
    d = variant(ckpts[layout], tmp_path, lambda d: edit_tensors(d, lambda t: t.pop(key)), "missing")
    with pytest.raises(CheckpointError, match="q_proj|scale"):
        quantkit.load(d)
    d = variant(ckpts[layout], tmp_path,
                lambda d: edit_tensors(d, lambda t: t.__setitem__("model.evil", torch.ones(2))), "extra")
    with pytest.raises(CheckpointError, match="model.evil"):
        quantkit.load(d)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_config_lies_about_layer_count(ckpts, tmp_path, layout):
    d = variant(ckpts[layout], tmp_path, lambda d: edit_config(d, lambda c: c.__setitem__("num_hidden_layers", 3)))
    with pytest.raises(CheckpointError):
        quantkit.load(d)


@pytest.mark.parametrize("layout", ["compressed-tensors", "gptq"])
@pytest.mark.parametrize("value", [None, "x", -1, 0, [1], {"a": 1}, 10 ** 12])
def test_config_type_confusion_external_layouts(qm, ckpts, tmp_path, layout, value):
    """A config value of the wrong type either fails with a QuantkitError that names the checkpoint, or
    (where the loader may read it, e.g. ignore: null, group_size with a stored g_idx) loads a model that
    computes exactly what the saved one did: never another exception, never a silently different model."""
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = qm(ids).logits
    keys = {"compressed-tensors": [("quantization_config", "config_groups"), ("quantization_config", "ignore"),
                                   ("quantization_config", "config_groups", "group_0", "weights", "num_bits"),
                                   ("quantization_config", "config_groups", "group_0", "targets"),
                                   ("quantization_config", "config_groups", "group_0", "weights", "strategy"),
                                   ("num_attention_heads",), ("num_hidden_layers",)],
            "gptq": [("quantization_config", "bits"), ("quantization_config", "group_size"),
                     ("quantization_config", "sym"), ("quantization_config", "checkpoint_format"),
                     ("num_attention_heads",), ("num_hidden_layers",), ("hidden_size",)]}[layout]
    for i, path in enumerate(keys):
        def edit(c, path=path):
            node = c
            for p in path[:-1]:
                node = node[p]
            node[path[-1]] = value
        d = variant(ckpts[layout], tmp_path, lambda d: edit_config(d, edit), f"v{i}")
        try:
            back = quantkit.load(d)
        except QuantkitError as e:
            assert d in str(e), f"{path} = {value!r}: the error does not name the checkpoint: {e}"
            continue
        with torch.no_grad():
            assert torch.equal(back(ids).logits, ref), f"{path} = {value!r} loaded a different model"


# lead-owned native loader: the same type confusions end in TypeError / AttributeError / ZeroDivisionError
@pytest.mark.parametrize("edit", [
    lambda c: c["quantization_config"]["layers"].__setitem__(Q, None),
    lambda c: c["quantization_config"]["layers"][Q].__setitem__("shape", [32, "x"]),
    lambda c: c["quantization_config"]["layers"][Q].__setitem__("transforms", [5]),
    lambda c: c.__setitem__("num_attention_heads", "x"),
    lambda c: c.__setitem__("num_attention_heads", 0),
], ids=["spec-null", "shape-str", "transform-int", "heads-str", "heads-zero"])
def test_native_config_type_confusion(ckpts, tmp_path, edit):
    d = variant(ckpts["native"], tmp_path, lambda d: edit_config(d, edit))
    with pytest.raises(QuantkitError):
        quantkit.load(d)


def test_native_sym_spec_with_stored_zeros(ckpts, tmp_path):
    d = variant(ckpts["native"], tmp_path, lambda d: edit_config(
        d, lambda c: c["quantization_config"]["layers"][Q]["format"].__setitem__("sym", True)))
    with pytest.raises(CheckpointError, match="zeros"):
        quantkit.load(d)


def test_native_nan_scale_in_checkpoint(ckpts, tmp_path):
    def nan(t):
        t[f"{Q}.scales"][0, 0] = float("nan")
    d = variant(ckpts["native"], tmp_path, lambda d: edit_tensors(d, nan))
    with pytest.raises(CheckpointError, match="scales"):
        quantkit.load(d)


# ---- numbers a quantizer cannot work with -------------------------------------------------------------------
def test_nan_in_weights_refused():
    m = tiny()
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(NumericalError, match="layers.1.mlp.up_proj.*NaN"):
        quantkit.quantize(m, RTN, calibration=torch.randint(0, 256, (2, 16)), device="cpu", progress=False)
    m = tiny()
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight[0, 0] = float("inf")
    with pytest.raises(NumericalError, match="NaN/inf"):
        quantkit.quantize(m, {"quantizer": "gptq", "format": RTN["format"]}, calibration=torch.randint(0, 256, (2, 16)),
                          device="cpu", progress=False)


def test_nan_in_calibration_activations_refused():
    m = tiny()
    with torch.no_grad():
        m.model.embed_tokens.weight[7] = float("inf")  # every calibration token is 7
    with pytest.raises(NumericalError, match="calibration activations.*NaN/inf"):
        quantkit.quantize(m, {"quantizer": "gptq", "format": RTN["format"]}, calibration=torch.full((2, 16), 7),
                          device="cpu", progress=False)


def test_hessian_not_positive_definite():
    from quantkit.formats.base import format_from_spec
    from quantkit.quantizers.base import LayerStats, quantizer_from_spec

    q = quantizer_from_spec({"type": "gptq", "damp_retries": 1})
    fmt = format_from_spec(RTN["format"])
    h = -10 * torch.eye(16)  # negative definite: no dampening that fits the retries makes it PD
    with pytest.raises(NumericalError, match="not positive definite"):
        q.quantize(torch.randn(8, 16), fmt, LayerStats(10, h, None, torch.ones(16)))
    h = torch.full((16, 16), float("nan"))
    with pytest.raises(NumericalError, match="NaN"):
        q.quantize(torch.randn(8, 16), fmt, LayerStats(10, h, None, torch.ones(16)))


def test_unsupported_architecture():
    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.config = LlamaConfig(**CFG)

    with pytest.raises(ModelSourceError, match="not supported"):
        quantkit.quantize(NoBlocks(), {"quantizer": "gptq"}, calibration=torch.randint(0, 256, (2, 16)), device="cpu",
                          progress=False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unknown_model_type(ckpts, tmp_path, layout):
    d = variant(ckpts[layout], tmp_path, lambda d: edit_config(d, lambda c: c.__setitem__("model_type", "nonesuch")))
    with pytest.raises(CheckpointError, match="nonesuch"):
        quantkit.load(d)


# ---- disk full mid-write: the previous checkpoint stays, nothing half-written remains ---------------------------
def _fill_disk(monkeypatch):
    import safetensors.torch as stt

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(stt, "save_file", full)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_disk_full_keeps_previous_checkpoint(qm, tmp_path, monkeypatch, layout):
    out = str(tmp_path / "ck")
    qm.save(out, layout=layout)
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    _fill_disk(monkeypatch)
    with pytest.raises((OSError, QuantkitError)):
        qm.save(out, layout=layout, overwrite=True)
    monkeypatch.undo()
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary folder left behind
    quantkit.load(out)  # still loads


def test_disk_full_is_a_quantkit_error(qm, tmp_path, monkeypatch):
    _fill_disk(monkeypatch)
    with pytest.raises(CheckpointError, match="No space left"):
        qm.save(str(tmp_path / "new"))


# ---- nothing ever unpickles ------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_bin(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Evil(marker)}, f)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pickle_next_to_checkpoint_is_ignored(ckpts, tmp_path, layout):
    marker = str(tmp_path / "PWNED")
    d = variant(ckpts[layout], tmp_path, lambda d: _evil_bin(os.path.join(d, "pytorch_model.bin"), marker))
    quantkit.load(d)
    assert not os.path.exists(marker)
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        quantkit.load(d)
    assert not os.path.exists(marker)


def test_float_model_folder_with_only_pickle_is_refused(tmp_path):
    d = str(tmp_path / "float")
    tiny().save_pretrained(d)
    os.remove(os.path.join(d, "model.safetensors"))
    marker = str(tmp_path / "PWNED")
    _evil_bin(os.path.join(d, "pytorch_model.bin"), marker)
    import transformers.modeling_utils as mu

    calls = []
    real = torch.load

    def spy(*a, **k):
        calls.append(a)
        return real(*a, **k)
    mu.torch.load = spy  # record any attempt to unpickle (even torch's restricted unpickler)
    try:
        with pytest.raises(ModelSourceError):
            quantkit.models.load_float_model(d)
    finally:
        mu.torch.load = real
    assert not os.path.exists(marker)
    assert not calls, "the pickle file was handed to torch.load"
