"""bench/recon_matrix.py's pure parts on CPU: grouping rows by seed (mean and spread between seeds)."""

from __future__ import annotations

import math

import pytest
from _guards import load_bench


@pytest.fixture(scope="module")
def RM():
    return load_bench("recon_matrix")


def row(label, ppl, seed=None, d=None):
    settings = {} if seed is None else {"seed": seed}
    r = {"label": label, "tool": label.split(":")[0], "settings": settings, "ppl": ppl}
    if d is not None:
        r["tasks"] = {"arc_easy": {"d_correct": d, "d_correct_norm": -d}}
    return r


def test_seed_groups_mean_and_sd(RM):
    rows = [row("float", 23.0),
            row("qk:bits=4,iters=30,seed=0", 25.0, 0, -1.0),
            row("qk:bits=4,iters=30,seed=1", 26.0, 1, -3.0),
            row("qk:bits=4,iters=30,seed=2", 27.0, 2, 1.0),
            row("qk:bits=3,iters=30,seed=0", 40.0, 0, -5.0),   # another method: its own group (of one: left out)
            row("qk:bits=4,iters=60,seed=0", 24.0, 0)]         # another setting: not pooled with iters=30
    g = RM.seed_groups(rows)
    assert len(g) == 1 and g[0]["n"] == 3 and g[0]["seeds"] == [0, 1, 2]
    assert g[0]["group"] == "qk:bits=4,iters=30"
    assert math.isclose(g[0]["ppl"]["mean"], 26.0) and math.isclose(g[0]["ppl"]["sd"], 1.0)
    assert math.isclose(g[0]["arc_easy d_correct"]["mean"], -1.0)
    assert math.isclose(g[0]["arc_easy d_correct"]["sd"], 2.0)
    assert math.isclose(g[0]["arc_easy d_correct_norm"]["mean"], 1.0)


def test_seed_first_in_label_and_failed_rows(RM):
    rows = [row("qk:seed=0,bits=4", 25.0, 0), row("qk:seed=1,bits=4", 25.5, 1),
            {"label": "qk:seed=2,bits=4", "tool": "qk", "settings": {"seed": 2}, "error": "boom"}]
    g = RM.seed_groups(rows)
    assert len(g) == 1 and g[0]["group"] == "qk:bits=4" and g[0]["n"] == 2
    assert "arc_easy d_correct" not in g[0]  # no task scores: only the perplexity
