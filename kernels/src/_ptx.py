"""Inline-PTX dequantization for the W4A16 kernels (kernels/src/w4a16_jit.py): compiled GPU code only
(Triton's interpreter cannot run inline assembly; there the kernels take their plain-Triton paths).

* int codes: ``_kdeq_asm`` MODE 0 — two weights per 32-bit register: ``(w >> 4i) & 0x000F000F | magic``
  is the pair {M0 + q_i, M0 + q_(i+4)} (M0 = 128 in bf16, 1024 in fp16: exact), one packed FMA subtracts
  M0 + z, PRMTs put the pairs in column order: 15 instructions per 8 weights.
* lut codes (any4/any3/any2, NF4, FP4): a row's table of up to 16 entries held in 8 registers, the low
  and the high bytes of its entries 4 to a register (``lut_planes``); per word of 8 codes, PRMT picks 4
  codes' bytes among entries 0-7 and among 8-15, a second PRMT chooses by each code's top bit, a third
  interleaves low and high bytes: 21 instructions per 8 weights, no memory access. ``_lut16`` gives
  the values as fp32 (fp16 planes: exact) for the GEMV and the dequantize kernel.

The PTX text is executed on CPU by the emulator in tests/test_kernels_asm.py against the formats'
decode. Own code (the magic-number trick is the one Marlin and gemlite use; nothing copied).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tl import _cols8

_ASM_INT_BF16 = """{
.reg .b32 t1, t2, t3, a0, a1, a2, a3, p0, p1, p2, p3, one;
mov.b32 one, 0x3F803F80;
lop3.b32 a0, $8, 0x000F000F, 0x43004300, 0xEA;
shr.u32 t1, $8, 4;
lop3.b32 a1, t1, 0x000F000F, 0x43004300, 0xEA;
shr.u32 t2, $8, 8;
lop3.b32 a2, t2, 0x000F000F, 0x43004300, 0xEA;
shr.u32 t3, $8, 12;
lop3.b32 a3, t3, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 a0, a0, one, $9;
fma.rn.bf16x2 a1, a1, one, $9;
fma.rn.bf16x2 a2, a2, one, $9;
fma.rn.bf16x2 a3, a3, one, $9;
prmt.b32 p0, a0, a1, 0x5410;
prmt.b32 p1, a2, a3, 0x5410;
prmt.b32 p2, a0, a1, 0x7632;
prmt.b32 p3, a2, a3, 0x7632;
mov.b32 {$0, $1}, p0;
mov.b32 {$2, $3}, p1;
mov.b32 {$4, $5}, p2;
mov.b32 {$6, $7}, p3;
}"""
_ASM_INT_FP16 = _ASM_INT_BF16.replace("0x3F803F80", "0x3C003C00").replace("0x43004300", "0x64006400") \
    .replace("bf16x2", "f16x2")


def _lut4(sel: str, pick: str, out_lo: str, out_hi: str) -> str:
    """PTX: 4 codes (selector register sel, top-bit choice pick) -> their 16-bit table entries, two
    per register (out_lo: codes 0-1, out_hi: codes 2-3)."""
    return (f"prmt.b32 a, $9, $10, {sel};\nprmt.b32 bb, $11, $12, {sel};\n"   # low bytes, entries 0-7 / 8-15
            f"prmt.b32 c, $13, $14, {sel};\nprmt.b32 d, $15, $16, {sel};\n"   # high bytes
            f"prmt.b32 lo, a, bb, {pick};\nprmt.b32 hi, c, d, {pick};\n"      # by the code's top bit
            f"prmt.b32 {out_lo}, lo, hi, 0x5140;\nprmt.b32 {out_hi}, lo, hi, 0x7362;\n")  # interleave


_ASM_LUT = ("""{
.reg .b32 s, sh, b, bh, a, bb, c, d, lo, hi, p0, p1, p2, p3;
and.b32 s, $8, 0x77777777;
shr.u32 sh, s, 16;
shr.u32 b, $8, 1;
lop3.b32 b, b, 0x44444444, 0x32103210, 0xEA;
shr.u32 bh, b, 16;
""" + _lut4("s", "b", "p0", "p1") + _lut4("sh", "bh", "p2", "p3") + """mov.b32 {$0, $1}, p0;
mov.b32 {$2, $3}, p1;
mov.b32 {$4, $5}, p2;
mov.b32 {$6, $7}, p3;
}""")
def _with_scale(text: str, before: str, regs: tuple[str, ...], sop: str, ty: str) -> str:
    """The PTX ``text`` with every pair register in ``regs`` multiplied by the scale pair ``sop`` (one
    packed FMA with -0.0 each, rounded once: the dequantized weight ``(q - z) * s`` in the dot dtype),
    inserted before the line ``before``."""
    lines = text.split("\n")
    lines[1] = lines[1].rstrip(";") + ", nz;"
    lines.insert(2, "mov.b32 nz, 0x80008000;")
    i = lines.index(before)
    return "\n".join(lines[:i] + [f"fma.rn.{ty} {r}, {r}, {sop}, nz;" for r in regs] + lines[i:])


# the same dequantizations with the group scale applied (the large-M GEMM: its dot accumulates in one
# accumulator, so the weights must carry their scale); scale pair in operand $10 (int) / $17 (lut)
_ASM_INT_BF16_S = _with_scale(_ASM_INT_BF16, "prmt.b32 p0, a0, a1, 0x5410;", ("a0", "a1", "a2", "a3"), "$10",
                              "bf16x2")
_ASM_INT_FP16_S = _with_scale(_ASM_INT_FP16, "prmt.b32 p0, a0, a1, 0x5410;", ("a0", "a1", "a2", "a3"), "$10",
                              "f16x2")
_ASM_LUT_BF16_S = _with_scale(_ASM_LUT, "mov.b32 {$0, $1}, p0;", ("p0", "p1", "p2", "p3"), "$17", "bf16x2")
_ASM_LUT_FP16_S = _with_scale(_ASM_LUT, "mov.b32 {$0, $1}, p0;", ("p0", "p1", "p2", "p3"), "$17", "f16x2")
_OUT8 = "=h,=h,=h,=h,=h,=h,=h,=h,"
_ASM_INT_BF16_C = tl.constexpr(_ASM_INT_BF16)
_ASM_INT_FP16_C = tl.constexpr(_ASM_INT_FP16)
_ASM_LUT_C = tl.constexpr(_ASM_LUT)
_CONS_INT = tl.constexpr(_OUT8 + "r,r")
_CONS_LUT = tl.constexpr(_OUT8 + "r,r,r,r,r,r,r,r,r")
_ASM_INT_BF16_S_C = tl.constexpr(_ASM_INT_BF16_S)
_ASM_INT_FP16_S_C = tl.constexpr(_ASM_INT_FP16_S)
_ASM_LUT_BF16_S_C = tl.constexpr(_ASM_LUT_BF16_S)
_ASM_LUT_FP16_S_C = tl.constexpr(_ASM_LUT_FP16_S)
_CONS_INT_S = tl.constexpr(_OUT8 + "r,r,r")
_CONS_LUT_S = tl.constexpr(_OUT8 + "r,r,r,r,r,r,r,r,r,r")


@triton.jit
def _zpair(z, XDT: tl.constexpr):
    """-(M0 + z) as two packed values of the dot dtype (int32 bits; exact for z < 16)."""
    if XDT == tl.bfloat16:
        v = -(z + 128.0)
    else:
        v = -(z + 1024.0)
    b = v.to(XDT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return b | (b << 16)


@triton.jit
def _spair(s, XDT: tl.constexpr):
    """The scale s as two packed values of the dot dtype (int32 bits)."""
    b = s.to(XDT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return b | (b << 16)


@triton.jit
def _planes(lut_ptr, rn, LUT_ROW: tl.constexpr):
    """The 8 table-plane words (``lut_planes``) of rows rn, [BN, 1] each: per-row tables or one shared."""
    if LUT_ROW:
        tp = lut_ptr + rn[:, None] * 8
    else:
        tp = lut_ptr + rn[:, None] * 0
    return (tl.load(tp), tl.load(tp + 1), tl.load(tp + 2), tl.load(tp + 3), tl.load(tp + 4), tl.load(tp + 5),
            tl.load(tp + 6), tl.load(tp + 7))


@triton.jit
def _lut_bits(w, t0, t1, t2, t3, t4, t5, t6, t7):
    """The table entries (16-bit patterns, int16) of the 8 codes of words w, by PRMT lookups."""
    return tl.inline_asm_elementwise(
        _ASM_LUT_C, _CONS_LUT,
        [w, tl.broadcast_to(t0, w.shape), tl.broadcast_to(t1, w.shape), tl.broadcast_to(t2, w.shape),
         tl.broadcast_to(t3, w.shape), tl.broadcast_to(t4, w.shape), tl.broadcast_to(t5, w.shape),
         tl.broadcast_to(t6, w.shape), tl.broadcast_to(t7, w.shape)],
        dtype=(tl.int16,) * 8, is_pure=True, pack=1)


@triton.jit
def _kdeq_asm(w, zz, t0, t1, t2, t3, t4, t5, t6, t7, MODE: tl.constexpr, XDT: tl.constexpr):
    """Words w [BN, BKW] -> [BN, 8*BKW] values of XDT in column order (no scale), inline PTX.
    int: zz = _zpair(z) ([BN, 1] or scalar); lut: t0..t7 = the row's table planes ([BN, 1])."""
    if MODE == 0:
        zb = tl.broadcast_to(zz, w.shape)
        if XDT == tl.bfloat16:
            d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
                _ASM_INT_BF16_C, _CONS_INT, [w, zb], dtype=(tl.int16,) * 8, is_pure=True, pack=1)
        else:
            d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
                _ASM_INT_FP16_C, _CONS_INT, [w, zb], dtype=(tl.int16,) * 8, is_pure=True, pack=1)
    else:
        d0, d1, d2, d3, d4, d5, d6, d7 = _lut_bits(w, t0, t1, t2, t3, t4, t5, t6, t7)
    return _cols8(d0.to(XDT, bitcast=True), d1.to(XDT, bitcast=True), d2.to(XDT, bitcast=True),
                  d3.to(XDT, bitcast=True), d4.to(XDT, bitcast=True), d5.to(XDT, bitcast=True),
                  d6.to(XDT, bitcast=True), d7.to(XDT, bitcast=True))


