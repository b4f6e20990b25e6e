"""A large CPU Hessian parked on disk (issue 17: ``gptq.park_hessian``, called by the pipeline after a block's
calibration for the Hessians only a later linear reads) changes no result: GPTQ on parked statistics gives the
same packed tensors, dequantized weight and metrics, bit for bit, as on statistics held in memory; the file is
written once (GPTQ reuses it) and the Hessian stays parked after the solve (also a failed one), reading back
the same bits; the file goes with the statistics; and a tiny model's checkpoint and report are the same with
and without the pipeline parking."""

import gc
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_gptq_memory import _same, _stats  # noqa: E402

from quantkit import pipeline  # noqa: E402
from quantkit.errors import NumericalError  # noqa: E402
from quantkit.formats.base import format_from_spec  # noqa: E402
from quantkit.quantizers import gptq as gptq_mod  # noqa: E402
from quantkit.quantizers.base import LayerStats  # noqa: E402
from quantkit.quantizers.gptq import GPTQ, park_hessian  # noqa: E402

FMT = {"type": "int", "bits": 4, "group_size": 32, "sym": True}


@pytest.fixture
def files(monkeypatch):
    made = []
    real = gptq_mod.tempfile.TemporaryFile

    def counting(*a, **k):
        made.append(real(*a, **k))
        return made[-1]
    monkeypatch.setattr(gptq_mod.tempfile, "TemporaryFile", counting)
    monkeypatch.setattr(gptq_mod, "SPILL_MIN_BYTES", 0)
    return made


def _in_memory(st: LayerStats):
    return st.__dict__.get("_hessian")


@pytest.mark.parametrize("cfg", [dict(act_order=True, static_groups=True), dict(act_order=False),
                                 dict(act_order=True, static_groups=False, block_size=7)])
@pytest.mark.parametrize("retry", [False, True])
def test_parked_same_results_one_file(files, cfg, retry):
    fmt = format_from_spec(FMT)
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(1))

    def stats():
        st = _stats(96, seed=2, dead=(5,))
        if retry:  # not positive definite at the first dampening: the retry reads the file again
            st.hessian -= 0.05 * torch.diagonal(st.hessian).mean() * torch.eye(96)
        return st
    want = GPTQ(GPTQ.Config(**cfg)).quantize(w, fmt, stats())
    files.clear()
    st = stats()
    h0 = st.hessian.clone()
    assert park_hessian(st) and st.hessian_parked and _in_memory(st) is None
    assert len(files) == 1
    got = GPTQ(GPTQ.Config(**cfg)).quantize(w, fmt, st)
    _same(want, got, "parked")
    if retry:
        assert got.metrics["damp"] > 0.01
    assert len(files) == 1, "GPTQ wrote the parked Hessian again"
    assert st.hessian_parked and _in_memory(st) is None, "the Hessian came back into memory after the solve"
    assert not files[0].closed
    assert torch.equal(st.hessian, h0) and not st.hessian_parked  # read back on first use, the same bits
    # the same statistics solved again (the Hessian now in memory, the file holding it): same result, no write
    _same(want, GPTQ(GPTQ.Config(**cfg)).quantize(w, fmt, st), "again")
    assert len(files) == 1 and st.hessian_parked
    del st
    gc.collect()
    assert files[0].closed


def test_parked_failed_solve_leaves_hessian(files):
    fmt = format_from_spec(FMT)
    st = _stats(96, seed=3)
    h0 = st.hessian.clone()
    park_hessian(st)
    w = torch.randn(8, 96)
    w[2, 3] = float("nan")
    with pytest.raises(NumericalError):
        GPTQ(GPTQ.Config()).quantize(w, fmt, st)
    assert len(files) == 1 and st.hessian_parked
    assert torch.equal(st.hessian, h0)


def test_park_only_large_unshared_cpu(monkeypatch, files):
    st = _stats(32, seed=4)
    st.cache = {}  # shared (q/k/v): GPTQ's shared spill handles it
    assert not park_hessian(st) and not st.hessian_parked
    st.cache = None
    monkeypatch.setattr(gptq_mod, "SPILL_MIN_BYTES", 32 * 32 * 4 + 1)
    assert not park_hessian(st)
    monkeypatch.setattr(gptq_mod, "SPILL_MIN_BYTES", None)
    assert not park_hessian(st)
    assert not park_hessian(LayerStats(4, None))
    assert not files
    monkeypatch.setattr(gptq_mod, "SPILL_MIN_BYTES", 0)
    assert park_hessian(st) and park_hessian(st) is False and len(files) == 1  # already parked: nothing more


def test_model_same_with_and_without_parking(monkeypatch):
    """Through the whole pipeline (every Hessian large enough to park): while each linear is solved, the
    Hessians only later linears read are parked, and the checkpoint and report are the same bit for bit as
    with nothing parked."""
    from quantkit import solve

    from _codes import outputs

    monkeypatch.setattr(gptq_mod, "SPILL_MIN_BYTES", 0)
    seen: list = []
    park = pipeline._park_hessians

    def recording_park(collector, names):
        park(collector, names)
        seen.append((collector, names))
    monkeypatch.setattr(pipeline, "_park_hessians", recording_park)
    parked_at_first: list[dict] = []
    ql = solve.quantize_linear

    def watching(name, mod, scheme, stats, *a, **k):
        collector, names = seen[-1]
        if name == names[0]:
            parked_at_first.append({o: s.hessian_parked for o, s in collector.stats.items()})
        return ql(name, mod, scheme, stats, *a, **k)
    monkeypatch.setattr(solve, "quantize_linear", watching)
    got_t, got_f = outputs("w4a16-gptq")
    assert seen and parked_at_first
    for flags in parked_at_first:  # q/k/v and gate/up share statistics (a cache): o_proj and down_proj park
        assert sum(flags.values()) == 2, flags
    monkeypatch.setattr(pipeline, "_park_hessians", lambda collector, names: None)
    want_t, want_f = outputs("w4a16-gptq")
    assert want_t.keys() == got_t.keys()
    for k in want_t:
        assert torch.equal(want_t[k], got_t[k]), k
    assert want_f == got_f
