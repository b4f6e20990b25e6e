"""The Hadamard-type transforms behind QuIP: orthogonal for every size, exactly invertible."""

from __future__ import annotations

import math

import pytest
import torch

from quantkit.errors import CheckpointError
from quantkit.transforms.hadamard import (
    HadamardPlan,
    dense_matrix,
    fwht,
    hadamard_transform,
    pack_signs,
    plan,
    random_signs,
    small_hadamard,
    unpack_signs,
)
from quantkit.transforms.quip import rotate_weight, unrotate_weight

# powers of two, Paley orders (12, 20, 28, 36, 44), Hadamard x 2^k (24, 40, 160, 192, 576, 640, 1536),
# and sizes with no Hadamard factor (DCT fallback: 9, 46, 92)
SIZES = [1, 2, 8, 12, 20, 24, 28, 36, 40, 44, 64, 160, 192, 256, 576, 640, 9, 46, 92]


def _sylvester_ref(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(p)


@pytest.mark.parametrize("n", SIZES)
def test_orthogonal(n):
    t = dense_matrix(n)
    assert torch.allclose(t @ t.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    pl = plan(n)
    assert pl.m * pl.p == n and pl.p & (pl.p - 1) == 0
    if pl.kind == "hadamard":  # flat: every entry ±1/sqrt(n) (maximally incoherent)
        assert torch.allclose(t.abs(), torch.full_like(t, 1 / math.sqrt(n)), atol=1e-12)
    else:  # DCT factor: entries at most sqrt(2/n)
        assert t.abs().max() <= math.sqrt(2 / n) + 1e-12


@pytest.mark.parametrize("m", [12, 20, 28, 36, 44, 60, 68, 76, 84])
def test_paley_matrices(m):
    h = small_hadamard(m)
    assert h is not None and set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.t(), m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("p", [2, 16, 64, 256, 2048])
def test_power_of_two_is_sylvester(p):
    x = torch.randn(3, p, dtype=torch.float64)
    ref = x @ _sylvester_ref(p).t()
    assert torch.allclose(hadamard_transform(x, plan(p)), ref, atol=1e-12)
    assert torch.allclose(fwht(x), ref, atol=1e-12)


@pytest.mark.parametrize("n", [12, 40, 192, 576, 640, 92])
def test_kronecker_structure(n):
    pl = plan(n)
    k = pl.small(dtype=torch.float64)
    ref = torch.kron(k, _sylvester_ref(pl.p))
    assert torch.allclose(dense_matrix(n), ref, atol=1e-12)


@pytest.mark.parametrize("n", [12, 24, 576, 640, 1536, 92])
def test_inverse_restores_float32(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 5, n, generator=g)
    y = hadamard_transform(x, plan(n))
    assert y.shape == x.shape and y.dtype == torch.float32
    back = hadamard_transform(y, plan(n), transpose=True)
    assert (back - x).abs().max() < 1e-5 * x.abs().max()
    # against the dense float64 matrix
    ref = x.double() @ dense_matrix(n).t()
    assert (y.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("shape", [(192, 576), (576, 1536), (1536, 576), (40, 92), (24, 9)])
def test_two_sided_rotation_round_trip(shape):
    out_f, in_f = shape
    w = torch.randn(out_f, in_f)
    su, sv = random_signs(out_f, 1), random_signs(in_f, 2)
    wr = rotate_weight(w, su, sv, plan(out_f), plan(in_f))
    # the rotation is U W Vᵀ with dense references
    u = dense_matrix(out_f) * su.double().view(1, -1)
    v = dense_matrix(in_f) * sv.double().view(1, -1)
    assert torch.allclose(wr.double(), u @ w.double() @ v.t(), atol=1e-5)
    back = unrotate_weight(wr, su, sv, plan(out_f), plan(in_f))
    assert (back - w).abs().max() < 1e-5 * w.abs().max()
    assert torch.allclose(torch.linalg.matrix_norm(wr), torch.linalg.matrix_norm(w), rtol=1e-5)


@pytest.mark.parametrize("n", [1, 7, 8, 13, 576])
def test_sign_packing(n):
    s = random_signs(n, n)
    assert set(s.unique().tolist()) <= {-1.0, 1.0}
    packed = pack_signs(s)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_signs(packed, n), s)
    assert torch.equal(random_signs(n, n), s)  # reproducible


def test_bad_plans_and_signs_rejected():
    with pytest.raises(CheckpointError):
        HadamardPlan.from_spec({"n": 576, "m": 9, "kind": "hadamard"})  # 9 is no Hadamard order
    with pytest.raises(CheckpointError):
        HadamardPlan.from_spec({"n": 576, "m": 12, "kind": "hadamard"})  # 48 is not a power of two
    with pytest.raises(CheckpointError):
        HadamardPlan.from_spec({"n": 576})
    with pytest.raises(CheckpointError):
        unpack_signs(torch.zeros(3, dtype=torch.uint8), 576)
