"""GPTQ against a plain (unblocked, float64, explicit inverse) reference implementation."""

import pytest
import torch

from quantkit.errors import NumericalError
from quantkit.formats.base import format_from_spec
from quantkit.quantizers.base import LayerStats
from quantkit.quantizers.gptq import GPTQ
from quantkit.quantizers.rtn import RTN


def real_looking_stats(cols: int, n: int = 2048, seed: int = 0) -> LayerStats:
    """Correlated activations with a decaying spectrum and a few outlier channels, like LLM inputs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) * (torch.arange(cols) + 1.0).pow(-0.7)
    x = z @ mix
    x[:, torch.randperm(cols, generator=g)[:3]] *= 12.0
    return LayerStats(n, (x.T @ x).float(), (x * x).sum(0).float(), x.abs().amax(0).float())


def objective(w, q, h):
    d = (w - q).double()
    return float(torch.sum((d @ h.double()) * d))


def reference_gptq(w, h, fmt, damp=0.01, order=None):
    """Textbook GPTQ/OBQ: quantize columns in ``order``; after each, update the remaining columns
    with the explicit inverse Hessian and remove the column from it. Group params (natural groups)
    are fitted on the current, updated weights when a group's first column comes up (no act-order)."""
    W = w.double().clone()
    H = h.double().clone() / 1.0
    cols = W.shape[1]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    order = list(range(cols)) if order is None else order
    Q = torch.zeros_like(W)
    remaining = list(order)
    layer = fmt.begin_layer(W.float(), None)
    groups = fmt.cfg.groups(cols)
    gsz = groups[0][1] - groups[0][0]
    params = {}
    for i in order:
        gi = i // gsz
        if gi not in params:
            s, e = groups[gi]
            params[gi] = fmt.fit_group(W[:, s:e].float(), None, layer)
        _, dq = fmt.quantize(W[:, i:i + 1].float(), params[gi], layer)
        dq = dq.double()
        Q[:, i:i + 1] = dq
        remaining.remove(i)
        err = (W[:, i] - dq[:, 0]) / Hinv[i, i]
        for j in remaining:
            W[:, j] -= err * Hinv[i, j]
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return Q


@pytest.mark.parametrize("fmt_spec", [
    {"type": "int", "bits": 4, "group_size": None, "sym": True},
    {"type": "int", "bits": 3, "group_size": 32, "sym": False},
])
def test_gptq_matches_reference(fmt_spec):
    torch.manual_seed(0)
    rows, cols = 24, 96
    w = torch.randn(rows, cols)
    stats = real_looking_stats(cols)
    fmt = format_from_spec(fmt_spec)
    q = GPTQ(GPTQ.Config(act_order=False, block_size=32)).quantize(w, fmt, stats).weight
    ref = reference_gptq(w, stats.hessian / stats.nsamples, fmt).float()
    same = (q - ref).abs() < 1e-4 * w.abs().max()
    assert same.float().mean() > 0.98, f"only {same.float().mean():.3f} of weights agree with the reference"
    h = stats.hessian / stats.nsamples
    assert objective(w, q, h) == pytest.approx(objective(w, ref, h), rel=0.02)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,g", [(4, 32), (3, 32), (4, None), (2, 16)])
def test_gptq_objective_beats_rtn(act_order, bits, g):
    torch.manual_seed(1)
    w = torch.randn(32, 128)
    stats = real_looking_stats(128, seed=2)
    fmt = format_from_spec({"type": "int", "bits": bits, "group_size": g, "sym": False})
    h = stats.hessian / stats.nsamples
    q_gptq = GPTQ(GPTQ.Config(act_order=act_order)).quantize(w, fmt, stats)
    q_rtn = RTN(RTN.Config()).quantize(w, fmt, stats)
    assert objective(w, q_gptq.weight, h) < 0.8 * objective(w, q_rtn.weight, h)
    assert q_gptq.metrics["rel_err"] < q_rtn.metrics["rel_err"]
    # the stored tensors reproduce the weight GPTQ computed with
    assert torch.equal(fmt.unpack(q_gptq.packed, tuple(w.shape)), q_gptq.weight)


def test_act_order_dynamic_groups_store_g_idx():
    torch.manual_seed(0)
    w = torch.randn(16, 96)
    stats = real_looking_stats(96)
    fmt = format_from_spec({"type": "int", "bits": 4, "group_size": 32})
    res = GPTQ(GPTQ.Config(act_order=True, static_groups=False)).quantize(w, fmt, stats)
    assert "g_idx" in res.packed and res.packed["g_idx"].shape == (96,)
    assert torch.equal(fmt.unpack(res.packed, (16, 96)), res.weight)
    res_static = GPTQ(GPTQ.Config(act_order=True, static_groups=True)).quantize(w, fmt, stats)
    assert "g_idx" not in res_static.packed


def test_partial_last_group_under_gptq():
    torch.manual_seed(0)
    w = torch.randn(8, 200)
    stats = real_looking_stats(200)
    fmt = format_from_spec({"type": "int", "bits": 4, "group_size": 64})
    for ao in (False, True):
        res = GPTQ(GPTQ.Config(act_order=ao)).quantize(w, fmt, stats)
        assert res.packed["scales"].shape == (8, 4)
        assert torch.equal(fmt.unpack(res.packed, (8, 200)), res.weight)


def test_not_positive_definite_is_clear_error():
    w = torch.randn(4, 8)
    h = -torch.eye(8) * 5  # negative definite: dampening cannot fix it
    stats = LayerStats(10, h, torch.ones(8), torch.ones(8))
    fmt = format_from_spec({"type": "int", "bits": 4, "group_size": None})
    with pytest.raises(NumericalError, match="not positive definite"):
        GPTQ(GPTQ.Config(damp_retries=1)).quantize(w, fmt, stats)


def test_singular_hessian_recovers_with_damping():
    w = torch.randn(4, 8)
    x = torch.randn(3, 8)  # rank 3 < 8
    stats = LayerStats(3, x.T @ x, (x * x).sum(0), x.abs().amax(0))
    fmt = format_from_spec({"type": "int", "bits": 4, "group_size": None})
    res = GPTQ(GPTQ.Config()).quantize(w, fmt, stats)
    assert torch.isfinite(res.weight).all()


def test_nan_hessian_rejected():
    w = torch.randn(4, 8)
    h = torch.eye(8)
    h[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        GPTQ(GPTQ.Config()).quantize(w, format_from_spec({"type": "int", "bits": 4, "group_size": None}),
                                     LayerStats(4, h, torch.ones(8), torch.ones(8)))
