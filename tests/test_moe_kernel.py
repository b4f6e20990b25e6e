"""The fused MoE W4A16 path (kernels/src/moe_w4a16.py, quantkit/moe/fused.py) and the per-expert loop.

On CPU the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by kernel_ref before Triton
is imported); QUANTKIT_TEST_CUDA=1 runs the same tests with the compiled kernel on a GPU, plus the CUDA-only
checks (Experts.forward takes the fused path, no host sync, CUDA-graph capture). References: the experts'
dequantized weights in a float64 loop over (token, slot) pairs, written here from the packed tensors'
formulas (quantkit's unpack), not from the kernel.
"""

from __future__ import annotations

import pytest
import torch
from kernel_ref import DEV, make_int, make_lut  # noqa: I001 - first: selects Triton's interpreter
from torch import nn

pytest.importorskip("triton")

from quantkit.moe import Experts, fused  # noqa: E402
from quantkit.nn import QuantLinear  # noqa: E402

CUDA = DEV.type == "cuda"
# the interpreter converts fp32 -> bf16 by truncation (a -2^-8 bias per rounding), compiled code rounds
TOL = {torch.bfloat16: 1.2e-2 if CUDA else 3e-2, torch.float16: 3e-3}


class _Host(nn.Module):
    act_fn = staticmethod(torch.nn.functional.silu)


class _GatedHost(_Host):
    def _apply_gate(self, gu):
        g, u = gu.chunk(2, -1)
        return torch.nn.functional.gelu(g) * u


def _packed(kind, n, k, g, seed):
    if kind in ("lut", "nf4"):
        spec, p = make_lut(n, k, 4, g, fixed="nf4" if kind == "nf4" else None, seed=seed)
    else:
        spec, p, _ = make_int(n, k, 4, g, kind == "sym", seed=seed)
    return spec, p


def qexperts(E, H, FF, kind="asym", g=32, seed=0, host=None, device=DEV):
    """E gated experts whose gate/up/down are QuantLinear of one format (random packed tensors)."""
    ex = Experts(host or _Host(), E, H, FF, gated=True, bias=False, concatenated=True, device="meta")
    for i in range(E):
        e = ex.expert(i)
        for j, (name, n, k) in enumerate((("gate_proj", FF, H), ("up_proj", FF, H), ("down_proj", H, FF))):
            spec, p = _packed(kind, n, k, g, seed * 1000 + 3 * i + j)
            setattr(e, name, QuantLinear(k, n, {"format": spec}, {a: t.to(device) for a, t in p.items()}))
    return ex


def reference(ex, x, idx, w):
    """float64: sum_j w[t, j] * down(silu(gate(x_t)) * up(x_t)) of expert idx[t, j] (ids outside [0, E) skipped)."""
    W = {}
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            i = int(idx[t, j])
            if not 0 <= i < ex.num_experts:
                continue
            if i not in W:
                e = ex.expert(i)
                W[i] = [getattr(e, n).dequantized_weight().double() for n in ("gate_proj", "up_proj", "down_proj")]
            g, u, d = W[i]
            xt = x[t].double()
            a = torch.nn.functional.silu(xt @ g.t()) * (xt @ u.t())
            out[t] += float(w[t, j]) * (a @ d.t())
    return out


def routing(T, E, k, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=gen), -1)
    return idx.to(DEV), w.to(DEV, dtype)


def rel(out, ref):
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def run_fused(ex, x, idx, w, cfg=None):
    run = fused.stacked_for(ex, x.device)
    assert run is not None, fused.reason(ex)
    return run(x, idx, w, cfg)


