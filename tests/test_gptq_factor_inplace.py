"""GPTQ's Hessian factor computed in place on CPU (issue 17: one n x n matrix alive instead of two) gives
the same U, bit for bit, as the two-matrix path (frozen below as ``_two_matrix_factor``), for sizes around
the block edges, with dead columns, after a damping retry and through GPTQ.quantize."""

import pytest
import torch

from quantkit.errors import NumericalError
from quantkit.formats.base import format_from_spec
from quantkit.quantizers import gptq as gptq_mod
from quantkit.quantizers.base import LayerStats, all_finite
from quantkit.quantizers.gptq import GPTQ, _flip_, _inverse_factor, _inverse_flipped_


def _two_matrix_factor(make, damp: float, retries: int):
    """``_inverse_factor`` as of commit 0cc84a8 (before the in-place path), frozen as the reference."""
    h = make()
    mean_diag = torch.mean(torch.diagonal(h)).item()
    n = h.shape[0]
    d = damp
    for attempt in range(retries + 1):
        A = _flip_(h if attempt == 0 else make())
        h = None
        A.diagonal().add_(d * mean_diag)
        K, info = torch.linalg.cholesky_ex(A)
        del A
        if int(info) == 0:
            U = torch.eye(n, device=K.device, dtype=K.dtype).t()
            torch.linalg.solve_triangular(K, U, upper=False, out=U)
            del K
            U = _flip_(U)
            if all_finite(U):
                return U, d
            del U
        else:
            del K
        d *= 10
    raise NumericalError("not positive definite")


def _hessian(n: int, seed: int, dead=(), indefinite: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * (torch.arange(n) + 1.0).pow(-0.6)
    x = torch.randn(max(8, n // 2), n, generator=g) @ mix
    x[:, list(dead)] = 0
    h = x.T @ x / x.shape[0]
    h.diagonal()[list(dead)] = 1
    if indefinite:
        h -= indefinite * torch.diagonal(h).mean() * torch.eye(n)
    return h


@pytest.mark.parametrize("n,block", [(1024, 256), (1100, 256), (1280, 512), (1037, 100), (1024, 2048)])
def test_inplace_factor_bit_identical(monkeypatch, n, block):
    monkeypatch.setattr(gptq_mod, "INPLACE_BLOCK", block)
    h = _hessian(n, seed=n, dead=(3, n - 2))
    want, dw = _two_matrix_factor(h.clone, 0.01, 3)
    got, dg = _inverse_factor(h.clone, 0.01, 3)
    assert dw == dg and got.stride() == want.stride() and got.shape == want.shape
    assert torch.equal(got, want)
    assert torch.equal(got.tril(-1), torch.zeros_like(got))


def test_inplace_factor_after_damping_retry():
    h = _hessian(1024, seed=9, indefinite=0.05)  # not positive definite at the first dampening
    want, dw = _two_matrix_factor(h.clone, 0.01, 3)
    got, dg = _inverse_factor(h.clone, 0.01, 3)
    assert dw == dg > 0.01 and torch.equal(got, want)


def test_inplace_factor_uses_one_matrix():
    """The factor lives in the storage of the matrix handed over (the Cholesky factor and U are written
    over it); the other allocations are an n x block slice, a block x block mask and an n-vector."""
    n = 1024
    h = _hessian(n, seed=2)
    made = []

    def make():
        made.append(h.clone())
        return made[-1]
    U, _ = _inverse_factor(make, 0.01, 0)
    assert len(made) == 1 and U.untyped_storage().data_ptr() == made[0].untyped_storage().data_ptr()


def test_inverse_flipped_alone_matches_inverse():
    n = 300
    h = _hessian(n, seed=4) + torch.eye(n)
    K = torch.linalg.cholesky(h)  # column-major, zeros above the diagonal
    want = torch.linalg.inv(K).flip(0, 1)
    got = _inverse_flipped_(K.clone(), block=64)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_threshold_keeps_small_matrices_on_the_old_path(monkeypatch):
    calls = []
    real = gptq_mod._inverse_flipped_
    monkeypatch.setattr(gptq_mod, "_inverse_flipped_", lambda K, block=None: calls.append(K.shape[0]) or real(K, block))
    fmt = format_from_spec({"type": "int", "bits": 4, "group_size": 32, "sym": True})

    def stats(n):
        x = torch.randn(2 * n, n, generator=torch.Generator().manual_seed(n))
        return LayerStats(2 * n, (x.T @ x).float(), (x * x).sum(0).float(), x.abs().amax(0).float())
    GPTQ(GPTQ.Config()).quantize(torch.randn(8, 256), fmt, stats(256))
    assert calls == []
    monkeypatch.setattr(gptq_mod, "INPLACE_FACTOR_MIN", 256)
    res_in = GPTQ(GPTQ.Config()).quantize(torch.randn(8, 256, generator=torch.Generator().manual_seed(1)), fmt,
                                           stats(256))
    assert calls == [256]
    monkeypatch.setattr(gptq_mod, "INPLACE_FACTOR_MIN", 1 << 30)
    res_old = GPTQ(GPTQ.Config()).quantize(torch.randn(8, 256, generator=torch.Generator().manual_seed(1)), fmt,
                                            stats(256))
    for k in res_old.packed:
        assert torch.equal(res_in.packed[k], res_old.packed[k]), k
    assert torch.equal(res_in.weight, res_old.weight) and res_in.metrics == res_old.metrics
