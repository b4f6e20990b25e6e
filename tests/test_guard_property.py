"""Property tests (hypothesis): whatever numbers the CLI's calibration options get, and whatever is passed
as ``calibration=`` to ``quantkit.quantize``, no traceback reaches the user. The CLI either succeeds or
prints exactly one ``quantkit: error:`` line and exits 2; the API either returns a model or raises one
QuantkitError. Valid input must succeed (so a check that refuses too much fails here too)."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile

import numpy as np
import pytest
import torch
from _guards import CALIB, make_tiny_smol, needs_data
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import quantkit
from quantkit.errors import QuantkitError

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


# ---- the CLI's numeric options ---------------------------------------------------------------------------
def _opt(small: tuple[int, int], huge: tuple[int, int]):
    return st.one_of(st.none(), st.integers(*small), st.integers(*huge),
                     st.sampled_from(["x", "1.5", "", "0x10", " 3", "1e3", "-0"]))


OPTIONS = {"--samples": _opt((-3, 4), (10 ** 11, 10 ** 13)), "--seq-len": _opt((-3, 600), (10 ** 6, 10 ** 8)),
           "--batch-size": _opt((-2, 6), (10 ** 9, 10 ** 10)), "--seed": _opt((-3, 5), (2 ** 63 - 1, 2 ** 65))}


def _valid(name: str, v) -> bool:
    if v is None:
        return True
    try:
        i = int(str(v))
    except ValueError:
        return False
    if str(v).strip() != str(v):
        return False
    return {"--samples": 1 <= i <= 4, "--seq-len": 8 <= i <= 512, "--batch-size": i >= 1,
            "--seed": 0 <= i < 2 ** 63}[name]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    from quantkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's exit (our one-line error)
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("prop")
    model = make_tiny_smol(str(d / "tiny-smol"))
    (d / "r.yaml").write_text(CALIB)
    return model, str(d / "r.yaml"), d


@needs_data
@settings(max_examples=30, **SETTINGS)
@given(st.fixed_dictionaries(OPTIONS))
@example({"--samples": None, "--seq-len": None, "--batch-size": None, "--seed": None})
@example({"--samples": 2, "--seq-len": 8, "--batch-size": 10 ** 9, "--seed": 2 ** 63 - 1})
@example({"--samples": 1, "--seq-len": 512, "--batch-size": 1, "--seed": 0})
def test_cli_numeric_options_never_crash(cli_setup, opts):
    model, recipe, root = cli_setup
    out = tempfile.mkdtemp(dir=root)
    os.rmdir(out)
    argv = ["quantize", model, "-r", recipe, "-o", out]
    for k, v in opts.items():
        if v is not None:
            argv += [f"{k}={v}"]  # '=' so that '-0' and '' stay values
    rc, stdout, stderr = run_cli(argv)
    assert "Traceback" not in stderr
    ok = all(_valid(k, v) for k, v in opts.items())
    event("valid options: quantized" if ok else "invalid options: one error line")
    if ok:
        assert rc == 0, (argv, stderr[-2000:])
        assert "saved " in stdout and any(os.path.exists(os.path.join(out, f)) for f in (  # streamed: shards
            "model.safetensors", "model.safetensors.index.json"))
    else:
        assert rc == 2, (argv, rc, stderr[-2000:])
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("quantkit: error:"), (argv, stderr[-2000:])
        assert not os.path.exists(out)  # nothing started, nothing written


# ---- the calibration argument of quantkit.quantize ----------------------------------------------------------
def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


TOK = _tokenizer()
VOCAB = len(TOK)
POSITIONS = 64
RECIPE = {"quantizer": "gptq", "format": {"type": "int", "bits": 4, "group_size": 16},
          "calibration": {"samples": 3, "seq_len": 8, "batch_size": 2}}
DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool]


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=POSITIONS)).eval()


@st.composite
def tensors(draw):
    dt = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    if len(shape) == 2 and draw(st.booleans()):
        shape[1] = draw(st.sampled_from([1, 8, POSITIONS, POSITIONS + 1, 300]))
    lo, hi = draw(st.sampled_from([(0, VOCAB - 1), (-3, VOCAB - 1), (0, VOCAB + 3)]))
    t = torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 9))))
    return t.to(dt)


@st.composite
def id_tensors(draw):  # [N, L] integer ids: valid, or broken in exactly one way
    n, L = draw(st.integers(1, 4)), draw(st.sampled_from([1, 8, 16, POSITIONS]))
    broken = draw(st.sampled_from([None, "no windows", "empty windows", "too long", "id = vocab", "negative id",
                                   "int16"]))
    n = 0 if broken == "no windows" else n
    L = 0 if broken == "empty windows" else POSITIONS + 1 if broken == "too long" else L
    t = torch.randint(0, VOCAB, (n, L), generator=torch.Generator().manual_seed(draw(st.integers(0, 9))))
    if t.numel() and broken in ("id = vocab", "negative id"):
        t[-1, -1] = VOCAB if broken == "id = vocab" else -1
    return t.to(torch.int16 if broken == "int16" else draw(st.sampled_from([torch.int64, torch.int32])))


CALIBRATIONS = st.one_of(
    id_tensors(),
    tensors(),
    id_tensors(),
    st.lists(st.text(max_size=60), max_size=5),
    st.lists(st.one_of(st.text(max_size=5), st.integers()), min_size=1, max_size=3),
    st.integers(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.builds(lambda n: np.zeros((2, n), dtype=np.int64), st.integers(0, 10)),
    st.lists(st.lists(st.integers(-2, VOCAB + 2), min_size=1, max_size=8), min_size=1, max_size=3),
)


def _should_work(c) -> bool:
    if isinstance(c, torch.Tensor):
        return (c.dim() == 2 and c.dtype in (torch.int32, torch.int64) and c.shape[0] >= 1
                and 1 <= c.shape[1] <= POSITIONS and int(c.min()) >= 0 and int(c.max()) < VOCAB)
    if isinstance(c, list) and all(isinstance(s, str) for s in c):
        n = TOK("\n\n".join(c), add_special_tokens=False, return_tensors="pt").input_ids.numel() if c else 0
        return n >= RECIPE["calibration"]["seq_len"]
    return False


@settings(max_examples=60, **SETTINGS)
@given(CALIBRATIONS)
@example(torch.randint(0, 256, (3, 16)))
@example(torch.full((2, 8), VOCAB))
@example(torch.full((2, 8), -1))
@example(torch.zeros((0, 64), dtype=torch.long))
@example(["The quick brown fox jumps over the lazy dog."])
def test_api_calibration_argument_never_crashes(calibration):
    try:
        qm = quantkit.quantize(_model(), RECIPE, calibration=calibration, tokenizer=TOK, device="cpu",
                               progress=False)
    except QuantkitError as e:
        event(f"refused: {type(calibration).__name__}")
        assert str(e) and "\n" not in str(e)
        assert not _should_work(calibration), f"refused valid calibration: {e}"
        return
    event(f"quantized: {type(calibration).__name__}")
    assert _should_work(calibration), f"accepted {calibration!r}"
    assert qm.quantized_layers() and qm.report.calibration_tokens > 0
