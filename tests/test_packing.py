import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.formats.packing import pack_codes, packed_row_bytes, unpack_codes


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 7), cols=st.integers(1, 67), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip_any_shape(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.int32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_row_bytes(cols, bits))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


def test_int4_bit_order_is_documented_little_endian():
    # column 0 in the low nibble, column 1 in the high nibble (docs/FORMAT.md)
    codes = torch.tensor([[0x3, 0xA, 0xF]], dtype=torch.int32)
    p = pack_codes(codes, 4)
    assert p.tolist() == [[0xA3, 0x0F]]


def test_int3_bit_stream():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.int32)
    p = pack_codes(codes, 3)
    stream = sum(int(c) << (3 * j) for j, c in enumerate(codes[0]))
    assert p.tolist() == [[(stream >> (8 * k)) & 0xFF for k in range(3)]]


def test_out_of_range_codes_rejected():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[16]]), 4)


def test_unpack_wrong_width_rejected():
    with pytest.raises(ValueError, match="need"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.uint8), 4, 9)