# ---- the kernel against the float reference ------------------------------------------------------------
@pytest.mark.parametrize("kind,E,k,T,g,dtype", [
    ("sym", 4, 2, 1, 32, torch.bfloat16),     # decode: one token
    ("asym", 8, 2, 5, 32, torch.float16),     # P = 10: one partial block per hit expert
    ("lut", 4, 2, 3, 32, torch.bfloat16),     # any4: per-row table with group scales
    ("nf4", 4, 2, 2, 16, torch.float16),      # fixed table
    ("asym", 4, 2, 20, None, torch.bfloat16),  # per channel; P = 40, not a multiple of BM
    ("sym", 16, 4, 1, 16, torch.float16),      # E = 16, top-4 of one token: 12 experts without tokens
    ("asym", 4, 2, 3, 128, torch.bfloat16),   # g128: whole groups per chunk, the scale after the dot
    ("lut", 4, 1, 2, 128, torch.float16),     # any4 g128, top-1
    ("sym", 4, 2, 2, 24, torch.float16),      # g24: groups split the chunks (a scale per word)
    ("lut", 4, 2, 2, None, torch.bfloat16),   # any4 without scales (the table alone)
])
def test_fused_matches_reference(kind, E, k, T, g, dtype):
    H, FF = (256 if g == 128 else 64), 48  # FF = 48: the down GEMM's K is not a multiple of the 128-column chunk
    ex = qexperts(E, H, FF, kind, g, seed=T + E)
    idx, w = routing(T, E, k, T * 7 + E, dtype)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(DEV, dtype)
    y = run_fused(ex, x, idx, w)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel(y, reference(ex, x, idx, w)) < TOL[dtype]


def test_fused_split_k_and_blocks():
    """Split-K (fp32 atomics into a zeroed buffer), a larger BM and either operand order give the same layer."""
    E, H, FF, T, k = 4, 64, 128, 6, 2
    ex = qexperts(E, H, FF, "asym", 32, seed=3)
    idx, w = routing(T, E, k, 11, torch.float16)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(2)).to(DEV, torch.float16)
    ref = reference(ex, x, idx, w)
    y1 = run_fused(ex, x, idx, w, {"split": 1, "BKW": 4, "swap": False})
    y2 = run_fused(ex, x, idx, w, {"split": 2, "BKW": 4, "BM": 32, "swap": True})
    y3 = run_fused(ex, x, idx, w, {"split": 3, "BKW": 8, "BM": 16, "swap": False})  # per-word scales (g32)
    for y in (y1, y2, y3):
        assert rel(y, ref) < TOL[torch.float16]


def test_dropped_ids_and_repeats():
    """Expert ids outside [0, E) contribute nothing (as in the loop); a token may pick one expert twice."""
    E, H, FF = 4, 64, 32
    ex = qexperts(E, H, FF, "sym", 32, seed=5)
    idx = torch.tensor([[0, -1], [2, 2], [E, 1]], device=DEV)
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.3, 0.7]], device=DEV, dtype=torch.float16)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(4)).to(DEV, torch.float16)
    ref = reference(ex, x, idx, w)
    assert rel(run_fused(ex, x, idx, w), ref) < TOL[torch.float16]
    assert rel(ex.forward_loop(x.float(), idx, w.float()), ref) < 1e-4


