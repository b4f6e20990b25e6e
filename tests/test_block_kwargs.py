"""Every block is calibrated with the keyword arguments the model itself gives that block. Gemma 2/3
(and GPT-OSS) give local and global layers different RoPE tables and masks: calibrating every block
with the first block's arguments (the old capture) quantized the global layers of a different model."""

from __future__ import annotations

import pytest
import torch

from quantkit.capture import _same_tree, capture_block_inputs
from quantkit.errors import QuantkitError
from quantkit.models.discovery import find_blocks
from quantkit.pipeline import capture

from conftest import tiny_config, tiny_model

IDS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))


def _gemma_mixed():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("gemma3")
    cfg.num_hidden_layers = 3
    cfg.sliding_window = 8  # shorter than the 32-token batches: the masks differ too
    cfg.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _real_kwargs(model, blocks, batches):
    """What the model's own forward passes each block, per batch (a pre-hook on every block)."""
    got = [[] for _ in blocks]
    hooks = [b.register_forward_pre_hook(lambda m, a, kw, i=i: got[i].append(
        {k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values", "past_key_value",
                                                   "layer_past", "use_cache", "cache")}), with_kwargs=True)
             for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return got


def _strip(kw):
    return {k: v for k, v in kw.items() if k not in ("use_cache", "cache")}


def test_each_block_gets_its_own_layer_types_arguments():
    model = _gemma_mixed()
    _, blocks = find_blocks(model)
    batches = list(IDS.split(1))
    _, per = capture(model, blocks, batches, torch.device("cpu"))
    real = _real_kwargs(model, blocks, batches)
    assert len(per) == 3
    for i in range(3):
        for j in range(len(batches)):
            assert _same_tree(_strip(per[i][j]), real[i][j]), (i, j)
    # the global layer's arguments differ from the local ones', the two local layers share one dict
    assert not _same_tree(per[1][0], per[0][0])
    assert per[2][0] is per[0][0]
    # the blocks run unchanged afterwards (the recorders are gone)
    with torch.no_grad():
        out = model(input_ids=IDS, use_cache=False).logits
    assert torch.isfinite(out).all() and out.shape == (2, 32, 256)


def test_uniform_models_share_one_dict_per_batch():
    model = tiny_model("llama").eval()
    _, blocks = find_blocks(model)
    _, per = capture(model, blocks, list(IDS.split(1)), torch.device("cpu"))
    assert all(per[i][j] is per[0][j] for i in range(len(per)) for j in range(2))


def test_failing_record_pass_refused_for_mixed_layer_types(monkeypatch):
    """A model that cannot run with its blocks skipped: with several layer types in its config it is
    refused by name rather than calibrated with the wrong arguments."""
    model = _gemma_mixed()
    _, blocks = find_blocks(model)
    def boom(*a, **k):
        raise RuntimeError("needs real block outputs")
    # the pass reaches the last block only through the others; make the second one's recorder fail by
    # breaking the model between blocks: a hook on block 1 that raises
    h = blocks[1].register_forward_pre_hook(lambda *a: boom())
    try:
        with pytest.raises(QuantkitError, match="layer type"):
            capture(model, blocks, list(IDS.split(1)), torch.device("cpu"))
    finally:
        h.remove()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_one_pass_hidden_states_are_the_first_blocks_inputs(arch):
    """The recorder pass keeps block 0's hidden states too: the same as running the model to block 0."""
    model = _gemma_mixed() if arch == "gemma3" else tiny_model(arch).eval()
    _, blocks = find_blocks(model)
    batches = list(IDS.split(1))
    hs, per = capture(model, blocks, batches, torch.device("cpu"))
    ref_h, ref_kw = capture_block_inputs(model, blocks, batches, "cpu", "cpu")
    for h, r in zip(hs, ref_h):
        assert torch.equal(h, r)
    for kw, r in zip(per[0], ref_kw):
        assert _same_tree(kw, r)


def test_failing_record_pass_falls_back_for_uniform_models():
    """One layer type: a failed recorder pass warns, and the model run to block 0 gives the hidden states;
    its arguments serve every block."""
    model = tiny_model("llama").eval()
    _, blocks = find_blocks(model)
    batches = list(IDS.split(1))
    ref, _ = capture(model, blocks, batches, torch.device("cpu"))

    def boom(*a):
        raise RuntimeError("needs real block outputs")

    h = blocks[1].register_forward_pre_hook(boom)
    try:
        with pytest.warns(UserWarning, match="could not record"):
            hs, per = capture(model, blocks, batches, torch.device("cpu"))
    finally:
        h.remove()
    assert all(torch.equal(a, b) for a, b in zip(hs, ref))
    assert all(per[i][j] is per[0][j] for i in range(len(per)) for j in range(len(batches)))
