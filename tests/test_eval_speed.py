"""cached_dequant gives bit-identical outputs and puts every layer back."""

import torch

import quantkit
from quantkit.eval.speed import cached_dequant
from quantkit.nn import QuantLinear


def test_cached_dequant_is_exact(tiny_llama, calib_ids):
    qm = quantkit.quantize(tiny_llama, {"quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": 32}},
                           calibration=calib_ids, device="cpu", progress=False)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = qm.model(input_ids=x).logits
        with cached_dequant(qm.model) as n:
            assert n == len(qm.quantized_layers()) > 0
            assert all(m.dense_weight is not None for m in qm.quantized_layers().values())
            got = qm.model(input_ids=x).logits
        after = qm.model(input_ids=x).logits
    assert torch.equal(got, ref) and torch.equal(after, ref)
    assert all(m.dense_weight is None for m in qm.model.modules() if isinstance(m, QuantLinear))
    # a wrong cached weight would show: perturb inside the context and the output must change
    with torch.no_grad(), cached_dequant(qm.model):
        first = next(iter(qm.quantized_layers().values()))
        first.dense_weight.mul_(1.5)
        assert not torch.equal(qm.model(input_ids=x).logits, ref)
