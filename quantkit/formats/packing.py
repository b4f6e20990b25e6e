"""Bit packing shared by every code-based format.

Layout (the native on-disk layout, documented in docs/FORMAT.md): the b-bit codes of one row are
written as a little-endian bit stream — code j occupies bits [j*b, (j+1)*b) of the row, bit 0 of
byte 0 first — and each row is padded to a whole byte. For b = 4 this is "two codes per byte, the
even column in the low nibble"; for b = 3, eight codes fill three bytes.
"""

from __future__ import annotations

import torch


def packed_row_bytes(cols: int, bits: int) -> int:
    return (cols * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [rows, cols] in [0, 2**bits) into uint8 [rows, ceil(cols*bits/8)]."""
    if codes.dim() != 2:
        raise ValueError(f"pack_codes expects a 2-D tensor, got shape {tuple(codes.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_codes supports 1..8 bits, got {bits}")
    rows, cols = codes.shape
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits: [{int(c.min())}, {int(c.max())}]")
    # a few rows at a time: the shifted codes and their int64 sums are several times the codes' size
    # (an 8192-input MLP weight: ~0.4 GiB of temporaries at once); integer arithmetic, so the bytes are
    # the same whatever the pieces
    step = max(1, (4 << 20) // max(1, cols * bits))
    if rows > step:
        out = torch.empty(rows, packed_row_bytes(cols, bits), dtype=torch.uint8, device=c.device)
        for r0 in range(0, rows, step):
            out[r0:r0 + step] = _pack_rows(c[r0:r0 + step], bits)
        return out
    return _pack_rows(c, bits)


def _pack_rows(c: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = c.shape
    if bits in (1, 2, 4, 8):
        per = 8 // bits
        pad = (-cols) % per
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        c = c.view(rows, -1, per)
        shifts = torch.arange(per, device=c.device, dtype=torch.int32) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    # general widths: expand to bits, pad to bytes, fold back
    shifts = torch.arange(bits, device=c.device, dtype=torch.int32)
    b = ((c.unsqueeze(-1) >> shifts) & 1).reshape(rows, cols * bits)  # codes may be non-contiguous
    pad = (-(cols * bits)) % 8
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    b = b.view(rows, -1, 8)
    weights = 1 << torch.arange(8, device=c.device, dtype=torch.int32)
    return (b * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 [rows, nbytes] -> int32 codes [rows, cols]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_codes expects a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    rows, nbytes = packed.shape
    if nbytes != packed_row_bytes(cols, bits):
        raise ValueError(
            f"packed rows hold {nbytes} bytes but {cols} codes of {bits} bits need "
            f"{packed_row_bytes(cols, bits)}")
    p = packed.to(torch.int32)
    if bits in (1, 2, 4, 8):
        per = 8 // bits
        shifts = torch.arange(per, device=p.device, dtype=torch.int32) * bits
        c = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return c.reshape(rows, -1)[:, :cols]
    shifts = torch.arange(8, device=p.device, dtype=torch.int32)
    b = ((p.unsqueeze(-1) >> shifts) & 1).view(rows, -1)[:, : cols * bits].view(rows, cols, bits)
    weights = 1 << torch.arange(bits, device=p.device, dtype=torch.int32)
    return (b * weights).sum(-1)
