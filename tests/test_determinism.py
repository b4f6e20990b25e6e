"""quantize(deterministic=True) / --deterministic: deterministic kernels during the run, the previous
setting restored after it, and the choice recorded in the checkpoint's metadata."""

from __future__ import annotations

import os

import pytest
import torch

import quantkit
from quantkit import api
from quantkit.determinism import CUBLAS_DETERMINISTIC, deterministic_algorithms

from conftest import tiny_model

RECIPE = {"name": "t", "quantizer": {"type": "rtn"}, "format": {"type": "int", "bits": 4, "group_size": 16}}


def test_context_sets_and_restores(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()


def test_context_keeps_a_users_setting(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with pytest.raises(RuntimeError, match="boom"), deterministic_algorithms(True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        raise RuntimeError("boom")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # the user's value, untouched
    assert not torch.are_deterministic_algorithms_enabled()  # restored after an error too


@pytest.mark.parametrize("flag", [True, False])
def test_quantize_runs_under_the_flag_and_records_it(flag, calib_ids, tmp_path, monkeypatch):
    seen = []
    real = api.quantize_model

    def spy(*a, **k):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*a, **k)

    monkeypatch.setattr(api, "quantize_model", spy)
    qm = quantkit.quantize(tiny_model("llama"), RECIPE, calibration=calib_ids, device="cpu", progress=False,
                           deterministic=flag)
    assert seen == [flag]
    assert not torch.are_deterministic_algorithms_enabled()
    assert qm.meta["deterministic"] is flag
    qm.save(str(tmp_path / "ck"))
    assert quantkit.load(str(tmp_path / "ck")).meta["deterministic"] is flag


def test_cli_flag_reaches_the_runner_with_the_process_set_up(monkeypatch):
    """`quantkit run --deterministic`: the runner gets the flag, and cuBLAS's variable is set before it starts
    (it evaluates the float model on the GPU before quantizing, and torch reads the variable once)."""
    from quantkit import cli

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "x")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # absent now, and absent again after the test
    got = {}

    def fake_run(*a, **k):
        got.update(k, env=os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        raise SystemExit(0)

    monkeypatch.setattr("quantkit.runner.run", fake_run)
    with pytest.raises(SystemExit):
        cli.main(["run", "smollm2-135m", "-r", "w4a16-rtn", "-o", "x", "--deterministic"])
    assert got["deterministic"] is True
    assert got["env"] == CUBLAS_DETERMINISTIC
