"""A user's own calibration data: the file formats (.txt, .jsonl, .json, .safetensors token ids), every bad
file as one clear error, windows drawn with the seed as from the bundled corpus, and the CLI end to end
(``--calibration-data``: the windows come from the file, the run records it; a bad file fails before any
work and leaves the output folder untouched)."""

from __future__ import annotations

import json

import pytest
import torch
from _guards import CALIB, cli, fails_with, fingerprint, make_tiny_smol, needs_data, no_work_started
from safetensors.torch import save_file

from quantkit.data import read_calibration_file, sample_windows
from quantkit.errors import DataError, RecipeError

TEXT = "The quick brown fox jumps over the lazy dog. " * 200


def test_formats(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    assert read_calibration_file(str(tmp_path / "a.txt")) == [TEXT]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps("two") + "\n")
    assert read_calibration_file(str(tmp_path / "b.jsonl")) == ["one", "two"]
    (tmp_path / "c.json").write_text(json.dumps([{"body": "x y"}, {"body": "z"}]))
    assert read_calibration_file(str(tmp_path / "c.json"), field="body") == ["x y", "z"]
    save_file({"input_ids": torch.arange(12, dtype=torch.int32).view(3, 4)}, str(tmp_path / "d.safetensors"))
    ids = read_calibration_file(str(tmp_path / "d.safetensors"))
    assert ids.dtype == torch.int64 and ids.tolist() == torch.arange(12).view(3, 4).tolist()


@pytest.mark.parametrize("name,content,pattern", [
    ("missing.txt", None, r"missing\.txt.*no such file"),
    ("a.csv", "x,y\n", r"unknown file type '\.csv'.*\.jsonl"),
    ("b.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"b\.jsonl, line 2: not valid JSON"),
    ("c.jsonl", '{"content": "ok"}\n', r"c\.jsonl, line 1: no 'text' string.*keys: content.*--calibration-field"),
    ("d.json", '{"text": "not a list"}', r"d\.json: a \.json file must hold a list"),
    ("e.json", '["ok", 3]', r"e\.json, entry 1: expected a string"),
    ("f.txt", "   \n\n", r"f\.txt: no text in it"),
    ("g.txt", b"\xff\xfe\x00bad", r"g\.txt.*not UTF-8"),
    ("h.safetensors", {"ids": torch.zeros(2, 3, dtype=torch.int64)}, r"no tensor named 'input_ids' \(it has: ids\)"),
    ("i.safetensors", {"input_ids": torch.zeros(6, dtype=torch.int64)}, r"integer token ids of shape \[N, L\]"),
    ("j.safetensors", {"input_ids": torch.zeros(2, 3)}, r"integer token ids.*float32"),
    ("k.safetensors", b"not a safetensors file at all", r"not a readable safetensors file"),
])
def test_bad_files_name_file_place_and_fix(tmp_path, name, content, pattern):
    p = tmp_path / name
    if isinstance(content, dict):
        save_file(content, str(p))
    elif isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    with pytest.raises(DataError, match=pattern):
        read_calibration_file(str(p))


def test_windows_seeded_with_bos():
    toks = torch.arange(1000)
    a = sample_windows(toks, 6, 32, 0, 7, "t")
    assert a.shape == (6, 32) and (a[:, 0] == 7).all()
    assert torch.equal(a, sample_windows(toks, 6, 32, 0, 7, "t"))
    assert not torch.equal(a, sample_windows(toks, 6, 32, 1, 7, "t"))
    for r in a:  # each window is a contiguous stretch of the text after its BOS
        assert torch.equal(r[1:], torch.arange(int(r[1]), int(r[1]) + 31))
    b = sample_windows(toks, 3, 32, 0, None, "t")
    assert torch.equal(b[:, 1:] - b[:, :1], torch.arange(1, 32).expand(3, 31))
    with pytest.raises(DataError, match="my text has 20 tokens, fewer than one calibration window of 32"):
        sample_windows(torch.arange(20), 2, 32, 0, None, "my text")


def test_recipe_key_and_override_checked():
    from quantkit.checks import with_calibration
    from quantkit.recipe import load_recipe

    r = load_recipe({"quantizer": "rtn", "format": {"type": "int", "bits": 4},
                     "calibration": {"path": "data.jsonl", "field": "body"}})
    assert r.calibration.path == "data.jsonl" and r.calibration.field == "body"
    assert with_calibration(r, path="other.txt").calibration.path == "other.txt"
    with pytest.raises(RecipeError, match=r"calibration.path \(option --calibration-data / path=\): expected a"):
        with_calibration(r, path=3)


@needs_data
def test_api_text_and_file_windows(tmp_path):
    """calibration= a list of strings or a file path: windows drawn with the recipe's seed, BOS first."""
    from types import SimpleNamespace

    from quantkit.api import _calibration_ids
    from quantkit.models import load_float_model
    from quantkit.recipe import load_recipe

    lm = SimpleNamespace(tokenizer=load_float_model("smollm2-135m").tokenizer, bos_token_id=1)  # a model with BOS
    rec = load_recipe({"quantizer": "gptq", "format": {"type": "int", "bits": 4},
                       "calibration": {"samples": 5, "seq_len": 48, "seed": 3}})
    ids, info = _calibration_ids(lm, rec, [TEXT])
    assert ids.shape == (5, 48) and (ids[:, 0] == lm.bos_token_id).all()
    assert info["corpus"] == "user text" and info["seed"] == 3 and info["documents"] == 1 and info["bos"]
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    ids2, info2 = _calibration_ids(lm, rec, str(tmp_path / "t.jsonl"))
    assert torch.equal(ids, ids2) and info2["corpus"] == "file t.jsonl" and info2["text_sha256"] == info["text_sha256"]
    body = lm.tokenizer(TEXT, add_special_tokens=False).input_ids
    s = body.index(int(ids[0, 1]))  # the first window's text is a stretch of the file's tokens
    assert ids[0, 1:].tolist() in [body[i:i + 47] for i in range(s, len(body) - 46)]
    ids3, _ = _calibration_ids(lm, rec.model_copy(update={"calibration": rec.calibration.model_copy(
        update={"seed": 4})}), [TEXT])
    assert not torch.equal(ids, ids3)


@needs_data
def test_cli_calibration_file(tmp_path):
    model = make_tiny_smol(str(tmp_path / "tiny"))
    (tmp_path / "calib.yaml").write_text(CALIB)
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"body": TEXT + str(i)}) + "\n" for i in range(3)))
    out = str(tmp_path / "out")
    p = cli("quantize", model, "-r", tmp_path / "calib.yaml", "-o", out, "--calibration-data", data)
    fails_with(p, r"mine\.jsonl, line 1: no 'text' string.*--calibration-field")
    no_work_started(p)
    assert fingerprint(out) == {"<temps>": []}
    p = cli("quantize", model, "-r", tmp_path / "calib.yaml", "-o", out, "--calibration-data", data,
            "--calibration-field", "body")
    assert p.returncode == 0, p.stderr[-3000:]
    cal = json.loads((tmp_path / "out" / "quantkit_run.json").read_text())["meta"]["calibration"]
    assert cal["corpus"] == "file mine.jsonl" and cal["documents"] == 3 and cal["samples"] == 4
    assert cal["path"] == str(data)
