"""GPTQ's Triton inner loop equals the PyTorch loop (run on CPU under TRITON_INTERPRET=1)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported (lazily, by GPTQ)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from test_gptq import real_looking_stats  # noqa: E402

from quantkit.formats.base import format_from_spec  # noqa: E402
from quantkit.quantizers.gptq import GPTQ  # noqa: E402


@pytest.mark.parametrize("bits,g,sym,act_order", [(4, 32, False, True), (3, None, True, False), (2, 16, False, True)])
def test_triton_block_matches_python_loop(bits, g, sym, act_order):
    torch.manual_seed(0)
    rows, cols = 19, 80  # odd sizes: partial row tile, partial last lazy block
    w = torch.randn(rows, cols)
    stats = real_looking_stats(cols)
    fmt = format_from_spec({"type": "int", "bits": bits, "group_size": g, "sym": sym})
    ref = GPTQ(GPTQ.Config(act_order=act_order, block_size=32, triton="never")).quantize(w, fmt, stats)
    got = GPTQ(GPTQ.Config(act_order=act_order, block_size=32, triton="always")).quantize(w, fmt, stats)
    agree = (got.packed["qweight"] == ref.packed["qweight"]).float().mean()
    assert agree > 0.995, f"packed codes agree on only {agree:.4f} of bytes"
    assert got.metrics["rel_err"] == pytest.approx(ref.metrics["rel_err"], rel=0.02)
    assert torch.equal(fmt.unpack(got.packed, (rows, cols)), got.weight)
