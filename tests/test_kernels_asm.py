"""The inline-PTX dequant of the W4A16 kernels (kernels/src/_ptx.py), checked on CPU.

The interpreter cannot run inline PTX, so the compiled path is tested on a GPU
(``QUANTKIT_TEST_CUDA=1 pytest tests/test_kernels_k.py``). Here the shipped PTX text itself is
executed by a small emulator of the instructions it uses (lop3, shr, and, prmt, fma on packed
halves, mov with vector unpack) on random words and tables, and compared with the format's own
decode: a wrong selector, mask, magic number or table plane fails here.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from quantkit.kernels import _ptx, w4a16

M32 = 0xFFFFFFFF


def _prmt(a: int, b: int, sel: int) -> int:
    src = (a & M32) | ((b & M32) << 32)
    out = 0
    for j in range(4):
        s = (sel >> (4 * j)) & 0xF
        assert s < 8, "sign-replicate mode is never used by the kernels"
        out |= ((src >> (8 * s)) & 0xFF) << (8 * j)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        i = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> i) & 1) << bit
    return out


def _halves(v: int, dt):
    t = torch.tensor([v & 0xFFFF, (v >> 16) & 0xFFFF], dtype=torch.int32).to(torch.int16)
    return t.view(dt).double()


def _pack(h, dt) -> int:
    b = h.to(dt).view(torch.int16).to(torch.int64) & 0xFFFF
    return int(b[0]) | (int(b[1]) << 16)


def run_ptx(text: str, args: dict[int, int], n_out: int = 8) -> list[int]:
    """Execute the kernels' PTX subset. args: operand number -> 32-bit value; returns the 16-bit
    outputs $0..$(n_out-1)."""
    regs: dict[str, int] = {}
    outs: dict[int, int] = {}

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok.startswith("$"):
            return args[int(tok[1:])] & M32
        if tok.startswith("0x") or tok.isdigit():
            return int(tok, 0) & M32
        return regs[tok]

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):
            m = re.match(r"\{\$(\d+),\s*\$(\d+)\},\s*(\w+)", rest)
            v = val(m.group(3))
            outs[int(m.group(1))] = v & 0xFFFF
            outs[int(m.group(2))] = v >> 16
            continue
        d, *src = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            r = val(src[0])
        elif op == "shr.u32":
            r = val(src[0]) >> int(src[1])
        elif op == "and.b32":
            r = val(src[0]) & val(src[1])
        elif op == "lop3.b32":
            r = _lop3(val(src[0]), val(src[1]), val(src[2]), int(src[3], 0))
        elif op == "prmt.b32":
            r = _prmt(val(src[0]), val(src[1]), val(src[2]))
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            dt = torch.bfloat16 if "bf16" in op else torch.float16
            a, b, c = (_halves(val(t), dt) for t in src)
            r = _pack(a * b + c, dt)  # the kernels only form exact values here
        else:
            raise AssertionError(f"unemulated PTX op {op}")
        regs[d] = r & M32
    return [outs[i] for i in range(n_out)]


def _words(rng, n):
    return [int(v) for v in rng.integers(0, 2 ** 32, size=n, dtype=np.uint64)]


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("z", [8.0, 0.0, 3.0, 15.0])
def test_int_asm_decodes_q_minus_z(dt, z):
    text = _ptx._ASM_INT_BF16 if dt == torch.bfloat16 else _ptx._ASM_INT_FP16
    m0 = 128.0 if dt == torch.bfloat16 else 1024.0
    zz = _pack(torch.tensor([-(m0 + z)] * 2, dtype=torch.float64), dt)
    rng = np.random.default_rng(0)
    for w in _words(rng, 64):
        got = run_ptx(text, {8: w, 9: zz})
        vals = torch.tensor(got, dtype=torch.int32).to(torch.int16).view(dt).double()
        want = torch.tensor([((w >> (4 * i)) & 15) - z for i in range(8)], dtype=torch.float64)
        assert torch.equal(vals, want), (hex(w), vals, want)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ls", [16, 8, 4])
def test_lut_asm_looks_up_the_row_table(dt, ls):
    g = torch.Generator().manual_seed(1)
    lut = (torch.randn(3, ls, generator=g) * 3).to(torch.float16)
    planes = _ptx.lut_planes(lut, dt)
    assert planes.shape == (3, 8) and planes.dtype == torch.int32
    rng = np.random.default_rng(ls)
    for r in range(3):
        args = {9 + j: int(planes[r, j]) & M32 for j in range(8)}
        for w in _words(rng, 48):
            if ls < 16:  # 3/2-bit codes live in the low bits of each nibble
                w &= int(("%x" % (ls - 1)) * 8, 16)
            args[8] = w
            got = run_ptx(_ptx._ASM_LUT, args)
            vals = torch.tensor(got, dtype=torch.int32).to(torch.int16).view(dt)
            want = lut[r, [(w >> (4 * i)) & 15 for i in range(8)]].to(dt)
            assert torch.equal(vals, want), (r, hex(w))


def test_emulator_catches_a_wrong_selector():
    """The check above can fail: a PTX text with a swapped interleave gives other values."""
    bad = _ptx._ASM_LUT.replace("0x5140", "0x4150", 1)
    lut = torch.arange(16, dtype=torch.float16).view(1, 16)
    planes = _ptx.lut_planes(lut, torch.bfloat16)
    args = {9 + j: int(planes[0, j]) & M32 for j in range(8)}
    args[8] = 0x76543210
    good = run_ptx(_ptx._ASM_LUT, args)
    assert torch.tensor(good, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).tolist() == \
        [0, 1, 2, 3, 4, 5, 6, 7]
    assert run_ptx(bad, args) != good


def test_asm_is_never_used_by_the_interpreter_or_on_cpu():
    class _K:  # the predicate only reads these
        device = torch.device("cpu")
        s, GS, mode, LS = None, 1 << 30, 0, 16

    assert not w4a16.W4A16Kernel.asm_ok(_K(), 16, torch.bfloat16)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("z", [8.0, 0.0, 13.0])
def test_int_asm_with_scale_decodes_q_minus_z_times_s(dt, z):
    """The large-M GEMM's dequant: ``(q - z) * s`` rounded once to the dot dtype (what cuBLAS gets from
    the dequantize path), for scales of every magnitude."""
    text = _ptx._ASM_INT_BF16_S if dt == torch.bfloat16 else _ptx._ASM_INT_FP16_S
    m0 = 128.0 if dt == torch.bfloat16 else 1024.0
    zz = _pack(torch.tensor([-(m0 + z)] * 2, dtype=torch.float64), dt)
    rng = np.random.default_rng(int(z) + 7)
    for s in (0.0123, 3.7e-4, 1.9, 2.0 ** -10):
        sv = torch.tensor(s, dtype=dt).double()
        ss = _pack(torch.tensor([s, s], dtype=torch.float64), dt)
        for w in _words(rng, 32):
            got = run_ptx(text, {8: w, 9: zz, 10: ss})
            vals = torch.tensor(got, dtype=torch.int32).to(torch.int16).view(dt)
            want = (torch.tensor([((w >> (4 * i)) & 15) - z for i in range(8)], dtype=torch.float64) * sv).to(dt)
            assert torch.equal(vals, want), (hex(w), s, vals, want)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_lut_asm_with_scale_looks_up_and_scales(dt):
    g = torch.Generator().manual_seed(3)
    lut = (torch.randn(2, 16, generator=g) * 3).to(torch.float16)
    planes = _ptx.lut_planes(lut, dt)
    text = _ptx._ASM_LUT_BF16_S if dt == torch.bfloat16 else _ptx._ASM_LUT_FP16_S
    rng = np.random.default_rng(5)
    for r in range(2):
        for s in (0.0071, 0.55):
            sv = torch.tensor(s, dtype=dt).double()
            args = {9 + j: int(planes[r, j]) & M32 for j in range(8)}
            args[17] = _pack(torch.tensor([s, s], dtype=torch.float64), dt)
            for w in _words(rng, 24):
                args[8] = w
                vals = torch.tensor(run_ptx(text, args), dtype=torch.int32).to(torch.int16).view(dt)
                want = (lut[r, [(w >> (4 * i)) & 15 for i in range(8)]].to(dt).double() * sv).to(dt)
                assert torch.equal(vals, want), (r, s, hex(w))
