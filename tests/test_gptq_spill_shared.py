"""Linears fed one input (q/k/v, gate/up: one LayerStats with a cache, one cached GPTQ factor) spill their
shared Hessian to disk once, not once per linear; every result and the Hessian itself stay bit for bit as
without spilling, also after a failed solve and a damping retry; the file goes with the cache."""

import dataclasses
import gc

import pytest
import torch
from test_gptq_memory import _same  # tensor by tensor, metric by metric

from quantkit.errors import NumericalError
from quantkit.formats.base import format_from_spec
from quantkit.quantizers import gptq as gptq_mod
from quantkit.quantizers.base import LayerStats
from quantkit.quantizers.gptq import GPTQ

COLS = 96


def _stats(seed: int, retry: bool = False) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(COLS, COLS, generator=g) * (torch.arange(COLS) + 1.0).pow(-0.7)
    x = torch.randn(512, COLS, generator=g) @ mix
    x[:, 7] = 0  # a dead column
    h = (x.T @ x).float()
    if retry:  # not positive definite at the first dampening: the factor retries (reading the spill again)
        h -= 0.05 * torch.diagonal(h).mean() * torch.eye(COLS)
    st = LayerStats(512, h, (x * x).sum(0).float(), x.abs().amax(0).float())
    st.cache = {}
    return st


def _weights(seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(r, COLS, generator=gen) for r in (32, 16, 16, 24)]


class _Counting:
    """A temporary file that counts the bytes written to it."""

    def __init__(self, f):
        self.f, self.written = f, 0

    def write(self, b):
        n = self.f.write(b)
        self.written += n
        return n

    def __getattr__(self, k):
        return getattr(self.f, k)


@pytest.fixture
def files(monkeypatch):
    made: list[_Counting] = []
    real = gptq_mod.tempfile.TemporaryFile

    def counting(*a, **k):
        made.append(_Counting(real(*a, **k)))
        return made[-1]
    monkeypatch.setattr(gptq_mod.tempfile, "TemporaryFile", counting)
    return made


def _run(monkeypatch, spill, st: LayerStats, ws, cfgs=None) -> list:
    monkeypatch.setattr(gptq_mod, "SPILL_MIN_BYTES", spill)
    fmt = format_from_spec({"type": "int", "bits": 4, "group_size": 32, "sym": True})
    out = []
    for i, w in enumerate(ws):
        q = GPTQ(GPTQ.Config(**(cfgs[i] if cfgs else {})))
        try:
            out.append(q.quantize(w, fmt, st))
        except NumericalError as e:
            out.append(str(e))  # not the exception: its traceback would keep the solve's frames (and spill)
    return out


@pytest.mark.parametrize("retry", [False, True])
def test_shared_hessian_written_once(monkeypatch, files, retry):
    ws = _weights()
    want = _run(monkeypatch, None, _stats(4, retry), ws)
    assert not files
    st = _stats(4, retry)
    h0 = st.hessian.clone()
    got = _run(monkeypatch, 0, st, ws)
    assert len(files) == 1, f"{len(files)} spill files for one shared Hessian"
    assert files[0].written == h0.numel() * h0.element_size()
    for i, (a, b) in enumerate(zip(want, got)):
        _same(a, b, f"linear {i}")
    if retry:
        assert got[0].metrics["damp"] > 0.01
    assert st.hessian is not None and torch.equal(st.hessian, h0)
    # the file stays for later linears of the input while its statistics are alive, and goes with them
    assert not files[0].closed
    del st
    gc.collect()
    assert files[0].closed


def test_shared_spill_after_failed_solve_and_other_configs(monkeypatch, files):
    """A linear that fails (NaN weight) gives the Hessian back and leaves the spill for the next ones; a
    linear with another dampening (a second factor, the same Hessian) writes nothing either."""
    ws = _weights(2)
    ws[1][3, 5] = float("nan")
    cfgs = [{}, {}, {"damp": 0.05}, {}]
    want = _run(monkeypatch, None, _stats(5), ws, cfgs)
    st = _stats(5)
    h0 = st.hessian.clone()
    got = _run(monkeypatch, 0, st, ws, cfgs)
    assert isinstance(want[1], str) and want[1] == got[1]
    for i in (0, 2, 3):
        _same(want[i], got[i], f"linear {i}")
    assert len(files) == 1 and files[0].written == h0.numel() * 4
    assert torch.equal(st.hessian, h0)
    st.cache.clear()  # the cache entry gone: the file with it
    assert files[0].closed


def test_unshared_or_replaced_hessian_not_reused(monkeypatch, files):
    """Without a cache each linear writes its own file and closes it; statistics that share the cache but
    hold another Hessian (a transform's copy, e.g. quip's rotated one) never read another's file."""
    ws = _weights(3)
    st = _stats(6)
    st.cache = None
    h0 = st.hessian.clone()
    _run(monkeypatch, 0, st, ws[:2])
    assert len(files) == 2 and all(f.closed for f in files)
    assert torch.equal(st.hessian, h0)
    files.clear()

    def flow(spill):
        a = _stats(7)
        b = dataclasses.replace(a, hessian=_stats(8).hessian)  # shares a.cache
        r = _run(monkeypatch, spill, a, ws[:1]) + _run(monkeypatch, spill, b, ws[1:2])
        return r, a, b
    want, a0, b0 = flow(None)
    got, a1, b1 = flow(0)
    for i, (x, y) in enumerate(zip(want, got)):
        _same(x, y, f"linear {i}")
    assert torch.equal(a1.hessian, a0.hessian) and torch.equal(b1.hessian, b0.hessian)
    assert len(files) == 2 and files[0].closed and not files[1].closed  # a's file went when b's replaced it
    # the same statistics with their Hessian replaced (not the tensor read back): written again
    a1.hessian = a1.hessian.clone()
    _run(monkeypatch, 0, a1, ws[2:3])
    assert len(files) == 3 and files[1].closed
