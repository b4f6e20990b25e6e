"""Issue 21 through the command line, each case in its own process: exit code 2, the one
``quantkit: error:`` line, no traceback, and the output folder untouched (no temporary folder left)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import time

import pytest
from _guards import CALIB, RTN32, cli, edit_config, fails_with, fingerprint, make_tiny_smol, needs_data, no_work_started
from safetensors.torch import load_file, save_file

pytestmark = needs_data


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_smol(str(tmp_path_factory.mktemp("m") / "tiny-smol"))


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    d = tmp_path_factory.mktemp("r")
    files = {"calib": CALIB, "rtn32": RTN32, "none": "targets: [nothing_matches_this]\n",
             "g0": "format: {type: int, bits: 4, group_size: 0}\n",
             "gm1": "format: {type: int, bits: 4, group_size: -1}\n", "intkey": "1: 2\n"}
    out = {}
    for k, v in files.items():
        (d / f"{k}.yaml").write_text(v)
        out[k] = str(d / f"{k}.yaml")
    return out


@pytest.fixture(scope="module")
def checkpoint(model, recipes, tmp_path_factory):
    """A quantkit checkpoint of the tiny model (RTN, data-free: quick)."""
    out = str(tmp_path_factory.mktemp("ck") / "ck")
    p = cli("quantize", model, "-r", recipes["rtn32"], "-o", out)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


# ---- silent wrong results ------------------------------------------------------------------------------
def test_missing_weight_in_float_folder_is_named(model, recipes, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(model, bad)
    t = load_file(os.path.join(bad, "model.safetensors"))
    t.pop("model.layers.1.mlp.up_proj.weight")
    save_file(t, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    out = str(tmp_path / "out")
    p = cli("quantize", bad, "-r", recipes["rtn32"], "-o", out)
    fails_with(p, r"missing .*model\.layers\.1\.mlp\.up_proj\.weight.*--allow-missing")
    assert fingerprint(out) == {"<temps>": []}
    # an explicit allowance lets a known-absent tensor through
    p = cli("quantize", bad, "-r", recipes["rtn32"], "-o", out, "--allow-missing", "*.layers.1.mlp.up_proj.weight")
    assert p.returncode == 0, p.stderr[-3000:]


def test_eval_of_checkpoint_without_quantization_config(checkpoint, tmp_path):
    d = str(tmp_path / "noqc")
    shutil.copytree(checkpoint, d)
    edit_config(d, lambda c: c.pop("quantization_config"))
    before = fingerprint(d)
    p = cli("eval", d, "--windows", 1, "--eval-seq-len", 32)
    fails_with(p, r"holds quantized tensors .*qweight.* no quantization_config")
    no_work_started(p)
    assert fingerprint(d) == before


def test_string_quantization_config(checkpoint, tmp_path):
    d = str(tmp_path / "strqc")
    shutil.copytree(checkpoint, d)
    edit_config(d, lambda c: c.__setitem__("quantization_config", "gptq"))
    p = cli("eval", d, "--windows", 1, "--eval-seq-len", 32)
    fails_with(p, r"quantization_config must be a mapping.*'gptq'")


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(model, recipes, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    before = fingerprint(str(out))
    p = cli("quantize", model, "-r", recipes["rtn32"], "-o", out, "--overwrite")
    fails_with(p, r"not a quantkit checkpoint")
    no_work_started(p)
    assert fingerprint(str(out)) == before


def test_overwrite_never_replaces_the_input_model(model, recipes, tmp_path):
    src = str(tmp_path / "input")
    shutil.copytree(model, src)
    before = fingerprint(src)
    p = cli("quantize", src, "-r", recipes["rtn32"], "-o", src, "--overwrite")
    fails_with(p, r"input model's folder")
    no_work_started(p)
    assert fingerprint(src) == before
    p = cli("quantize", src, "-r", recipes["rtn32"], "-o", tmp_path, "--overwrite")  # a folder holding the input
    fails_with(p, r"holds the input model's folder")
    assert fingerprint(src) == before


def test_overwrite_of_a_checkpoint_says_what_it_replaced(checkpoint, model, recipes, tmp_path):
    out = str(tmp_path / "ck")
    shutil.copytree(checkpoint, out)
    p = cli("quantize", model, "-r", recipes["rtn32"], "-o", out, "--overwrite")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "replaced a quantkit checkpoint (quantkit layout" in p.stdout
    (tmp_path / "ck" / "notes.txt").write_text("mine")  # a file quantkit did not write
    before = fingerprint(out)
    p = cli("quantize", model, "-r", recipes["rtn32"], "-o", out, "--overwrite")
    fails_with(p, r"also holds notes\.txt")
    assert fingerprint(out) == before


def test_targets_matching_nothing(model, recipes, tmp_path):
    out = str(tmp_path / "o")
    p = cli("quantize", model, "-r", recipes["none"], "-o", out)
    fails_with(p, r"quantizes none of the model's \d+ linear layers")
    no_work_started(p)
    assert fingerprint(out) == {"<temps>": []}


@pytest.mark.parametrize("key", ["g0", "gm1"])
def test_group_size_zero_or_negative(model, recipes, key, tmp_path):
    p = cli("quantize", model, "-r", recipes[key], "-o", tmp_path / "o")
    fails_with(p, r"format\.group_size: must be a positive number")
    assert not (tmp_path / "o").exists()


def test_report_on_a_json_that_is_not_results(tmp_path):
    f = tmp_path / "x.json"
    f.write_text(json.dumps({"a": 1}))
    p = cli("report", f, "-o", tmp_path / "rep")
    fails_with(p, r"not a results file")
    assert not (tmp_path / "rep").exists()


# ---- crashes that are now one error --------------------------------------------------------------------
@pytest.mark.parametrize("which,pattern", [("folder", r"is a folder"), ("intkey", r"key 1 is not a name")])
def test_bad_recipe_argument(model, recipes, tmp_path, which, pattern):
    r = str(tmp_path) if which == "folder" else recipes["intkey"]
    p = cli("quantize", model, "-r", r, "-o", tmp_path / "o")
    fails_with(p, pattern)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("opt,val,pattern", [
    ("--samples", "0", r"--samples: expected a positive integer, got 0"),
    ("--samples", "-1", r"--samples: expected a positive integer, got -1"),
    ("--seq-len", "0", r"--seq-len: expected a positive integer"),
    ("--batch-size", "0", r"--batch-size: expected a positive integer"),
    ("--seq-len", "4", r"calibration\.seq_len = 4: .*greater than or equal to 8.*--seq-len"),
    ("--seq-len", "100000", r"100000 tokens exceed the model's 512 positions"),
])
def test_calibration_options(model, recipes, tmp_path, opt, val, pattern):
    out = str(tmp_path / "o")
    p = cli("quantize", model, "-r", recipes["calib"], "-o", out, opt, val)
    fails_with(p, pattern)
    no_work_started(p)
    assert fingerprint(out) == {"<temps>": []}


def test_calibration_larger_than_memory_is_refused_before_starting(tmp_path, recipes):
    model = make_tiny_smol(str(tmp_path / "long"), max_positions=1 << 20)
    t0 = time.time()
    p = cli("quantize", model, "-r", recipes["calib"], "-o", tmp_path / "o", "--seq-len", 500000, "--samples",
            1000000)
    fails_with(p, r"need at least \d+\.\d GiB .*token ids.*block inputs.* available on cpu")
    no_work_started(p)
    assert time.time() - t0 < 120 and not (tmp_path / "o").exists()


def _fsize_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))


def test_write_failure_keeps_the_old_checkpoint(checkpoint, model, recipes, tmp_path):
    """A real write failure in a real process (a 4 MiB file-size limit; model.safetensors is ~13 MB)."""
    out = str(tmp_path / "ck")
    shutil.copytree(checkpoint, out)
    before = fingerprint(out)
    # --load whole: one model.safetensors past the limit (a streamed save writes shards under 4 MiB here)
    p = cli("quantize", model, "-r", recipes["rtn32"], "-o", out, "--overwrite", "--load", "whole",
            preexec_fn=_fsize_limit)
    fails_with(p, r"writing .*ck failed: a file grew beyond the allowed file size .*existing checkpoint there is "
                  r"intact")
    assert fingerprint(out) == before  # byte-identical, and no temporary folder next to it


def test_stale_temporary_folders_of_dead_processes_are_removed(model, recipes, tmp_path):
    dead = __import__("subprocess").Popen(["true"])
    dead.wait()  # a pid that is gone
    stale = tmp_path / f".o.tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    alive = tmp_path / f".o.tmp-{os.getpid()}-xyz"  # this test process is alive: its temp stays
    alive.mkdir()
    other = tmp_path / f".other.tmp-{dead.pid}-abc"  # another output's temp: not ours to judge here
    other.mkdir()
    p = cli("quantize", model, "-r", recipes["rtn32"], "-o", tmp_path / "o")
    assert p.returncode == 0, p.stderr[-3000:]
    assert not stale.exists() and alive.exists() and other.exists()
    assert f"process {dead.pid}, which is gone" in p.stderr
    assert sorted(e for e in os.listdir(tmp_path) if e.startswith(".o.")) == [alive.name]


# ---- conflicts found before any work -------------------------------------------------------------------
@pytest.mark.parametrize("recipe,layout,pattern", [
    ("calib", "awq", r"unknown layout 'awq'; known layouts: compressed-tensors, gptq, native"),
    ("any4-rtn", "compressed-tensors", r"holds the formats fp8, int, int8a8, not 'lut'"),
    ("w4-quip", "gptq", r"run-time transforms \(quip\)"),
    ("kv-k4v2", "compressed-tensors", r"kv_cache allocation has no place"),
])
def test_layout_conflicts_fail_before_calibration(model, recipes, tmp_path, recipe, layout, pattern):
    p = cli("quantize", model, "-r", recipes.get(recipe, recipe), "-o", tmp_path / "o", "--layout", layout)
    fails_with(p, pattern)
    no_work_started(p)
    assert not (tmp_path / "o").exists()


def test_gptq_zero_point_advice_is_a_cli_option(recipes, tmp_path):
    """GPTQ v1 cannot store a zero point of 0 next to the top code; the error's advice works as given."""
    m = make_tiny_smol(str(tmp_path / "pos"))
    t = load_file(os.path.join(m, "model.safetensors"))
    w = t["model.layers.0.self_attn.q_proj.weight"]
    w[0, :32] = w[0, :32].abs() + 0.01  # one group of non-negative weights: zero point 0, top code 15
    save_file(t, os.path.join(m, "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "g"
    p = cli("quantize", m, "-r", recipes["rtn32"], "-o", out, "--layout", "gptq")
    fails_with(p, r"q_proj.*zero point 0.*--checkpoint-format gptq_v2")
    assert not out.exists()
    p = cli("quantize", m, "-r", recipes["rtn32"], "-o", out, "--layout", "gptq", "--checkpoint-format", "gptq_v2")
    assert p.returncode == 0, p.stderr[-3000:]
    qc = json.load(open(out / "config.json"))["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2"
    p = cli("quantize", m, "-r", recipes["rtn32"], "-o", tmp_path / "n", "--checkpoint-format", "gptq_v2")
    fails_with(p, r"'checkpoint_format' does not apply to the native layout")


@pytest.mark.parametrize("command", ["eval", "run"])
def test_unknown_task_fails_before_perplexity(checkpoint, model, recipes, tmp_path, command):
    args = [checkpoint] if command == "eval" else [model, "-r", recipes["rtn32"], "-o", tmp_path / "run"]
    p = cli(command, *args, "--tasks", "nosuchtask", "--windows", 1, "--eval-seq-len", 32)
    fails_with(p, r"unknown task 'nosuchtask'")
    no_work_started(p)
    assert not (tmp_path / "run").exists()


def test_usage_errors_are_one_line():
    p = cli("quantize")
    fails_with(p, r"quantize: the following arguments are required")
    p = cli("eval", "x", "--windows", "many")
    fails_with(p, r"--windows: expected an integer >= 0, got 'many'")
