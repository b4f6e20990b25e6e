"""Streaming (issue 17): the tensors outside the decoder blocks (embeddings, final norm, lm_head) leave
memory during a streamed block loop and are read back, bit for bit and tied as before, before
quantize returns."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import quantkit
from quantkit import stream

GPTQ = {"quantizer": {"type": "gptq", "act_order": True, "static_groups": True},
        "format": {"type": "int", "bits": 4, "group_size": 16, "sym": False},
        "calibration": {"batch_size": 2}}
RTN = {"quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": 16}}  # data-free
RTN_HEAD = {**RTN, "ignore": []}  # data-free, lm_head quantized too (after the block loop)
REST = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def _save(d, tie: bool) -> str:
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie)
    LlamaForCausalLM(cfg).save_pretrained(d, max_shard_size="20KB")
    return str(d)


def _ids(seed=1):
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(seed))


def _stored(d: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, fp in stream.stored_key_files(d).items():
        if not k.startswith("model.layers."):
            out[k] = load_file(fp)[k]
    return out


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("recipe", [RTN, GPTQ], ids=["rtn", "gptq"])
def test_rest_released_during_loop_and_read_back(tmp_path, monkeypatch, tie, recipe):
    d = _save(tmp_path / "m", tie)
    seen = []
    orig = stream.StreamSource.fetch

    def fetch(self, module):
        m = self.model
        seen.append({n: m.get_parameter(n).device.type for n in REST})
        return orig(self, module)

    monkeypatch.setattr(stream.StreamSource, "fetch", fetch)
    q = quantkit.quantize(d, recipe, calibration=_ids(), device="cpu", progress=False)  # no save_to: blocks kept
    assert q.meta["load"]["load"] == "stream"
    assert len(seen) == 3 and all(set(s.values()) == {"meta"} for s in seen), seen  # never in memory in the loop
    m = q.model
    assert not [n for n, t in list(m.named_parameters()) + list(m.named_buffers()) if t.device.type == "meta"]
    stored = _stored(d)
    assert torch.equal(m.model.embed_tokens.weight, stored["model.embed_tokens.weight"])
    assert torch.equal(m.model.norm.weight, stored["model.norm.weight"])
    if tie:
        assert m.lm_head.weight is m.model.embed_tokens.weight
    else:
        assert torch.equal(m.lm_head.weight, stored["lm_head.weight"])
        assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    # the model handed back computes what a whole load quantized the same way computes
    w = quantkit.quantize(d, recipe, calibration=_ids(), device="cpu", progress=False, load="whole")
    with torch.no_grad():
        assert torch.equal(q(_ids(3)).logits, w(_ids(3)).logits)


def test_lm_head_quantized_after_the_loop(tmp_path):
    # data-free with lm_head targeted: it is read back before it is quantized (outside the block loop)
    d = _save(tmp_path / "m", tie=False)
    q = quantkit.quantize(d, RTN_HEAD, calibration=_ids(), device="cpu", progress=False, save_to=str(tmp_path / "s"))
    w = quantkit.quantize(d, RTN_HEAD, calibration=_ids(), device="cpu", progress=False, load="whole",
                          save_to=str(tmp_path / "w"))
    assert "lm_head" in q.report.layers and "lm_head" in w.report.layers
    from _guards import same_checkpoint

    same_checkpoint(tmp_path / "s", tmp_path / "w", layers=3 * 7 + 1)


def test_release_and_restore_keep_ties(tmp_path):
    d = _save(tmp_path / "m", tie=True)
    src = stream.StreamSource(d, torch.float32)
    m = src.model
    before = m.model.embed_tokens.weight.detach().clone()
    src.release_rest()
    assert m.model.embed_tokens.weight.device.type == "meta" and m.lm_head.weight is m.model.embed_tokens.weight
    assert m.model.norm.weight.device.type == "meta"
    assert m.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # blocks untouched (not fetched)
    src.release_rest()  # twice: nothing more
    src.restore_rest()
    assert torch.equal(m.model.embed_tokens.weight, before) and m.lm_head.weight is m.model.embed_tokens.weight
    assert not src.rest_released
    src.restore_rest()  # not released: nothing read
    assert torch.equal(m.model.embed_tokens.weight, before)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-cast"])
def test_rest_shard_copied_from_the_shards(tmp_path, monkeypatch, tie, dtype):
    """The output's shard of the tensors outside the blocks is written from the source shards in pieces
    (read with pread, cast piece by piece), and holds what the model holds, as save_file would write it."""
    d = _save(tmp_path / "m", tie)
    copied = []
    orig = stream._shard_pieces

    def counting(fp, stored, dt, shape, *a):
        copied.append(stored)
        return orig(fp, stored, dt, shape, *a)
    monkeypatch.setattr(stream, "_shard_pieces", counting)
    monkeypatch.setattr(stream, "PIECE_BYTES", 16 * 1000)  # pieces of 1000 bytes: many per tensor
    q = quantkit.quantize(d, RTN, calibration=_ids(), device="cpu", progress=False, dtype=dtype,
                          save_to=str(tmp_path / "s"))
    want = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tie else {"lm_head.weight"})
    assert set(copied) == want
    from quantkit.checkpoint.io import safe_load_tensors

    got = safe_load_tensors(str(tmp_path / "s"))
    m = q.model
    for k in want:
        assert got[k].dtype == dtype and torch.equal(got[k], m.get_parameter(k).detach()), k
    stored = _stored(d)
    assert torch.equal(got["model.embed_tokens.weight"], stored["model.embed_tokens.weight"].to(dtype))
    # the same file as safetensors' own writer makes of the same tensors (tensor for tensor)
    from safetensors import safe_open

    rest = [f for f in sorted((tmp_path / "s").iterdir()) if f.name.endswith(".safetensors")][-1]
    with safe_open(str(rest), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt", "quantkit": "1"}
    assert want <= keys
    sd = {k: got[k] for k in keys}
    stream._save_shard(str(tmp_path / "ref.safetensors"), sd)
    ref = load_file(str(tmp_path / "ref.safetensors"))
    again = load_file(str(rest))
    assert ref.keys() == again.keys() and all(torch.equal(ref[k], again[k]) for k in ref)


def test_replaced_rest_tensor_written_from_memory(tmp_path):
    d = _save(tmp_path / "m", tie=False)
    src = stream.StreamSource(d, torch.float32)
    m = src.model
    m.model.norm.weight = torch.nn.Parameter(m.model.norm.weight.detach() * 2)  # not what the shard holds
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("model.layers.")}
    pieces = src.rest_pieces(sd)
    assert set(pieces) == {"model.embed_tokens.weight", "lm_head.weight"}
    stream._save_shard(str(tmp_path / "r.safetensors"), sd, pieces)
    back = load_file(str(tmp_path / "r.safetensors"))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    src.release_rest()
    assert src.rest_pieces(sd) == {}  # released: nothing to copy from
