"""bench/peers.py on CPU: the table from fake timings, a missing or failing peer reported (never
fatal), outputs checked against each method's reference, Marlin's packing against Marlin's own, and
the --smoke run end to end (quantkit through the Triton interpreter, the GPU peers reported)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import types
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from _guards import load_bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def P():
    return load_bench("peers")


class Fn:
    """A fake method: y = x @ (scale * w).T; its fake time is `us` (graph) and 2 * us (eager)."""

    def __init__(self, w, us, scale=1.0):
        self.w, self.us, self.scale = w, us, scale

    def __call__(self, x):
        return torch.nn.functional.linear(x, self.w * self.scale)


def fake_timer(fns, xs, rep_ms, eager):
    for f in fns:
        f(xs[0])
    r = {"graph_us": fns[0].us}
    if eager:
        r["eager_us"] = 2 * fns[0].us
    return r


def fake_setups(P, times):
    """times: method -> {shape: graph µs}; 'wrong' adds an offset to its output, 'broken' raises."""
    def make(m):
        def setup(K, N, dev):
            if m == "broken":
                raise RuntimeError("cannot build for this shape")
            w = torch.randn(N, K, dtype=torch.bfloat16)
            shape = next(s for s, kn in P.SHAPES.items() if kn == (K, N))
            scale = 1.1 if m == "wrong" else 1.0  # rel err 0.1
            return P.Built([Fn(w, times[m][shape], scale), Fn(w.clone(), times[m][shape], scale)],
                           None if m == "bf16" else w)
        return setup
    return make


def run_measure(P, monkeypatch, methods, times, status=None, budget=1e9, ms=(1, 16)):
    monkeypatch.setitem(P.SHAPES, "t1", (64, 32))
    monkeypatch.setitem(P.SHAPES, "t2", (128, 64))
    make = fake_setups(P, times)
    for m in ["bf16"] + methods:
        monkeypatch.setitem(P.SETUPS, m, make(m))
    args = Namespace(t0=time.perf_counter(), budget_s=budget, tinygemm_max_m=8, eager_max_m=8, rep=1.0,
                     timer=fake_timer)
    info = {"device": "fake", "date": "2026-12-05", "torch": "t", "triton": "t", "python": "p", "rep_ms": 1.0,
            "status": dict(status or {}), "notes": {}, "skips": []}
    rows = P.measure(args, ["bf16"] + methods, ["t1", "t2"], list(ms), torch.device("cpu"), info, None)
    return info, rows


def test_table_ranges_and_cells_from_fake_timings(P, monkeypatch):
    times = {"bf16": {"t1": 10.0, "t2": 30.0}, "quantkit": {"t1": 5.0, "t2": 10.0},
             "tinygemm": {"t1": 4.0, "t2": 60.0}}
    info, rows = run_measure(P, monkeypatch, ["quantkit", "tinygemm"], times)
    assert len(rows) == 4
    r = rows[0]
    assert r["quantkit"]["graph_us"] == 5.0 and r["quantkit"]["eager_us"] == 10.0
    assert r["quantkit"]["rel_err"] < 1e-6
    assert P.ratio(r, "quantkit", "graph") == pytest.approx(2.0)
    # M = 16 > eager_max_m (8): graph only; tinygemm past its max M: skipped
    r16 = rows[1]
    assert "eager_us" not in r16["quantkit"] and "graph_us" in r16["quantkit"]
    assert r16["tinygemm"] == {"skipped": "M > 8"}
    md = P.report_md(info, rows, ["bf16", "quantkit", "tinygemm"])
    lines = md.splitlines()
    row_m1 = next(line for line in lines if line.startswith("| 1 |"))
    # quantkit: 10/5 = 2.0x on t1, 30/10 = 3.0x on t2; tinygemm 2.5x and 0.5x; eager ratios equal
    assert row_m1 == "| 1 | 10.0 – 30.0 | 2.00 – 3.00x | 2.00 – 3.00x | 0.50 – 2.50x | 0.50 – 2.50x |"
    row_m16 = next(line for line in lines if line.startswith("| 16 |"))
    assert row_m16 == "| 16 | 10.0 – 30.0 | 2.00 – 3.00x | – | – | – |"
    assert "| t2 | 1 | 30.0 | 60.0 | 3.00x / 3.00x | 0.50x / 0.50x |" in md
    assert "| t1 | 16 | 10.0 | – | 2.00x / – | skipped |" in md
    assert "timed in 4 of 4 cells" in md and "timed in 2 of 4 cells; 2 skipped" in md


def test_missing_and_failing_peers_are_reported_not_fatal(P, monkeypatch):
    times = {"bf16": {"t1": 10.0, "t2": 30.0}, "quantkit": {"t1": 5.0, "t2": 15.0},
             "wrong": {"t1": 5.0, "t2": 15.0}}
    P.NAMES.setdefault("wrong", "wrong")
    P.NAMES.setdefault("broken", "broken")
    status = {"marlin": "marlin unavailable: ModuleNotFoundError('marlin_cuda')"}
    info, rows = run_measure(P, monkeypatch, ["quantkit", "wrong", "broken", "marlin"], times, status)
    for r in rows:
        assert "graph_us" in r["quantkit"]
        assert r["marlin"] == {"unavailable": status["marlin"]}
        assert r["broken"]["error"].startswith("setup failed: RuntimeError('cannot build")
        assert r["wrong"]["rel_err"] > P.TOL and "graph_us" in r["wrong"]  # timed, but flagged
    md = P.report_md(info, rows, ["bf16", "quantkit", "wrong", "broken", "marlin"])
    assert "not run: marlin unavailable: ModuleNotFoundError('marlin_cuda')" in md
    assert "timed in 0 of 4 cells; 4 failed (first: setup failed: RuntimeError('cannot build" in md
    assert "4 with output off its reference" in md
    assert "| t1 | 1 | 10.0 | 20.0 | 2.00x / 2.00x | 2.00x / 2.00x † | error | n/a |" in md
    assert "- t1 M=1 broken: setup failed" in md


def test_time_budget_skips_the_rest(P, monkeypatch):
    times = {"bf16": {"t1": 10.0, "t2": 30.0}, "quantkit": {"t1": 5.0, "t2": 15.0}}
    P.NAMES.setdefault("broken", "broken")
    info, rows = run_measure(P, monkeypatch, ["quantkit", "broken"], times, budget=-1.0)
    # nothing set up once the budget is spent (the broken setup would have left an error)
    assert all("skipped" in r[m] for r in rows for m in ("bf16", "quantkit", "broken"))
    md = P.report_md(info, rows, ["bf16", "quantkit", "broken"])
    assert "| 1 | – | – | – | – | – |" in md


def test_save_writes_md_and_json_atomically(P, monkeypatch, tmp_path):
    times = {"bf16": {"t1": 10.0, "t2": 30.0}, "quantkit": {"t1": 5.0, "t2": 15.0}}
    info, rows = run_measure(P, monkeypatch, ["quantkit"], times)
    md = P.save(tmp_path / "o", info, rows, ["bf16", "quantkit"])
    assert (tmp_path / "o" / "peers.md").read_text() == md
    assert json.loads((tmp_path / "o" / "peers.json").read_text())["rows"] == rows
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["peers.json", "peers.md"]


def test_peer_import_failure_is_a_message(P, tmp_path):
    err = P.peer_import("marlin", str(tmp_path))
    assert err is not None and err.startswith("marlin unavailable:")


def test_marlin_pack_matches_marlins_own(P, monkeypatch):
    src = ROOT / ".peers" / "marlin"
    if not (src / "marlin" / "__init__.py").exists():
        pytest.skip("no .peers/marlin (bash bench/peers_prep.sh fills it)")
    monkeypatch.setitem(sys.modules, "marlin_cuda", types.ModuleType("marlin_cuda"))  # the CUDA part
    spec = importlib.util.spec_from_file_location("marlin_under_test", src / "marlin" / "__init__.py")
    marlin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(marlin)

    N, K = 512, 256
    q = torch.randint(0, 16, (N, K), dtype=torch.int32)
    s = (torch.rand(N, K // 128) * 0.01 + 1e-3).half()
    lin = torch.nn.Linear(K, N, bias=False)
    lin.weight.data = ((q.view(N, K // 128, 128) - 8) * s.float()[..., None]).view(N, K).half()
    layer = marlin.Layer(K, N, groupsize=128)
    layer.pack(lin, s)
    B, st = P.marlin_pack(q, s, marlin._perm, marlin._scale_perm)
    assert torch.equal(B, layer.B) and torch.equal(st, layer.s)
    B2, _ = P.marlin_pack(q ^ 1, s, marlin._perm, marlin._scale_perm)
    assert not torch.equal(B2, layer.B)


def test_smoke_run_end_to_end(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "peers.py"), "--smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    d = json.loads((tmp_path / "peers.json").read_text())
    assert [r["M"] for r in d["rows"]] == [1, 16]
    for r in d["rows"]:
        for m in ("quantkit", "any4", "fp8"):  # quantkit's int4, LUT and FP8 W8A8 kernels
            assert r[m]["rel_err"] < 1e-2 and r[m]["graph_us"] > 0, (m, r[m])
        assert "unavailable" in r["gemlite"]
    md = (tmp_path / "peers.md").read_text()
    assert "| tiny | 1 |" in md and "gemlite A16W4 g128**: not run:" in md
