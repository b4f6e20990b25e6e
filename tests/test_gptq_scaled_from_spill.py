"""GPTQ's scaled Hessian built from the spill file's rows (issue 17): bit for bit the copy made from memory,
and the Hessian is not in memory while it is built."""

import pytest
import torch

from quantkit.formats.base import format_from_spec
from quantkit.quantizers import gptq as gptq_mod
from quantkit.quantizers.base import LayerStats
from quantkit.quantizers.gptq import GPTQ, _HessianSpill, _scaled_hessian


def _stats(n=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g)
    x[:, 5] = 0  # a dead column
    return LayerStats(nsamples=x.shape[0], hessian=x.T @ x)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("chunk_bytes", [1, 72 * 4 * 7, 16 << 20])
def test_scaled_from_spill_bit_identical(act_order, chunk_bytes):
    stats = _stats()
    h = stats.hessian.clone()
    diag = torch.diagonal(h).div(stats.nsamples)
    dead = diag == 0
    perm = torch.argsort(torch.where(dead, torch.ones_like(diag), diag), descending=True) if act_order else None
    want = _scaled_hessian(h, stats.nsamples, perm, dead, chunk_bytes=chunk_bytes)
    sp = _HessianSpill(stats)
    sp.out()
    assert sp.spilled() and stats.hessian is None
    got = _scaled_hessian(sp, stats.nsamples, perm, dead, chunk_bytes=chunk_bytes)
    assert torch.equal(got, want)
    sp.close()
    assert torch.equal(stats.hessian, h)


def test_factor_builds_the_copy_with_the_hessian_on_disk(monkeypatch):
    monkeypatch.setattr(gptq_mod, "SPILL_MIN_BYTES", 0)
    seen = []
    real = gptq_mod._scaled_hessian

    def spy(h, *a, **k):
        seen.append((isinstance(h, _HessianSpill), stats.hessian is None))
        return real(h, *a, **k)

    monkeypatch.setattr(gptq_mod, "_scaled_hessian", spy)
    stats = _stats()
    w = torch.randn(16, 72, generator=torch.Generator().manual_seed(1))
    fmt = format_from_spec({"type": "int", "bits": 4, "group_size": 24, "sym": True})
    GPTQ(GPTQ.Config(act_order=True)).quantize(w, fmt, stats)
    assert seen == [(True, True)]
    assert stats.hessian is not None  # read back for the output error and after
