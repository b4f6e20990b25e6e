# ruff: noqa: I001 - kernel_ref must be imported first: it selects Triton's interpreter before Triton loads
"""The register-A Hopper GEMM (kernels/src/_wgmma_rs.py, path ``wg`` with ``rs``): outᵀ = W · xᵀ with the
dequantized weights as wgmma's A operand in registers, on words re-laid once per layer.

On a GPU of compute capability 9.x (QUANTKIT_TEST_CUDA=1): outputs against the float64 reference of
tests/kernel_ref.py, poisoned with NaN first, for odd M and N, asym/sym, per group/per channel,
bf16/fp16, 64- and 128-column chunks, split-K, both epilogues, lut tables. On CPU: the re-layout
(round trip, and every thread's word holds the columns of its wgmma A fragment per the PTX ISA, for
every warpgroup of the words' register layout), the kernel's column algebra (join / reshape / permute
emulated in torch), and the kernel compiled for sm_90 by Triton's own compiler with its PTX checked
(register-A wgmma, no shared store of dequantized values, no local memory, one wgmma left in flight) and
its SASS (nothing writes a wgmma's A registers or touches its accumulators while it is in flight: the
race that gave the first version wrong results on the H100).
"""

from __future__ import annotations

from kernel_ref import DEV, check, make_int, make_lut, rand_x, ref_int, ref_lut, run_poisoned  # noqa: I001

import re
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from quantkit.formats.base import format_from_spec  # noqa: E402
from quantkit.kernels import _wgmma_rs as R  # noqa: E402


def _hopper() -> bool:
    return DEV.type == "cuda" and torch.cuda.get_device_capability()[0] == 9


def _gluon():
    if not R.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")


# ---- CPU: the re-layout ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0, 1])
def test_rs_shuffle_round_trip(mode):
    g = torch.Generator().manual_seed(mode)
    w = torch.randint(-2 ** 31, 2 ** 31, (37, 48), generator=g, dtype=torch.int64).to(torch.int32)  # K = 384
    keep = w.clone()
    ws = R.rs_shuffle(w, mode, rows=16)  # several row chunks
    assert torch.equal(w, keep)  # the checkpoint's words are not touched
    assert ws.shape == w.shape and ws.dtype == torch.int32
    assert torch.equal(R.rs_unshuffle(ws, mode), w)
    assert not torch.equal(ws, w)
    # each row keeps its own nibbles, each 64-column block its own multiset
    cw, cs = R._unpack(w).view(37, 6, 64), R._unpack(ws).view(37, 6, 64)
    assert torch.equal(cw.sort(-1).values, cs.sort(-1).values)


def _fragment(lane: int) -> set[tuple[int, int]]:
    """(row, column) of a 64 x 64 block that lane holds of wgmma's A fragment over 4 k16 steps (PTX ISA,
    "Register fragment: matrix A" of wgmma .m64nNk16 with 16-bit types, one warp's 16 rows): a0, a1 at
    row groupID, columns 2 * threadID_in_group + (0, 1); a2, a3 at row + 8; a4 - a7 at column + 8."""
    gid, tig = lane // 4, lane % 4
    out = set()
    for s in range(4):
        for i in range(8):
            out.add((gid + 8 * ((i >> 1) & 1), 16 * s + 2 * tig + (i & 1) + 8 * (i >> 2)))
    return out