def test_align_layout():
    from quantkit.kernels.moe_w4a16 import align

    E, BM = 6, 4
    idx = torch.tensor([[1, 3], [3, 5], [1, 3], [0, 9], [3, -1]])
    ids, bexp, npad = align(idx.to(DEV), E, BM)
    ids, bexp, npad = ids.cpu().long(), bexp.cpu().long(), int(npad)
    flat = idx.reshape(-1)
    P = flat.numel()
    counts = [int((flat == e).sum()) for e in range(E)]
    assert npad == sum(-(-c // BM) * BM for c in counts)
    assert ids.numel() % BM == 0 and ids.numel() >= npad and bexp.numel() == ids.numel() // BM
    pos = 0
    for e in range(E):
        run = ids[pos:pos + -(-counts[e] // BM) * BM]
        real = run[run < P]
        assert sorted(real.tolist()) == sorted(torch.nonzero(flat == e).flatten().tolist())
        assert (run[counts[e]:] == P).all()  # padding after the expert's pairs
        assert (bexp[pos // BM:(pos + len(run)) // BM] == e).all()
        pos += len(run)
    assert (ids[npad:] == P).all()


@pytest.mark.parametrize("T,k,E,BM", [(1, 2, 8, 16), (5, 2, 6, 4), (16, 8, 128, 16), (64, 4, 16, 32), (3, 1, 4, 64),
                                      (2, 8, 256, 16), (128, 2, 8, 64)])
def test_align_kernel_equals_torch_align(T, k, E, BM):
    """The one-launch alignment (kernels/src/moe_align.py) gives the torch form's three outputs element for
    element: dropped ids (outside [0, E)), experts without pairs, P up to 256 pairs, E up to 256."""
    from quantkit.kernels.moe_align import align_kernel
    from quantkit.kernels.moe_w4a16 import align

    g = torch.Generator().manual_seed(T * 31 + E)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if T > 2:
        idx[0, 0], idx[1, -1] = -1, E + 3
    idx = idx.to(DEV)
    for a, b in zip(align(idx, E, BM), align_kernel(idx, E, BM)):
        assert torch.equal(a.to(torch.int32), b), (a.tolist()[:32], b.tolist()[:32])
    with pytest.raises(ValueError, match="outside the kernel's range"):
        align_kernel(idx, 5000, BM)


def test_fused_with_the_align_kernel(monkeypatch):
    """The fused layer through the alignment kernel (forced under the interpreter) matches the reference."""
    from quantkit.kernels import moe_w4a16

    monkeypatch.setattr(moe_w4a16, "ALIGN", "kernel")
    ex = qexperts(8, 64, 48, "asym", 32, seed=9)
    idx, w = routing(3, 8, 2, 5, torch.float16)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6)).to(DEV, torch.float16)
    assert rel(run_fused(ex, x, idx, w), reference(ex, x, idx, w)) < TOL[torch.float16]


def test_two_launches_and_no_host_reads(monkeypatch):
    """The fused layer is exactly two kernel launches, and its torch glue (alignment, activation, top-k sum)
    never reads a tensor on the host (no .item()/.tolist()/int()/bool(): graph-capturable, no sync)."""
    from quantkit.kernels import _launch

    E, H, FF, T, k = 8, 64, 32, 5, 2
    ex = qexperts(E, H, FF, "sym", 32)
    run = fused.stacked_for(ex, DEV)
    idx, w = routing(T, E, k, 8, torch.float16)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(8)).to(DEV, torch.float16)
    run(x, idx, w)  # compiled / interpreted once
    launches = []
    monkeypatch.setattr(_launch.Launcher, "__call__", lambda self, grid, *a: launches.append(self.fn.__name__))

    def no_host(*a):
        raise AssertionError("host read of a tensor in the fused path")

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, no_host)
    y = run(x, idx, w)
    monkeypatch.undo()
    # two GEMM launches, plus the one-launch alignment on CUDA (torch ops under the interpreter)
    assert launches.count("moe_w4a16") == 2 and set(launches) <= {"moe_w4a16", "moe_align_kernel"}, launches
    assert launches.count("moe_align_kernel") == (1 if CUDA else 0) and y.shape == x.shape


# ---- the supported set and the fallback -----------------------------------------------------------------
def test_unsupported_specs_fall_back():
    E, H, FF = 2, 64, 32
    ex = qexperts(E, H, FF, "sym", 32)
    assert fused.reason(ex) is None
    # an 8-bit expert matrix: no fused kernel
    spec, p, _ = make_int(FF, H, 8, 32, True)
    ex.expert(1).up_proj = QuantLinear(H, FF, {"format": spec}, {a: t.to(DEV) for a, t in p.items()})
    assert "1.up_proj" in fused.reason(ex) and fused.stacked_for(ex, DEV) is None
    # mixed specs (sym and asym experts)
    ex2 = qexperts(E, H, FF, "sym", 32)
    ex3 = qexperts(E, H, FF, "asym", 32)
    ex2.expert(1).down_proj = ex3.expert(1).down_proj
    assert "one spec" in fused.reason(ex2)
    # float experts, a gate function of its own (gpt-oss), biases, act-order
    assert fused.reason(Experts(_Host(), E, H, FF, True, False, True, device=DEV)) is not None
    assert "_apply_gate" in fused.reason(qexperts(E, H, FF, "sym", 32, host=_GatedHost()))
    assert "biases" in fused.reason(Experts(_Host(), E, H, FF, True, True, True, device="meta"))
    spec, p, _ = make_int(FF, H, 4, 32, False, act_order=True)
    ex4 = qexperts(E, H, FF, "asym", 32)
    ex4.expert(0).gate_proj = QuantLinear(H, FF, {"format": spec}, {a: t.to(DEV) for a, t in p.items()})
    assert fused.reason(ex4) is not None


def test_forward_falls_back_to_the_loop_exactly():
    """Unsupported experts (and CPU, calibration) run the loop: Experts.forward == forward_loop bit for bit."""
    E, H, FF, T = 4, 64, 32, 5
    ex = qexperts(E, H, FF, "sym", 32, host=_GatedHost())  # unsupported: its own gate function
    idx, w = routing(T, E, 2, 1, torch.float16)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(0)).to(DEV, torch.float16)
    with torch.no_grad():
        assert torch.equal(ex(x, idx, w), ex.forward_loop(x, idx, w))
    ok = qexperts(E, H, FF, "sym", 32)
    ok.count = torch.zeros(E, dtype=torch.long)
    with torch.no_grad():  # counting (calibration): the loop, and the counts are right
        assert torch.equal(ok(x, idx, w), ok.forward_loop(x, idx, w))
    assert ok.count.sum() == 2 * 2 * T


def test_cache_follows_weight_changes():
    E, H, FF, T = 2, 64, 32, 3
    ex = qexperts(E, H, FF, "sym", 32, seed=1)
    a = fused.stacked_for(ex, DEV)
    assert fused.stacked_for(ex, DEV) is a  # cached
    idx, w = routing(T, E, 2, 3, torch.float16)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1)).to(DEV, torch.float16)
    y0 = run_fused(ex, x, idx, w)
    other = qexperts(E, H, FF, "sym", 32, seed=2)
    ex.expert(1).down_proj.qweight = other.expert(1).down_proj.qweight.clone()  # a buffer replaced
    b = fused.stacked_for(ex, DEV)
    assert b is not a
    y1 = run_fused(ex, x, idx, w)
    assert not torch.equal(y0, y1)
    assert rel(y1, reference(ex, x, idx, w)) < TOL[torch.float16]
    ex.expert(0).gate_proj.dense_weight = ex.expert(0).gate_proj.dequantized_weight()  # calibrating
    assert fused.stacked_for(ex, DEV) is None
    ex.expert(0).gate_proj.dense_weight = None
    assert fused.stacked_for(ex, DEV) is not None


