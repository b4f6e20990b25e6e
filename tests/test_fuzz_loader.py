"""Property: a corrupted checkpoint either loads or raises QuantkitError — never another exception, never a hang.

Hypothesis mutates a small valid checkpoint of every layout: random bytes overwritten / truncation of
model.safetensors or config.json, and random JSON values planted anywhere in config.json. Bounded to a few
seconds per layout (derandomized, no example database written).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

import quantkit
from quantkit.errors import QuantkitError

LAYOUTS = ["native", "compressed-tensors", "gptq"]
PER_EXAMPLE_S = 20  # a load of this tiny checkpoint takes well under a second; more is a hang
SETTINGS = dict(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    m = LlamaForCausalLM(cfg).eval()
    qm = quantkit.quantize(m, {"quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": 16}},
                           calibration=torch.randint(0, 128, (2, 8)), device="cpu", progress=False)
    root = tmp_path_factory.mktemp("fuzz")
    out = {}
    for lay in LAYOUTS:
        out[lay] = str(root / lay)
        qm.save(out[lay], layout=lay)
    return out


def _alarm(_sig, _frm):
    raise TimeoutError(f"loading took more than {PER_EXAMPLE_S} s: the loader hangs on this input")


def load_must_behave(d: str) -> None:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(PER_EXAMPLE_S)
    try:
        quantkit.load(d)
    except QuantkitError:
        pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def with_copy(src: str, mutate) -> None:
    work = tempfile.mkdtemp(prefix="qk-fuzz-")
    try:
        d = os.path.join(work, "ck")
        shutil.copytree(src, d)
        mutate(d)
        load_must_behave(d)
    finally:
        shutil.rmtree(work, ignore_errors=True)


byte_edits = st.tuples(
    st.sampled_from(["model.safetensors", "config.json"]),
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
    st.one_of(st.none(), st.floats(0, 1)),  # truncate at this fraction of the file
    st.booleans(),  # aim at the safetensors header (first ~2 KiB), where corruption matters most
)

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 64), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=12), st.sampled_from(["int", "fp8", "gptq", "pack-quantized", "Linear", "re:.*"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


def _apply_bytes(d, edit):
    fname, changes, cut, header_only = edit
    p = os.path.join(d, fname)
    data = bytearray(open(p, "rb").read())
    span = min(len(data), 2048) if header_only else len(data)
    for frac, val in changes:
        data[int(frac * span)] = val
    if cut is not None:
        data = data[: int(cut * len(data))]
    open(p, "wb").write(bytes(data))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _apply_json(d, pick, value):
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    paths = [q for q in _paths(cfg) if q]
    path = paths[pick % len(paths)]
    node = cfg
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with open(p, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_random_byte_corruption(ckpts, layout):
    @settings(**SETTINGS)
    @given(edit=byte_edits)
    def check(edit):
        with_copy(ckpts[layout], lambda d: _apply_bytes(d, edit))
    check()


@pytest.mark.parametrize("layout", ["native", "compressed-tensors", "gptq"])
def test_random_config_values(ckpts, layout):
    @settings(**SETTINGS)
    @given(pick=st.integers(0, 10 ** 6), value=json_values)
    def check(pick, value):
        with_copy(ckpts[layout], lambda d: _apply_json(d, pick, value))
    check()