@pytest.mark.parametrize("mode", [0, 1])
def test_rs_words_hold_the_fragment(mode):
    """Codes = their own column (mod 16 per block of 16 columns, tracked by a second tensor): every lane's
    words (rows gid and gid + 8, words 2 t + sp of a block, the kernel's register layout) hold exactly its
    fragment's columns, and fragment pair q, element e sits in the nibble the dequantization emits as its
    output 2q + e (int: the lop3 pair {nibble q, nibble q + 4}; lut: the lookup's nibbles in order)."""
    k = 64
    col = torch.arange(k).repeat(16, 1)  # [16 rows, 64]
    src = R.rs_columns(mode)
    shuffled_col = col[:, src].view(16, 8, 8)  # [row, word, nibble] -> original column
    for lane in range(32):
        gid, t = lane // 4, lane % 4
        held = set()
        for rh in range(2):
            for sp in range(2):
                for nib in range(8):
                    held.add((gid + 8 * rh, int(shuffled_col[gid + 8 * rh, 2 * t + sp, nib])))
        assert held == _fragment(lane), lane
    for q in range(4):  # the asm output order <-> the nibble
        for e in range(2):
            nib = R.rs_nibble(q, e, mode)
            h, s_lo = q & 1, q >> 1
            for t in range(4):
                for sp in range(2):
                    assert int(shuffled_col[0, 2 * t + sp, nib]) == 32 * sp + 16 * s_lo + 8 * h + 2 * t + e
    if mode == 0:  # lop3(w >> 4q, 0x000F000F): low half nibble q (e = 0), high half nibble q + 4 (e = 1)
        assert [R.rs_nibble(q, e, 0) for q in range(4) for e in range(2)] == [0, 4, 1, 5, 2, 6, 3, 7]
        assert "prmt" not in R._ASM_RS_BF16_S and "mov.b32 {$0, $1}, a0;" in R._ASM_RS_BF16_S
    else:
        assert [R.rs_nibble(q, e, 1) for q in range(4) for e in range(2)] == list(range(8))


