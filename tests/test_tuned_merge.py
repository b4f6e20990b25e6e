"""bench/tuned_merge.py: a swept config replaces the shipped one only where it beat it by the margin
in every run (and the best worst-run one wins); runs of two devices are refused."""

from __future__ import annotations

import json

import pytest
from _guards import load_bench

tm = load_bench("tuned_merge", "tuned_merge")


def run(times: dict, dev="GPU X"):
    """One sweep run: key -> {candidate: us}."""
    rows = [{"keys": {"int4": k}, "int4": {n: {"us": us, "cfg": {"name": n}} for n, us in c.items()}}
            for k, c in times.items()]
    return {"info": {"device": dev}, "rows": rows}


def test_margin_in_every_run():
    r1 = run({"a:m256": {"tuned": 10.0, "x": 8.0, "y": 9.0}, "b:m512": {"tuned": 10.0, "x": 9.6}})
    r2 = run({"a:m256": {"tuned": 10.0, "x": 9.8, "y": 9.0}, "b:m512": {"tuned": 10.0, "x": 9.0}})
    new, kept, log = tm.picks([r1, r2], 0.05)
    # a: x won one run by 25 % but only 2 % in the other; y won both by 11 %: y. b: 4 % in one run: kept
    assert new == {"a:m256": {"name": "y"}}
    assert kept == {"b:m512": {"name": "tuned"}}
    assert any("b:m512: shipped kept" in line for line in log)


def test_missing_from_a_run_is_skipped():
    r1 = run({"a:m256": {"tuned": 10.0, "x": 5.0}})
    r2 = run({"c:m64": {"tuned": 10.0, "x": 5.0}})
    assert tm.picks([r1, r2], 0.05)[0] == {}


def test_cli_writes_table_and_refuses_mixed_devices(tmp_path):
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"a:m256": {"name": "old"}, "z:m1": {"name": "keep"}}))
    p1, p2 = tmp_path / "1.json", tmp_path / "2.json"
    p1.write_text(json.dumps(run({"a:m256": {"tuned": 10.0, "x": 5.0}})))
    p2.write_text(json.dumps(run({"a:m256": {"tuned": 10.0, "x": 6.0}})))
    assert tm.main([str(table), str(p1), str(p2)]) == 0
    assert json.loads(table.read_text()) == {"a:m256": {"name": "x"}, "z:m1": {"name": "keep"}}
    # a kept shipped config: recorded where the table had no entry (it was the default), untouched where it had
    p1.write_text(json.dumps(run({"a:m256": {"tuned": 10.0, "x": 9.9}, "n:m1024": {"tuned": 10.0, "x": 9.9}})))
    p2.write_text(json.dumps(run({"a:m256": {"tuned": 10.0, "x": 9.9}, "n:m1024": {"tuned": 10.0, "x": 9.9}})))
    assert tm.main([str(table), str(p1), str(p2)]) == 0
    assert json.loads(table.read_text()) == {"a:m256": {"name": "x"}, "z:m1": {"name": "keep"},
                                             "n:m1024": {"name": "tuned"}}
    p2.write_text(json.dumps(run({"a:m256": {"tuned": 10.0, "x": 6.0}}, dev="GPU Y")))
    with pytest.raises(SystemExit, match="different devices"):
        tm.main([str(table), str(p1), str(p2)])
