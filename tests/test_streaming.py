"""Streaming (issue 17): a sharded checkpoint quantized block by block from disk, written block by block,
gives the same packed tensors as the whole-model load; a resumed streamed run too."""

from __future__ import annotations

import os

import pytest
import torch
from _guards import same_checkpoint
from transformers import LlamaConfig, LlamaForCausalLM

import quantkit
from quantkit import resume, stream
from quantkit.errors import QuantkitError

GPTQ = {"quantizer": {"type": "gptq", "act_order": True, "static_groups": True},
        "format": {"type": "int", "bits": 4, "group_size": 16, "sym": False},
        "calibration": {"batch_size": 2}}
RTN = {"quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": 16}}  # data-free
RTN_MSE = {"quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": 16, "clip": "mse"},
           "calibration": {"batch_size": 2}}  # calibrated, cheap


def _save(d, tie: bool, shard: str | None, seed: int = 0) -> str:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie)
    m = LlamaForCausalLM(cfg)
    m.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
    return str(d)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):  # untied: lm_head in a shard other than the embeddings'
    return _save(tmp_path_factory.mktemp("m") / "sharded", tie=False, shard="20KB")


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("m") / "tied", tie=True, shard="20KB", seed=1)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("m") / "single", tie=False, shard=None, seed=2)


def _ids(seed=1):
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(seed))


def _run(src, recipe, out, load, **kw):
    return quantkit.quantize(src, recipe, calibration=_ids(), device="cpu", progress=False, load=load,
                             save_to=str(out), **kw)


def test_sharded_fixture_has_lm_head_apart(sharded):
    kf = stream.stored_key_files(sharded)
    assert len(set(kf.values())) >= 3
    assert kf["lm_head.weight"] != kf["model.embed_tokens.weight"]


@pytest.mark.parametrize("recipe", [RTN, GPTQ], ids=["rtn", "gptq"])
def test_streamed_equals_whole(sharded, tmp_path, recipe):
    qs = _run(sharded, recipe, tmp_path / "s", "stream")
    qw = _run(sharded, recipe, tmp_path / "w", "whole")
    assert qs.meta["load"] == {"load": "stream", "dtype": "float32"} and qw.meta["load"]["load"] == "whole"
    assert qs.streamed_to == str(tmp_path / "s") and qw.streamed_to is None
    assert os.path.exists(tmp_path / "s" / stream.INDEX_FILE)
    assert all(p.device.type == "meta" for p in qs.model.model.layers.parameters())  # blocks released
    same_checkpoint(tmp_path / "s", tmp_path / "w")
    # the streamed checkpoint loads and computes what the whole one does
    a, b = quantkit.load(str(tmp_path / "s")), quantkit.load(str(tmp_path / "w"))
    with torch.no_grad():
        assert torch.equal(a(_ids(3)).logits, b(_ids(3)).logits)
    with pytest.raises(QuantkitError, match="while it was quantized"):
        qs.save(str(tmp_path / "elsewhere"))


def test_streamed_without_save_to_matches_float_reference(sharded, tmp_path):
    # streamed load, saved at the end: same as whole; and a float reference shows quantization happened
    qs = quantkit.quantize(sharded, RTN_MSE, calibration=_ids(), device="cpu", progress=False)
    qs.save(str(tmp_path / "s"))
    _run(sharded, RTN_MSE, tmp_path / "w", "whole")
    same_checkpoint(tmp_path / "s", tmp_path / "w")
    ref = LlamaForCausalLM.from_pretrained(sharded).eval()
    with torch.no_grad():
        f, q = ref(_ids(3)).logits, qs(_ids(3)).logits
    err = ((q - f).norm() / f.norm()).item()
    assert 0 < err < 0.5, err


def test_tied_embeddings(tied, tmp_path):
    q = _run(tied, RTN_MSE, tmp_path / "s", "stream")
    assert q.meta["load"] == {"load": "stream", "dtype": "float32"}  # streamed, not fallen back to whole
    assert "lm_head.weight" not in stream.stored_key_files(tied)
    _run(tied, RTN_MSE, tmp_path / "w", "whole")
    same_checkpoint(tmp_path / "s", tmp_path / "w")
    back = quantkit.load(str(tmp_path / "s"))
    assert back.model.lm_head.weight.data_ptr() == back.model.model.embed_tokens.weight.data_ptr()


def test_single_file(single, tmp_path):
    assert _run(single, GPTQ, tmp_path / "s", "stream").meta["load"]["load"] == "stream"
    _run(single, GPTQ, tmp_path / "w", "whole")
    same_checkpoint(tmp_path / "s", tmp_path / "w")


def test_resumed_streamed_run_matches(sharded, tmp_path, monkeypatch):
    work = str(tmp_path / "work")
    out = tmp_path / "out"

    class Stop(Exception):
        pass

    def stop(bi):
        if bi == 2:
            raise Stop  # blocks 0 and 1 are committed, block 2's files are written but not committed

    monkeypatch.setattr(resume, "_before_commit", stop)
    with pytest.raises(Stop):
        _run(sharded, GPTQ, out, "stream", resume_dir=work)
    assert resume.read_state(work)["next_block"] == 2
    assert not os.path.exists(out)  # nothing half-written in place
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".out")]  # its temp folder is gone
    monkeypatch.setattr(resume, "_before_commit", None)
    q = _run(sharded, GPTQ, out, "stream", resume_dir=work)
    assert q.meta["resume"]["resumed_from_block"] == 2 and q.meta["load"]["load"] == "stream"
    # the output's block shards are the resume dir's block files (one copy on disk)
    shard0 = os.path.join(out, "model-00001-of-00005.safetensors")
    assert os.stat(shard0).st_ino == os.stat(os.path.join(work, "block-00000.safetensors")).st_ino
    q.clear_resume_state()
    assert os.path.exists(shard0)
    _run(sharded, GPTQ, tmp_path / "ref", "stream")
    same_checkpoint(out, tmp_path / "ref")


def test_bad_load_value(sharded):
    with pytest.raises(QuantkitError, match="load='sideways'"):
        quantkit.quantize(sharded, RTN, calibration=_ids(), device="cpu", progress=False, load="sideways")


def test_renamed_or_missing_tensors_fall_back_to_whole(tmp_path):
    d = _save(tmp_path / "m", tie=False, shard=None)
    from safetensors.torch import load_file, save_file

    fp = os.path.join(d, "model.safetensors")
    t = load_file(fp)
    t["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(t, fp, metadata={"format": "pt"})
    with pytest.raises(Exception, match="extra"):  # the whole load's integrity check names it
        quantkit.quantize(d, RTN, calibration=_ids(), device="cpu", progress=False)


def test_failure_mid_stream_keeps_the_old_output(sharded, tmp_path, monkeypatch):
    out = tmp_path / "o"
    _run(sharded, RTN, out, "stream")
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    calls, orig = [0], stream._save_shard

    def disk_full(fp, tensors):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(28, "No space left on device")
        orig(fp, tensors)

    monkeypatch.setattr(stream, "_save_shard", disk_full)
    with pytest.raises(Exception, match="No space left|space"):
        _run(sharded, GPTQ, out, "stream", overwrite=True)
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["o"]  # no temporary folder left