@pytest.mark.parametrize("mode,bk", [(0, 64), (0, 128), (1, 64)])
def test_rs_column_algebra(mode, bk):
    """The kernel's join / reshape / permute (``_rs_deq``, emulated with torch.stack = gl.join) puts each
    dequantized value at its original column."""
    src = (Path(R.__file__).read_text())
    assert f"gl.permute(t, {R.RS_PERM})" in src and "[BN, BK // 64, 4, 2, 2, 2, 2]" in src
    bn, bw = 16, bk // 8
    cols = torch.arange(bk).repeat(bn, 1)
    sh = cols.view(bn, bk // 64, 64)[:, :, R.rs_columns(mode)].reshape(bn, bw, 8)  # [n, word, nibble]
    o = [sh[:, :, R.rs_nibble(j // 2, j % 2, mode)] for j in range(8)]  # asm output j
    j = lambda a, b: torch.stack([a, b], -1)  # noqa: E731
    t = j(j(j(o[0], o[1]), j(o[2], o[3])), j(j(o[4], o[5]), j(o[6], o[7])))
    t = t.reshape(bn, bk // 64, *R.RS_SPLIT).permute(R.RS_PERM).reshape(bn, bk)
    assert torch.equal(t, cols)


def _layout_points(bases, shape):
    """Emulate a linear layout: (warp, lane, register) -> (row, word), the XOR of the bases of the set bits."""
    reg, lane, warp = bases
    pts = {}
    for v in range(1 << len(warp)):
        for ln in range(1 << len(lane)):
            for i in range(1 << len(reg)):
                r = w = 0
                for bits, bs in ((v, warp), (ln, lane), (i, reg)):
                    for b, (dr, dw) in enumerate(bs):
                        if bits >> b & 1:
                            r, w = r ^ dr, w ^ dw
                assert r < shape[0] and w < shape[1]
                pts[(v, ln, i)] = (r, w)
    return pts


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("warps,bn,bk", [(4, 64, 64), (4, 128, 64), (4, 64, 128), (8, 128, 64), (8, 256, 64),
                                         (8, 128, 128)])
def test_rs_fragment_mapping_all_warpgroups(mode, warps, bn, bk):
    """Every warpgroup (not just the first) dequantizes the words of its own rows: emulate the words'
    register layout (``_rs_words_layout``) for all warps and check that each thread holds, after the
    re-layout, exactly wgmma's A fragment of its warpgroup (PTX ISA, m64k16: warp v % 4 of warpgroup
    v // 4 owns rows 16 (v % 4) .. + 15 of the warpgroup's 64, which sit at 64 (v // 4) + 16 warps r of
    the tile for repetition r: the accumulator's warps_per_cta [warps, 1])."""
    _gluon()
    bw = bk // 8
    wl = R._rs_words_layout(bn, bk, warps)  # the kernel's own layout (a constexpr function: plain Python here)
    pts = _layout_points((wl.reg_bases, wl.lane_bases, wl.warp_bases), (bn, bw))
    assert sorted(pts.values()) == [(r, w) for r in range(bn) for w in range(bw)]  # a bijection
    src = R.rs_columns(mode)  # position 8 * word + nibble of a 64-column block <- its column
    for v in range(warps):
        g, vi = divmod(v, 4)
        for lane in range(32):
            held = set()
            for i in range(len(pts) // (32 * warps)):
                r, w = pts[(v, lane, i)]
                for nib in range(8):
                    held.add((r, 64 * (w // 8) + int(src[8 * (w % 8) + nib])))
            want = set()
            for rep in range(bn // (16 * warps)):
                row0 = 16 * warps * rep + 64 * g + 16 * vi
                for kb in range(bk // 64):
                    want |= {(row0 + r, 64 * kb + c) for r, c in _fragment(lane)}
            assert held == want, (v, lane)


def test_rs_ok_tiles():
    assert R.rs_ok(64, 64, 4) and R.rs_ok(128, 64, 4) and R.rs_ok(128, 128, 8)
    assert not R.rs_ok(256, 64, 4) and not R.rs_ok(64, 32, 4) and not R.rs_ok(64, 64, 2)
    assert not R.rs_ok(192, 64, 12) and not R.rs_ok(256, 64, 16) and not R.rs_ok(64, 192, 4)  # never compiled


def test_rss_sweep_candidates():
    """kernel_sweep's small-M set: per M bucket only the 8/16/32-row tile that holds it, every candidate a tile the
    rs kernel takes (else it would silently run the plain wg kernel), split-K filling the SMs once or twice with at
    least two chunks per range, unique names."""
    from types import SimpleNamespace

    from _guards import load_bench

    ks = load_bench("kernel_sweep")
    for n, k in ((4096, 4096), (57344, 8192), (8192, 28672), (6144, 4096)):
        kern = SimpleNamespace(N=n, K=k)
        for mb, bm in ((1, 8), (2, 8), (4, 8), (8, 8), (16, 16), (32, 32)):
            cands = ks.gemm_cfgs(kern, mb, "rss")
            assert len(cands) == 14 and len({nm for nm, _ in cands}) == 14
            for nm, c in cands:
                assert c["BM"] == bm and c["rs"] and c["path"] == "wg", (nm, c)
                assert R.rs_ok(c["BN"], c["BK"], c["warps"]) and c["BM"] in R.RS_BM, (nm, c)
                tiles = -(-n // c["BN"])
                target = 132 * (2 if nm.endswith("f2") else 1)
                assert 1 <= c["split"] <= max(1, (k // c["BK"]) // 2)
                assert tiles * c["split"] >= target or c["split"] == max(1, (k // c["BK"]) // 2), (nm, c, tiles)
    assert ks.gemm_cfgs(SimpleNamespace(N=4096, K=4096), 64, "rs2")  # the large-M sets are unchanged


def test_rs_config_falls_back_off_hopper():
    """Where the kernel cannot run (here: CPU) an ``rs`` config still gives a working plan."""
    if _hopper():
        pytest.skip("CPU wiring check")
    from quantkit.kernels import lowbit

    spec, p, gidx = make_int(48, 128, 4, 64, False, seed=3)
    kern = lowbit.build_int(format_from_spec(spec), p, (48, 128), DEV, impl="k")
    x = rand_x(4, 128, torch.bfloat16, 5)
    c = {"path": "wg", "rs": True, "BM": 128, "BN": 64, "BK": 64, "warps": 4, "stages": 4}
    check(run_poisoned(kern, c, x), x.double() @ ref_int(p, 48, 128, 4, gidx, False).t(), torch.bfloat16)


# ---- GPU: against the float64 reference ----------------------------------------------------------
def _plan_is_rs(kern, m, dtype, c) -> bool:
    kern.plans.clear()
    return kern.plan(m, dtype, c).__name__ == "run_rs"


@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU (QUANTKIT_TEST_CUDA=1 on an H100/H200)")
@pytest.mark.parametrize("m,n,k,bits,g,sym,dtype,cfg,extra", [
    (200, 264, 1024, 4, 128, True, torch.bfloat16, (128, 128, 64, 8, 5), {}),   # M, N tails
    (64, 256, 512, 4, 64, False, torch.float16, (64, 64, 64, 4, 6), {}),        # asym g64, fp16
    (300, 520, 768, 4, None, False, torch.bfloat16, (256, 128, 64, 8, 4), {}),  # per channel, asym
    (513, 128, 4096, 4, 128, True, torch.bfloat16, (256, 64, 64, 4, 4), {"epi": 0}),  # strided stores
    (130, 136, 192, 4, 64, True, torch.float16, (128, 128, 64, 4, 5), {}),      # 3 chunks; 128 rows / warpgroup
    (256, 384, 1024, 4, 128, False, torch.bfloat16, (128, 64, 128, 4, 3), {}),  # 128-column chunks
    (200, 264, 1024, 4, 128, False, torch.bfloat16, (128, 128, 64, 8, 4), {"split": 3}),  # split-K 6+6+4
    (130, 520, 768, 4, 64, True, torch.float16, (256, 64, 64, 4, 4), {"split": 4}),
    (96, 200, 512, 3, 128, True, torch.bfloat16, (128, 64, 64, 4, 4), {}),     # 3-bit codes (repacked nibbles)
    (300, 264, 1024, 4, 128, False, torch.bfloat16, (256, 128, 64, 8, 4), {"ws": True}),  # TMA loader warp
    (130, 520, 768, 4, 64, True, torch.float16, (128, 64, 64, 4, 5), {"ws": True, "split": 3}),
    (513, 136, 192, 4, 64, False, torch.bfloat16, (128, 128, 64, 8, 5), {"ws": True}),  # 3 chunks < stages
    # small M (kernel_sweep's rss set): 8-32-row x tiles, M below the tile, split-K, the loader warp
    (1, 264, 1024, 4, 128, True, torch.bfloat16, (8, 64, 64, 4, 8), {"split": 5}),
    (3, 520, 768, 4, 64, False, torch.float16, (8, 128, 128, 8, 4), {"split": 3, "ws": True}),
    (13, 264, 1024, 4, 128, True, torch.bfloat16, (16, 128, 64, 8, 6), {"split": 4}),
    (32, 136, 512, 4, 128, False, torch.bfloat16, (32, 64, 128, 4, 5), {"ws": True}),
    (17, 200, 1024, 4, 128, True, torch.bfloat16, (16, 64, 64, 4, 8), {}),  # M > BM: two row tiles
])
def test_rs_matches_reference(m, n, k, bits, g, sym, dtype, cfg, extra):
    from quantkit.kernels import lowbit

    _gluon()
    spec, p, gidx = make_int(n, k, bits, g, sym, seed=m + n)
    kern = lowbit.build_int(format_from_spec(spec), {a: v.to(DEV) for a, v in p.items()}, (n, k), DEV, impl="k")
    bm, bn, bk, w, st = cfg
    c = {"path": "wg", "rs": True, "BM": bm, "BN": bn, "BK": bk, "warps": w, "stages": st, **extra}
    assert _plan_is_rs(kern, m, dtype, c)
    x = rand_x(m, k, dtype, m + k)
    check(run_poisoned(kern, c, x), x.double() @ ref_int(p, n, k, bits, gidx, sym).t(), dtype)


@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU (QUANTKIT_TEST_CUDA=1 on an H100/H200)")
@pytest.mark.parametrize("m,n,k,g,fixed,dtype", [
    (200, 264, 1024, 128, None, torch.bfloat16),   # any4, per-row tables + group scales
    (130, 136, 512, None, None, torch.float16),     # any4 rows, no scales
    (256, 128, 768, 64, "nf4", torch.bfloat16),     # one shared table
])
@pytest.mark.parametrize("ws", [False, True])
@pytest.mark.parametrize("bm", [128, 8])
def test_rs_lut_matches_reference(m, n, k, g, fixed, dtype, ws, bm):
    from quantkit.kernels import lowbit

    _gluon()
    spec, p = make_lut(n, k, 4, g, fixed=fixed, seed=m + n)
    kern = lowbit.build_lut(format_from_spec(spec), {a: v.to(DEV) for a, v in p.items()}, (n, k), DEV, impl="k")
    c = {"path": "wg", "rs": True, "BM": bm, "BN": 128, "BK": 64, "warps": 8, "stages": 4, "ws": ws,
         "split": 1 if bm > 8 else 2}
    m = m if bm > 8 else 2  # small M: 2 rows in an 8-row tile
    assert _plan_is_rs(kern, m, dtype, c)
    x = rand_x(m, k, dtype, m + k)
    check(run_poisoned(kern, c, x), x.double() @ ref_lut(p, n, k, 4, g).t(), dtype)


@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU (QUANTKIT_TEST_CUDA=1 on an H100/H200)")
def test_rs_untaken_tile_runs_plain_wg():
    from quantkit.kernels import lowbit

    _gluon()
    spec, p, gidx = make_int(256, 512, 4, 128, True, seed=1)
    kern = lowbit.build_int(format_from_spec(spec), {a: v.to(DEV) for a, v in p.items()}, (256, 512), DEV, impl="k")
    c = {"path": "wg", "rs": True, "BM": 128, "BN": 256, "BK": 64, "warps": 4, "stages": 4}  # 256 rows: no rs
    assert not _plan_is_rs(kern, 200, torch.bfloat16, c)
    x = rand_x(200, 512, torch.bfloat16, 2)
    check(run_poisoned(kern, c, x), x.double() @ ref_int(p, 256, 512, 4, gidx, True).t(), torch.bfloat16)


# ---- CPU: the A-register race of an asynchronous RS wgmma, on SASS ---------------------------------
_SASS_INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _sass_dests(text: str) -> set[int]:
    """General registers an instruction writes (its first operand; the width from the opcode)."""
    t = re.sub(r"^@!?U?P\w+\s+", "", text)
    op, _, rest = t.partition(" ")
    if op.startswith(("HGMMA", "ST", "BAR", "BRA", "WARPGROUP", "UTMA", "SYNCS", "EXIT", "RED")) \
            or op.startswith("ATOM") and not op.startswith("ATOMS"):
        return set()
    m = re.fullmatch(r"R(\d+)", rest.split(",")[0].strip())
    if not m:
        return set()
    wide = 4 if ".128" in op or re.search(r"LDSM\.\S*\.4$", op) else \
        2 if ".64" in op or "WIDE" in op or op == "CS2R" or re.search(r"LDSM\.\S*\.2$", op) else 1
    return set(range(int(m.group(1)), int(m.group(1)) + wide))


def _sass_wgmma_hazards(sass: str) -> list[str]:
    """In every loop with HGMMA: the instructions that write an HGMMA's A registers or touch its
    accumulators while it may be in flight, i.e. from the HGMMA, around the loop, to the second
    ``WARPGROUP.DEPBAR.LE gsb0, 0x1`` (the first only retires the group before) or a ``0x0``. All
    paths of the body are walked (a superset of those taken)."""
    ins, labels, pending = [], {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*\.L_x_(\d+):", line)
        if m:
            pending = m.group(1)
            continue
        m = _SASS_INS.search(line)
        if m:
            if pending is not None:
                labels[pending] = len(ins)
                pending = None
            ins.append((int(m.group(1), 16), m.group(2)))
    out = []
    for j, (_, t) in enumerate(ins):
        m = re.search(r"BRA\s+`\(\.L_x_(\d+)\)", t)
        if not m or labels.get(m.group(1), j + 1) > j:
            continue
        body = ins[labels[m.group(1)]:j + 1]
        for k, (ha, ht) in enumerate(body):
            mm = re.search(r"HGMMA\.\d+x(\d+)x\d+\S*\s+R(\d+),\s+R(\d+),", ht)
            if not mm:
                continue
            a_regs = set(range(int(mm.group(3)), int(mm.group(3)) + 4))
            acc = set(range(int(mm.group(2)), int(mm.group(2)) + int(mm.group(1)) // 2))
            seen = 0
            for s in range(1, 2 * len(body)):
                xa, xt = body[(k + s) % len(body)]
                if "DEPBAR.LE gsb0, 0x0" in xt:
                    break
                if "DEPBAR.LE gsb0, 0x1" in xt:
                    seen += 1
                    if seen == 2:
                        break
                    continue
                if "HGMMA" in xt:
                    continue
                used = {int(r) for r in re.findall(r"\bR(\d+)\b", xt)} & acc
                if _sass_dests(xt) & (a_regs | acc) or used:
                    out.append(f"HGMMA @{ha:04x} (A R{min(a_regs)}) in flight, @{xa:04x}: {xt}")
    return out


def _fake_sass(pingpong: bool) -> str:
    """A dequantize + RS wgmma loop in nvdisasm's format: one register set (the race of the first
    version) or two (the fix)."""
    lines, a = [".L_x_1:"], 0

    def ins(t):
        nonlocal a
        lines.append(f"        /*{a:04x}*/                   {t} ;")
        a += 16

    for half in (0, 1) if pingpong else (0,):
        r = 88 + 16 * half
        ins("SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4+0x19000], R11")
        ins("LDS.64 R12, [R7+0x14000]")
        for q in range(16):
            ins(f"HADD2.BF16_V2 R{r + q}, R12, R14")
        ins("BAR.SYNC.DEFER_BLOCKING 0x0")
        ins("WARPGROUP.ARRIVE")
        for q in range(4):
            ins(f"HGMMA.64x128x16.F32.BF16 R24, R{r + 4 * q}, gdesc[UR20], R24" + (", gsb0" if q == 3 else ""))
        ins("WARPGROUP.DEPBAR.LE gsb0, 0x1")
    ins("@P0 BRA `(.L_x_1)")
    ins("WARPGROUP.DEPBAR.LE gsb0, 0x0")
    return "\n".join(lines)


def test_sass_race_checker():
    """The checker flags the first version's loop (the next chunk dequantized into the registers of the
    wgmma still in flight) and passes the two-set loop."""
    bad = _sass_wgmma_hazards(_fake_sass(False))
    assert len(bad) == 16 and all("HADD2" in b for b in bad), bad
    assert _sass_wgmma_hazards(_fake_sass(True)) == []
    assert _sass_dests("LDS.128 R20, [R2]") == {20, 21, 22, 23} and _sass_dests("STSM.16.MT88.4 [R6], R24") == set()
    assert _sass_dests("@P0 IMAD.WIDE R10, R13, 0x2, R2") == {10, 11}
    assert _sass_dests("ISETP.NE.AND P0, PT, R1, R2, PT") == set()


# ---- CPU: compiled for sm_90, the PTX ------------------------------------------------------------
_COMPILE = r"""
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from quantkit.kernels import _wgmma as W, _wgmma_rs as R

mode, nw, bn, bm, bk, st, epi, sk = (int(a) for a in sys.argv[1:9])
dt, ws = sys.argv[9], sys.argv[10] == "1"
x = torch.empty(256, 1024, dtype=torch.bfloat16 if dt == "bf16" else torch.float16)
xd = W.TensorDescriptor.from_tensor(x, [bm, bk], W.x_layout(bm, bk, x.dtype))
wd = W.w_descriptor(torch.empty(512, 128, dtype=torch.int32), bn, bk)
sig = {"x_desc": mangle_type(xd), "w_desc": mangle_type(wd), "s_ptr": "*fp16", "z_ptr": "*u8",
       "out_ptr": "*" + dt, "M": "i32", "N": "i32", "K": "i32", "G": "i32", "lut_ptr": "*i32",
       "ws_ptr": "*fp32", "cnt_ptr": "*i32", "cps": "i32", "SPLIT": "i32"}
const = {"MODE": mode, "LUT_ROW": True, "HAS_SCALE": True, "HAS_ZERO": mode == 0, "ZC": 8.0, "GS": 128,
         "STAGES": st, "GROUP_M": 8, "EPI": epi, "SPLITK": bool(sk), "WS": ws}
names = list(sig) + list(const)
sig.update({c: "constexpr" for c in const})
src = GluonASTSource(R.w4a16_wgmma_rs, sig, {(names.index(c),): v for c, v in const.items()})
ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw})
sass = None  # nvdisasm of the cubin (Triton ships it beside ptxas)
import os, subprocess, tempfile
nvd = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
if "cubin" in ck.asm and os.path.exists(nvd):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        sass = subprocess.run([nvd, "-c", f.name], capture_output=True, text=True, check=True).stdout
print(json.dumps({"ptx": ck.asm["ptx"], "shared": ck.metadata.shared, "sass": sass}))
"""


@pytest.mark.parametrize("mode,nw,bn,bm,bk,st,epi,sk,dt,ws", [
    (0, 4, 64, 256, 64, 4, 0, 0, "bf16", 0),
    (0, 8, 128, 128, 64, 5, 1, 1, "bf16", 0),
    (1, 4, 64, 128, 128, 3, 0, 0, "fp16", 0),
    (0, 8, 128, 256, 64, 4, 1, 0, "bf16", 1),
    (0, 8, 128, 256, 64, 4, 1, 0, "bf16", 0),
    (0, 4, 64, 128, 64, 5, 1, 0, "bf16", 0),
    (1, 8, 128, 128, 64, 4, 1, 0, "bf16", 1),
    (0, 4, 64, 8, 64, 8, 1, 1, "bf16", 0),     # small M (kernel_sweep's rss set): 8-row x tile, split-K
    (1, 8, 128, 16, 128, 4, 1, 1, "bf16", 1),
    (0, 8, 128, 32, 64, 6, 0, 1, "fp16", 0),
], ids=["int-4w-bm256", "int-8w-splitk-epi1", "lut-fp16-bk128", "int-8w-ws", "int-8w-bm256", "int-4w-bm128-s5",
        "lut-8w-ws", "int-bm8-splitk", "lut-bm16-ws-splitk", "int-bm32-epi0"])
def test_rs_compiles_to_register_a_wgmma_for_sm90(mode, nw, bn, bm, bk, st, epi, sk, dt, ws):
    """In a fresh process (Triton's interpreter, selected for the other kernel tests, patches this one)."""
    import json
    import os
    import subprocess
    import sys

    _gluon()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [str(a) for a in (mode, nw, bn, bm, bk, st, epi, sk, dt, ws)]
    r = subprocess.run([sys.executable, "-c", _COMPILE, *args], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode and "ptxas" in r.stderr.lower() and "not found" in r.stderr.lower():
        pytest.skip(f"no ptxas here: {r.stderr[-200:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ptx = out["ptx"]
    # an asynchronous wgmma reads its A registers (and accumulators) until the wait that retires it: on the
    # SASS nothing else may touch them in between (the first version dequantized chunk c + 1 into the
    # registers wgmma c was still reading: wrong results on the H100)
    if out["sass"] is not None:
        assert "HGMMA" in out["sass"]
        assert _sass_wgmma_hazards(out["sass"]) == [], _sass_wgmma_hazards(out["sass"])[:8]
    ty = "bf16" if dt == "bf16" else "f16"
    # the A operand: four 32-bit registers (RS), not a shared-memory descriptor; BK / 16 per chunk, in
    # three copies of the chunk (chunk 0 of an odd count, then even and odd chunks: the loop unrolled by two)
    per = (bk // 16) * (bn // (16 * nw))
    rs = re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{bm}k16\.f32\.{ty}\.{ty} \{{[^}}]*\}}, "
                    r"\{(%r\d+,%r\d+,%r\d+,%r\d+)\}", ptx)
    assert len(rs) == 3 * per, len(rs)
    # the PTX side of it: the even and odd chunks' wgmmas read disjoint registers
    sets = [{r for a in rs[i * per:(i + 1) * per] for r in a.split(",")} for i in range(3)]
    assert not sets[1] & sets[2], sorted(sets[1] & sets[2])
    assert "wgmma.wait_group.sync.aligned 1" in ptx  # one wgmma in flight while the next chunk dequantizes
    assert "cp.async.bulk.tensor.2d" in ptx  # TMA loads of x and the words
    assert "ld.local" not in ptx and "st.local" not in ptx  # no spills through local memory
    # the dequantized values never go to shared memory: the only shared stores are the epilogue's
    # stmatrix (EPI 1), split-K's broadcast of the tile counter and (ws) the partitions' arguments
    stores = [st.replace("::cta", "") for st in re.findall(r"\bst\.shared\S*", ptx)]
    if ws:  # + the partitions' captured scalars (a few 32-bit words)
        assert set(stores) <= {"st.shared.b32", "st.shared.v2.b32"} and len(stores) <= 4, stores
        assert "setmaxnreg" in ptx and "mbarrier.arrive" in ptx  # loader warp: registers given back, slot hand-over
    else:
        assert stores == (["st.shared.b32"] if sk else []), stores
    assert ("stmatrix" in ptx) == (epi == 1)
    # the words: one 8-byte shared load per (row half, 64-column block)
    nld, words = len(re.findall(r"ld\.shared\.v2\.b32", ptx)), 3 * 2 * (bk // 64) * (bn // (16 * nw))
    assert words <= nld <= words + (2 if ws else 0), nld  # (3 copies of the chunk; ws: + the partitions' arguments)
    if mode == 0:
        assert "prmt" not in ptx  # the int dequantization needs no byte permutes at all
    assert ("atom.global" in ptx) == bool(sk)
    assert out["shared"] <= 227 * 1024
