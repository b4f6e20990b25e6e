"""recon's training step as a CUDA graph (transforms/_recon_train.py): on CUDA it is captured and replayed
and reaches what eager steps reach; elsewhere (and with ``cuda_graph: off``) steps run eagerly. The GPU
test: QUANTKIT_TEST_CUDA=1 python3 -m pytest tests/test_recon_graph.py on a CUDA machine."""

from __future__ import annotations

import os

import pytest
import torch

import quantkit
from quantkit.errors import RecipeError
from quantkit.transforms._recon_parts import _Sampler

from conftest import tiny_model

IDS = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(1))
GPU = os.environ.get("QUANTKIT_TEST_CUDA") == "1" and torch.cuda.is_available()


def _recipe(**kw):
    return {"quantizer": "gptq", "format": {"type": "int", "bits": 3, "group_size": 32, "sym": False},
            "calibration": {"samples": 16, "seq_len": 32},
            "block_plugins": [{"type": "recon", "iters": 40, "batch_size": 4, **kw}]}


def _run(recipe, device=None):
    return quantkit.quantize(tiny_model("llama"), recipe, calibration=IDS, progress=False, device=device)


def test_cpu_steps_are_eager_and_option_parses():
    blocks = _run(_recipe(iters=6), "cpu").report.blocks
    assert all(b["recon_graph"] == 0.0 and b["recon_steps"] == 6 for b in blocks)
    blocks = _run(_recipe(iters=6, cuda_graph="off"), "cpu").report.blocks
    assert all(b["recon_graph"] == 0.0 for b in blocks)
    with pytest.raises(RecipeError, match="cuda_graph"):
        _run(_recipe(cuda_graph="always"))


def test_sampler_fixed_shape():
    h = [torch.zeros(4, 8, 2), torch.zeros(4, 8, 2)]
    per_seq = [{"m": torch.zeros(4, 8)}, {"m": torch.zeros(4, 8)}]
    assert _Sampler(h, per_seq, h, 4, 0).fixed_shape()
    assert _Sampler(h, per_seq, h, 2, 0).fixed_shape()
    h2 = [torch.zeros(4, 8, 2), torch.zeros(2, 8, 2)]  # a short last batch: draws of 4 and of 2 rows
    assert not _Sampler(h2, [{"m": torch.zeros(4, 8)}, {"m": torch.zeros(2, 8)}], h2, 4, 0).fixed_shape()
    assert _Sampler(h2, [{"m": torch.zeros(4, 8)}, {"m": torch.zeros(2, 8)}], h2, 2, 0).fixed_shape()
    shared = [{"m": torch.zeros(1, 8)}, {"m": torch.zeros(1, 8)}]  # nothing per sequence: rows mixed
    assert _Sampler(h2, shared, h2, 4, 0).fixed_shape()


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and QUANTKIT_TEST_CUDA=1")
@pytest.mark.parametrize("kw", [{}, {"learn_norms": True}, {"loss": "token"}, {"patience": 3}])
def test_graph_matches_eager_on_cuda(kw):
    """Captured and replayed: every block says so, runs its steps (early stop: to a multiple of 16 or the
    end), and lands where eager steps land (the same kernels: equal up to the GPU's atomics)."""
    g = _run(_recipe(**kw), "cuda").report.blocks
    e = _run(_recipe(cuda_graph="off", **kw), "cuda").report.blocks
    for bg, be in zip(g, e):
        assert bg["recon_graph"] == 1.0 and be["recon_graph"] == 0.0
        if "patience" in kw:
            assert bg["recon_steps"] >= be["recon_steps"]
            assert bg["recon_steps"] == 40 or bg["recon_steps"] % 16 == 0
        else:
            assert bg["recon_steps"] == be["recon_steps"] == 40
            assert bg["recon_best_batch_loss"] == pytest.approx(be["recon_best_batch_loss"], rel=0.02)
            assert bg["recon_err_after"] == pytest.approx(be["recon_err_after"], rel=0.02)
        assert bg["recon_err_after"] <= bg["recon_err_before"]