@triton.jit
def _kdeq_asm_s(w, zz, ss, t0, t1, t2, t3, t4, t5, t6, t7, MODE: tl.constexpr, XDT: tl.constexpr):
    """``_kdeq_asm`` with the scale: words w [BN, BKW] -> [BN, 8*BKW] values ``(q - z) * s`` (int) or
    ``table[q] * s`` (lut) in XDT, column order; ss = _spair(scale) ([BN, 1] or [BN, BKW])."""
    sb = tl.broadcast_to(ss, w.shape)
    if MODE == 0:
        zb = tl.broadcast_to(zz, w.shape)
        if XDT == tl.bfloat16:
            d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
                _ASM_INT_BF16_S_C, _CONS_INT_S, [w, zb, sb], dtype=(tl.int16,) * 8, is_pure=True, pack=1)
        else:
            d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
                _ASM_INT_FP16_S_C, _CONS_INT_S, [w, zb, sb], dtype=(tl.int16,) * 8, is_pure=True, pack=1)
    else:
        tb = (w, tl.broadcast_to(t0, w.shape), tl.broadcast_to(t1, w.shape), tl.broadcast_to(t2, w.shape),
              tl.broadcast_to(t3, w.shape), tl.broadcast_to(t4, w.shape), tl.broadcast_to(t5, w.shape),
              tl.broadcast_to(t6, w.shape), tl.broadcast_to(t7, w.shape), sb)
        if XDT == tl.bfloat16:
            d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
                _ASM_LUT_BF16_S_C, _CONS_LUT_S, tb, dtype=(tl.int16,) * 8, is_pure=True, pack=1)
        else:
            d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
                _ASM_LUT_FP16_S_C, _CONS_LUT_S, tb, dtype=(tl.int16,) * 8, is_pure=True, pack=1)
    return _cols8(d0.to(XDT, bitcast=True), d1.to(XDT, bitcast=True), d2.to(XDT, bitcast=True),
                  d3.to(XDT, bitcast=True), d4.to(XDT, bitcast=True), d5.to(XDT, bitcast=True),
                  d6.to(XDT, bitcast=True), d7.to(XDT, bitcast=True))


