"""Group-wise asymmetric RTN for the KV cache (KIVI layout: keys per channel, values per token).

Keys ``[B, H, T, D]`` are quantized **per channel**: a group is ``G`` consecutive tokens of one
channel, so each group of ``G`` tokens has one scale and one minimum per (head, channel). Values
are quantized **per token**: a group is ``g`` consecutive channels of one token.

Affine RTN with a floating minimum (no integer zero point), stored in ``scale_dtype`` (float16):
``x ≈ q · s + m``, ``q = round((x − m) / s)`` in ``[0, 2^b − 1]``. ``m`` and ``s`` are rounded to
the storage dtype *before* the codes are computed, ``m`` downwards and ``s`` upwards, so every
value of the group stays inside ``[m, m + (2^b − 1) s]`` and the error bound ``|x − x̂| ≤ s / 2``
holds for the stored ``s`` (up to float32 arithmetic).

Codes are bit-packed along the channel axis with ``quantkit.formats.packing`` (the native
little-endian bit stream of docs/FORMAT.md), so the stored bytes are the real footprint.
"""

from __future__ import annotations

import torch

from ..formats.packing import pack_codes, unpack_codes

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to ``dtype`` so that the result is <= x (x float32)."""
    y = x.to(dtype)
    bad = y.float() > x
    if bool(bad.any()):
        y = torch.where(bad, torch.nextafter(y, torch.full_like(y, float("-inf"))), y)
    return y


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    bad = y.float() < x
    if bool(bad.any()):
        y = torch.where(bad, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    return y


def minmax_quantize(x: torch.Tensor, bits: int, dim: int, scale_dtype: torch.dtype = torch.float16):
    """Asymmetric RTN of ``x`` with one (scale, min) per slice reduced over ``dim``.

    Returns int codes (uint8, same shape as x) and scale, min (``scale_dtype``, size 1 along ``dim``)."""
    xf = x.float()
    qmax = (1 << bits) - 1
    mn = _round_down(xf.amin(dim=dim, keepdim=True), scale_dtype)
    mx = xf.amax(dim=dim, keepdim=True)
    mnf = mn.float()
    s = _round_up(((mx - mnf) / qmax).clamp_min(0), scale_dtype)
    # make sure m + qmax*s reaches the max in float32 arithmetic too (one more ulp if needed)
    short = (mnf + qmax * s.float()) < mx
    if bool(short.any()):
        s = torch.where(short, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    sf = s.float()
    safe = torch.where(sf > 0, sf, torch.ones_like(sf))
    q = torch.round((xf - mnf) / safe).clamp_(0, qmax).to(torch.uint8)
    return q, s, mn


def _pack_last(q: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return q.contiguous()
    lead = q.shape[:-1]
    return pack_codes(q.reshape(-1, q.shape[-1]), bits).view(*lead, -1)


def _unpack_last(p: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    if bits == 8:
        return p
    lead = p.shape[:-1]
    return unpack_codes(p.reshape(-1, p.shape[-1]), bits, cols).view(*lead, cols)


def quantize_keys(k: torch.Tensor, bits: int, group: int, scale_dtype=torch.float16):
    """Keys ``[B, H, T, D]`` with ``T`` a multiple of ``group`` -> (packed codes ``[B, H, T, ⌈D·b/8⌉]``,
    scale ``[B, H, T/group, D]``, min ``[B, H, T/group, D]``). Per channel, groups of ``group`` tokens."""
    B, H, T, D = k.shape
    if T % group:
        raise ValueError(f"quantize_keys needs a whole number of token groups: T={T}, group={group}")
    q, s, m = minmax_quantize(k.reshape(B, H, T // group, group, D), bits, dim=3, scale_dtype=scale_dtype)
    return _pack_last(q.reshape(B, H, T, D), bits), s.squeeze(3), m.squeeze(3)


def dequantize_keys(codes, scale, mn, bits: int, group: int, head_dim: int, dtype=torch.float32):
    B, H, T, _ = codes.shape
    q = _unpack_last(codes, bits, head_dim).reshape(B, H, T // group, group, head_dim).float()
    x = q * scale.float().unsqueeze(3) + mn.float().unsqueeze(3)
    return x.reshape(B, H, T, head_dim).to(dtype)


def quantize_values(v: torch.Tensor, bits: int, group: int, scale_dtype=torch.float16):
    """Values ``[B, H, T, D]`` with ``D`` a multiple of ``group`` -> (packed codes, scale ``[B, H, T, D/group]``,
    min ``[B, H, T, D/group]``). Per token, groups of ``group`` channels."""
    B, H, T, D = v.shape
    if D % group:
        raise ValueError(f"value group size {group} does not divide head_dim {D}")
    q, s, m = minmax_quantize(v.reshape(B, H, T, D // group, group), bits, dim=4, scale_dtype=scale_dtype)
    return _pack_last(q.reshape(B, H, T, D), bits), s.squeeze(4), m.squeeze(4)


def dequantize_values(codes, scale, mn, bits: int, group: int, head_dim: int, dtype=torch.float32):
    B, H, T, _ = codes.shape
    q = _unpack_last(codes, bits, head_dim).reshape(B, H, T, head_dim // group, group).float()
    x = q * scale.float().unsqueeze(4) + mn.float().unsqueeze(4)
    return x.reshape(B, H, T, head_dim).to(dtype)


def fake_quantize_keys(k: torch.Tensor, bits: int, group: int, scale_dtype=torch.float16) -> torch.Tensor:
    """Quantize-dequantize keys (token count must be a multiple of ``group``)."""
    c, s, m = quantize_keys(k, bits, group, scale_dtype)
    return dequantize_keys(c, s, m, bits, group, k.shape[-1], k.dtype)


def fake_quantize_values(v: torch.Tensor, bits: int, group: int, scale_dtype=torch.float16) -> torch.Tensor:
    c, s, m = quantize_values(v, bits, group, scale_dtype)
    return dequantize_values(c, s, m, bits, group, v.shape[-1], v.dtype)

