"""The output error in row pieces (issue 17): the same sums as the whole-matrix formula."""

import pytest
import torch

from quantkit.quantizers import base
from quantkit.quantizers.base import LayerStats, output_error_terms


def _whole(w, q, stats):  # the formula before the row pieces: weight-sized products
    d = (w - q).float()
    if stats.hessian is not None:
        h = stats.hessian
        return float(torch.sum((d @ h) * d)), float(torch.sum((w.float() @ h) * w.float()))
    if stats.col_weight is not None:
        cw = stats.col_weight
        return float(torch.sum(d.pow(2) * cw)), float(torch.sum(w.float().pow(2) * cw))
    return float(d.pow(2).sum()), float(w.float().pow(2).sum())


def _case(out, n, kind, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g).to(dtype)
    q = (w.float() + 0.05 * torch.randn(out, n, generator=g)).to(dtype)
    x = torch.randn(4 * n, n, generator=g)
    stats = LayerStats(nsamples=x.shape[0])
    if kind == "hessian":
        stats.hessian = x.T @ x
    elif kind == "diag":
        stats.act_sqsum = x.pow(2).sum(0)
    return w, q, stats


@pytest.mark.parametrize("kind", ["hessian", "diag", "none"])
@pytest.mark.parametrize("out,rows", [(300, 64), (257, 256), (100, 1), (64, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_pieces_equal_whole(kind, out, rows, dtype):
    w, q, stats = _case(out, 96, kind, dtype)
    ref = _whole(w, q, stats)
    got = output_error_terms(w, q, stats, rows=rows)
    for a, b in zip(got, ref):
        assert a == pytest.approx(b, rel=1e-6, abs=0)


def test_default_pieces_and_one_piece_bit_identical():
    w, q, stats = _case(1200, 64, "hessian")  # > OUTPUT_ERROR_ROWS: several pieces by default
    assert w.shape[0] > base.OUTPUT_ERROR_ROWS
    ref = _whole(w, q, stats)
    for a, b in zip(output_error_terms(w, q, stats), ref):
        assert a == pytest.approx(b, rel=1e-6, abs=0)
    # a weight of one piece: the very sums of the whole-matrix formula
    t = w[:200], q[:200]
    one = output_error_terms(*t, stats, rows=512)
    d = (t[0] - t[1]).float()
    assert one[0] == float(torch.sum((d @ stats.hessian) * d))


def test_a_skipped_or_doubled_piece_is_caught():
    """The comparison above is sharp enough to see a wrong sum of pieces."""
    w, q, stats = _case(300, 96, "hessian")
    ref = _whole(w, q, stats)
    rows = 64
    skipped = output_error_terms(w[rows:], q[rows:], stats, rows=rows)  # the first piece left out
    assert skipped[0] != pytest.approx(ref[0], rel=1e-6, abs=0)
    assert skipped[1] != pytest.approx(ref[1], rel=1e-6, abs=0)
    doubled = [a + b for a, b in zip(output_error_terms(w, q, stats, rows=rows),
                                     output_error_terms(w[-rows:], q[-rows:], stats, rows=rows))]
    assert doubled[0] != pytest.approx(ref[0], rel=1e-6, abs=0)


def test_rows_must_be_positive():
    w, q, stats = _case(8, 8, "none")
    with pytest.raises(ValueError):
        output_error_terms(w, q, stats, rows=0)