# ---- the loop: one host sync, bit-identical to the former loop ------------------------------------------
def old_loop(self, hidden_states, top_k_index, top_k_weights):
    """The former Experts.forward (one torch.where and one host sync per expert), kept as the reference."""
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        hits = torch.bincount(top_k_index.reshape(-1).clamp(0, self.num_experts),
                              minlength=self.num_experts + 1)[: self.num_experts]
        if self.count is not None:
            self.count += hits.to(self.count.device)
    for i in range(self.num_experts):
        if self.calibrate_all:
            y_all = self.run_expert(i, hidden_states)
        if int(hits[i]) == 0:
            continue
        pos, tok = torch.where(top_k_index.t() == i)
        y = y_all[tok] if self.calibrate_all else self.run_expert(i, hidden_states[tok])
        y = y * top_k_weights[tok, pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


@pytest.mark.parametrize("quant,calib_all", [(False, False), (True, False), (False, True)])
def test_loop_is_the_old_loop_bitwise(quant, calib_all):
    E, H, FF, T, k = 8, 64, 32, 13, 3
    if quant:
        ex = qexperts(E, H, FF, "asym", 32, seed=4, device="cpu")
        dt = torch.float32
    else:
        torch.manual_seed(0)
        ex = Experts(_Host(), E, H, FF, True, False, True, dtype=torch.float32)
        with torch.no_grad():
            for p in ex.parameters():
                p.normal_(0, 0.1)
        dt = torch.float32
    ex.calibrate_all = calib_all
    gen = torch.Generator().manual_seed(9)
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    idx[2, 1] = -1  # a dropped slot
    w = torch.rand(T, k, generator=gen).to(dt)
    x = torch.randn(T, H, generator=gen).to(dt)
    ex.count = torch.zeros(E, dtype=torch.long)
    new = ex.forward_loop(x, idx, w)
    c_new = ex.count.clone()
    ex.count = torch.zeros(E, dtype=torch.long)
    old = old_loop(ex, x, idx, w)
    assert torch.equal(new, old)
    assert torch.equal(c_new, ex.count)


def test_loop_syncs_once(monkeypatch):
    """forward_loop reads the routing on the host once (one .tolist()), however many experts are hit."""
    E, H, FF, T = 8, 16, 8, 9
    torch.manual_seed(0)
    ex = Experts(_Host(), E, H, FF, True, False, True)
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or real(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() in forward_loop"))
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: pytest.fail("int(tensor) in forward_loop"))
    idx = torch.stack([torch.randperm(E)[:2] for _ in range(T)])
    with torch.no_grad():
        ex.forward_loop(torch.randn(T, H), idx, torch.rand(T, 2))
    assert len(calls) == 1


# ---- CUDA only: the dispatch, no host sync, CUDA graphs --------------------------------------------------
cuda_only = pytest.mark.skipif(not CUDA, reason="QUANTKIT_TEST_CUDA=1 on a GPU machine")


@cuda_only
def test_forward_takes_the_fused_path(monkeypatch):
    E, H, FF, T = 8, 128, 64, 4
    ex = qexperts(E, H, FF, "asym", 32)
    idx, w = routing(T, E, 2, 2, torch.bfloat16)
    x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
    monkeypatch.setattr(Experts, "forward_loop", lambda *a: pytest.fail("loop taken"))
    with torch.no_grad():
        y = ex(x, idx, w)
    assert rel(y, reference(ex, x, idx, w)) < TOL[torch.bfloat16]
    monkeypatch.undo()
    ex.calibrate_all = True  # calibration: the loop
    monkeypatch.setattr(fused, "stacked_for", lambda *a: pytest.fail("fused while calibrating"))
    with torch.no_grad():
        ex(x, idx, w)


@cuda_only
@pytest.mark.parametrize("kind", ["sym", "lut"])
def test_no_host_sync_and_cuda_graph(kind):
    E, H, FF, T, k = 16, 256, 128, 8, 4
    ex = qexperts(E, H, FF, kind, 64)
    idx, w = routing(T, E, k, 5, torch.bfloat16)
    x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        y0 = ex(x, idx, w)  # builds the stack, compiles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y1 = ex(x, idx, w)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert rel(y1, y0.double()) < 1e-2  # (split-K sums with atomics: not bitwise)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            ex(x, idx, w)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = ex(x, idx, w)
        idx2, w2 = routing(T, E, k, 6, torch.bfloat16)  # new routing, replayed through the same graph
        x.copy_(torch.randn_like(x))
        idx.copy_(idx2)
        w.copy_(w2)
        g.replay()
        torch.cuda.synchronize()
        assert rel(yg, reference(ex, x, idx, w)) < TOL[torch.bfloat16]
        assert torch.equal(yg, ex(x, idx, w)) or rel(yg, ex(x, idx, w).double()) < 1e-2


def test_align_kernel_failure_falls_back_once(monkeypatch):
    """A compile failure (or mismatch) of the alignment kernel on first use warns once and keeps the torch
    ops on that device: the fused layer still matches the reference."""
    from quantkit.kernels import moe_w4a16

    def broken(*a, **k):
        raise RuntimeError("no histogram on this GPU")

    monkeypatch.setattr(moe_w4a16, "ALIGN", "kernel")
    monkeypatch.setattr(moe_w4a16, "align_kernel", broken)
    monkeypatch.setattr(moe_w4a16, "_ALIGN_OK", {})
    ex = qexperts(4, 64, 48, "sym", 32, seed=2)
    idx, w = routing(3, 4, 2, 7, torch.float16)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(DEV, torch.float16)
    with pytest.warns(UserWarning, match="alignment kernel disabled"):
        y = run_fused(ex, x, idx, w)
    assert moe_w4a16._ALIGN_OK[idx.device] is False
    assert rel(y, reference(ex, x, idx, w)) < TOL[torch.float16]
    assert rel(run_fused(ex, x, idx, w), reference(ex, x, idx, w)) < TOL[torch.float16]  # no second warning
