import pytest
import torch

from quantkit.errors import CheckpointError, RecipeError
from quantkit.formats.base import format_from_spec
from quantkit.quantizers.base import LayerStats
from quantkit.quantizers.rtn import RTN


def rtn(w, **fmt):
    f = format_from_spec({"type": "int", **fmt})
    return f, RTN(RTN.Config()).quantize(w, f, LayerStats())


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,g", [((7, 33), 16), ((5, 64), 32), ((3, 576), 128), ((4, 50), None)])
def test_roundtrip_and_error_bound(sym, bits, shape, g):
    torch.manual_seed(0)
    w = torch.randn(shape)
    f, res = rtn(w, bits=bits, group_size=g, sym=sym)
    deq = f.unpack(res.packed, shape)
    assert torch.equal(deq, res.weight), "stored tensors must reproduce the in-memory weight exactly"
    # every weight within half a step of its group's grid (asym: range contains 0 and the group)
    gs = g or shape[1]
    for s in range(0, shape[1], gs):
        blk = w[:, s:s + gs]
        if sym:
            step = blk.abs().amax(1, keepdim=True) / ((2 ** bits - 1) / 2)
        else:
            step = (blk.amax(1, keepdim=True).clamp_min(0) - blk.amin(1, keepdim=True).clamp_max(0)) / (2 ** bits - 1)
        err = (deq[:, s:s + gs] - blk).abs()
        # half a step, plus what rounding the scale to float16 (rel. error <= 2^-11) moves a code
        amax = blk.abs().amax(1, keepdim=True)
        assert (err <= step * 0.5 + amax * 2 ** -10 + 1e-6).all()


def test_partial_last_group_shapes():
    f, res = rtn(torch.randn(4, 576), bits=4, group_size=128)
    assert res.packed["scales"].shape == (4, 5)  # 4 full groups + one of 64 columns
    assert res.packed["qweight"].shape == (4, 288)


def test_group_size_not_dividing_is_clear_error_when_strict():
    f = format_from_spec({"type": "int", "bits": 4, "group_size": 128, "last_group": "error"})
    with pytest.raises(RecipeError, match="does not divide the 576 input columns"):
        f.check_shape((8, 576), where="model.layers.0.q_proj")


def test_bad_format_keys_name_the_key():
    with pytest.raises(RecipeError, match=r"format\.bits"):
        format_from_spec({"type": "int", "bits": 17}, where="format")
    with pytest.raises(RecipeError, match=r"format\.colour"):
        format_from_spec({"type": "int", "colour": 1}, where="format")


def test_tampered_tensors_give_checkpoint_error():
    f, res = rtn(torch.randn(8, 64), bits=4, group_size=32)
    bad = dict(res.packed)
    bad["scales"] = bad["scales"][:, :1]
    with pytest.raises(CheckpointError, match="scales"):
        f.unpack(bad, (8, 64))
    bad = dict(res.packed)
    del bad["zeros"]
    with pytest.raises(CheckpointError, match="zeros"):
        f.unpack(bad, (8, 64))


def test_bits_per_weight_counts_scales_and_zeros():
    f, res = rtn(torch.randn(16, 256), bits=4, group_size=128)
    # 4 bits codes + (16-bit scale + 8-bit zero) / 128
    assert f.bits_per_weight(res.packed, (16, 256)) == pytest.approx(4 + 24 / 128)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_sym_full_range_uses_every_code(bits):
    """sym_range: full puts each group's larger-magnitude end exactly on code 0 (scale signed), so the
    grid is 2^b / (2^b - 1) finer than GPTQ's half range; the stored tensors reproduce the weight."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[0, :128] = w[0, :128].abs()  # a group whose larger end is positive: its scale is negative
    f, res = rtn(w, bits=bits, group_size=128, sym=True, sym_range="full")
    _, half = rtn(w, bits=bits, group_size=128, sym=True)
    assert torch.equal(f.unpack(res.packed, w.shape), res.weight)
    s = res.packed["scales"].float()
    assert (s[0, 0] < 0) and (s > 0).any()
    codes = res.packed["qweight"]
    from quantkit.formats.packing import unpack_codes
    q = unpack_codes(codes, bits, 256).view(64, 2, 128)
    assert (q.amin(2) == 0).all()  # every group reaches code 0 (its extreme)
    err_full, err_half = (res.weight - w).pow(2).sum(), (half.weight - w).pow(2).sum()
    assert err_full < err_half


def test_sym_full_range_needs_sym():
    with pytest.raises(RecipeError, match="sym_range"):
        format_from_spec({"type": "int", "bits": 4, "sym_range": "full"})