@triton.jit
def _lut16(w, t0, t1, t2, t3, t4, t5, t6, t7):
    """The 8 codes of words w as fp32 table values (fp16 planes, PRMT lookups, exact)."""
    d0, d1, d2, d3, d4, d5, d6, d7 = _lut_bits(w, t0, t1, t2, t3, t4, t5, t6, t7)
    return (d0.to(tl.float16, bitcast=True).to(tl.float32), d1.to(tl.float16, bitcast=True).to(tl.float32),
            d2.to(tl.float16, bitcast=True).to(tl.float32), d3.to(tl.float16, bitcast=True).to(tl.float32),
            d4.to(tl.float16, bitcast=True).to(tl.float32), d5.to(tl.float16, bitcast=True).to(tl.float32),
            d6.to(tl.float16, bitcast=True).to(tl.float32), d7.to(tl.float16, bitcast=True).to(tl.float32))


def lut_planes(lut: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A lut [rows, <=16] as the byte planes the PRMT lookup reads: int32 [rows, 8]; word g (g < 4)
    holds the low bytes of entries 4g..4g+3 (entry 4g+j in byte j) of the table in ``dtype``, word
    4 + g their high bytes. Missing entries (3/2-bit tables) are 0 and never indexed."""
    r, ls = lut.shape
    t = torch.zeros(r, 16, dtype=dtype, device=lut.device)
    t[:, :ls] = lut.to(dtype)
    b = t.view(torch.int16).to(torch.int64) & 0xFFFF
    planes = []
    for part in (b & 0xFF, b >> 8):
        v = part.view(r, 4, 4)
        planes.append(v[..., 0] | (v[..., 1] << 8) | (v[..., 2] << 16) | (v[..., 3] << 24))
    out = torch.cat(planes, 1)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32).contiguous()
