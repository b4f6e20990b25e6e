"""FP8 kernels for the ``fp8`` format: W8A8 (dynamic per-token or static activation scales) and
W8A16 (weight-only).

W8A8: one Triton kernel quantizes the activations (per-row absmax -> scale -> saturating FP8
cast, one program per row, the row read twice from L1/L2), then the FP8 GEMM runs either through
``torch._scaled_mm`` (cuBLASLt, row-wise scales) or a Triton FP8 ``tl.dot`` kernel with the scales
in its epilogue; which one is used per M bucket comes from the tuned table (both are measured by
bench/kernel_bench.py). Small M uses an FMA split-K GEMV on the FP8 codes, which by default quantizes
the activations itself (each program derives the row's scale from the whole row, then quantizes the
slice it multiplies: one launch, bit-identical to the two-launch path; config ``"fq": False`` keeps two).
W8A16: the FP8 weight is read as is ([out, in], no repack): FMA GEMV for small M, a ``tl.dot``
kernel converting FP8 tiles to the activation dtype for mid M, and convert-then-cuBLAS for large M.

Numerics follow quantkit/formats/fp8.py: y = (x_q @ w_q^T) * s_x * s_w^T with fp32 accumulation.
Own code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import register_kernel
from ._launch import INTERPRET, Launcher, cdiv, checked, ctypes_launch, ctypes_run, tiled_workspace, workspace
from ._tl import _finish, _tile_mn
from .base import LayerKernel

_INTERP = tl.constexpr(INTERPRET)
_FMAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


@triton.jit
def _round_fp8(v, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """Round fp32 v (|v| <= fmax) to the FP8 grid, nearest-even, in fp32 arithmetic, so the cast
    that follows is exact whatever rounding the backend's cast uses (the interpreter's differs)."""
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, EMIN)
    ulp = ((e - MBITS + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - (e - MBITS)) << 23).to(tl.float32, bitcast=True)
    a = v * inv
    r = (a + 12582912.0) - 12582912.0  # round half to even (|a| < 2^22)
    return r * ulp


@triton.jit
def _act_quant(x_ptr, q_ptr, s_ptr, sin_ptr, K, FMAX: tl.constexpr, STATIC: tl.constexpr, BK: tl.constexpr,
               MBITS: tl.constexpr, EMIN: tl.constexpr):
    """One row: s = max|x| / FMAX (1 where the row is zero) or the static scale; q = sat(x / s)."""
    m = tl.program_id(0)
    offs = tl.arange(0, BK)
    row = x_ptr + m.to(tl.int64) * K
    if STATIC:
        s = tl.load(sin_ptr).to(tl.float32)
    else:
        amax = tl.zeros([BK], dtype=tl.float32)
        for k0 in range(0, K, BK):
            v = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        s = tl.max(amax, axis=0) / FMAX
        s = tl.where(s > 0, s, 1.0)
    for k0 in range(0, K, BK):
        v = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        q = _round_fp8(tl.minimum(tl.maximum(tl.math.div_rn(v, s), -FMAX), FMAX), MBITS, EMIN)
        tl.store(q_ptr + m.to(tl.int64) * K + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=k0 + offs < K)
    tl.store(s_ptr + m, s)


@triton.jit
def _pow2_scale(x_ptr, s_ptr, K, BK: tl.constexpr):
    """One row: s = 2^k with max|x| / s < 2^15 (1 for a zero row), so x / s is exact in fp16 (down to
    its subnormals, 2^-39 of the row's largest value): the W8A16 tensor-core path multiplies in fp16,
    where the FP8 weight converts with one instruction per pair, and multiplies s back in after."""
    m = tl.program_id(0)
    offs = tl.arange(0, BK)
    row = x_ptr + m.to(tl.int64) * K
    amax = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        v = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    a = tl.max(amax, axis=0)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    k = tl.minimum(tl.maximum(e - 14, -126), 127)
    sc = ((k + 127) << 23).to(tl.float32, bitcast=True)
    tl.store(s_ptr + m, tl.where(a > 0, sc, 1.0))


@triton.jit(do_not_specialize=["M", "KPS", "SPLIT"])
def _fp8_gemv(x_ptr, w_ptr, xs_ptr, ws_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, KPS, SPLIT,
              XSCALE: tl.constexpr, WS_ROW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr, SPLITK: tl.constexpr, EVEN_K: tl.constexpr, QX: tl.constexpr = 0,
              FMAX: tl.constexpr = 448.0, MBITS: tl.constexpr = 3, EMIN: tl.constexpr = -6, BKA: tl.constexpr = 256):
    """out[m, n] = sum_k x[m, k] * w[n, k] (* xs[m]) * ws[n]; w FP8 [N, K] read once.
    EVEN_K (K % BK == 0): no mask along K, so loads stay 16-byte vectors.
    QX (W8A8 in one launch): x is the unquantized activation and every program quantizes the slice it
    reads itself, with the row's scale it derives first (QX = 1: max|x[m, :]| / FMAX over the whole row,
    1 where the row is zero; QX = 2: the static scale at xs_ptr) — the same arithmetic as
    ``_act_quant``, so the codes, and the output, are the two-launch path's bit for bit."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_m = tl.arange(0, BM)
    mmask = offs_m < M
    kb = tl.arange(0, BK)
    if QX == 1:  # the row's max |x| in BKA-wide chunks (wider than the GEMV's: few iterations, 16-byte loads)
        ka = tl.arange(0, BKA)
        amax = tl.zeros([BM, BKA], dtype=tl.float32)
        for k in range(0, K, BKA):
            kk = k + ka
            v = tl.load(x_ptr + offs_m[:, None] * K + kk[None, :], mask=mmask[:, None] & (kk[None, :] < K),
                        other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        sq = tl.max(amax, axis=1) / FMAX
        sq = tl.where(sq > 0, sq, 1.0)
    elif QX == 2:
        sq = tl.load(xs_ptr + offs_m * 0).to(tl.float32)
    acc = tl.zeros([BM, BN, BK], dtype=tl.float32)
    k0 = pid_k * (KPS // BK) * BK  # = pid_k * KPS; so written, k0 % BK == 0 is known (16-byte loads)
    k1 = tl.minimum(k0 + KPS, K)
    for k in range(k0, k1, BK):
        kk = k + kb
        if EVEN_K:
            w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + kk[None, :], mask=nmask[:, None],
                        other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + offs_m[:, None] * K + kk[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
        else:
            kmask = kk < k1
            w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + kk[None, :],
                        mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + offs_m[:, None] * K + kk[None, :], mask=mmask[:, None] & kmask[None, :],
                         other=0.0).to(tl.float32)
        if QX != 0:
            xv = _round_fp8(tl.minimum(tl.maximum(tl.math.div_rn(xv, sq[:, None]), -FMAX), FMAX), MBITS, EMIN)
        acc += xv[:, None, :] * w[None, :, :]
    res = tl.sum(acc, axis=2)
    if WS_ROW:
        sw = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
    else:
        sw = tl.load(ws_ptr + offs_n * 0)
    res = res * sw[None, :]
    if QX != 0:
        res = res * sq[:, None]
    elif XSCALE:
        sx = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
        res = res * sx[:, None]
    _finish(res, out_ptr, part_ptr, cnt_ptr, offs_m, offs_n, M, N, pid_n, pid_k, SPLIT, BM, BN, SPLITK)


@triton.jit(do_not_specialize=["M", "KPS", "SPLIT"])
def _fp8_gemm(x_ptr, w_ptr, xs_ptr, ws_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, KPS, SPLIT,
              XSCALE: tl.constexpr, WS_ROW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr, SPLITK: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
              F16X: tl.constexpr = False, SWAP: tl.constexpr = False):
    """Tensor-core GEMM, w FP8 [N, K]; x FP8 (W8A8: FP8 dot) or 16-bit (W8A16: w converted).
    F16X (W8A16, bf16 x): x / xs (a power of two per row, _pow2_scale) and w in fp16, xs after.
    SWAP (W8A16): computes W x^T, the converted weight tile is the register A operand (small M)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _tile_mn(pid, M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mmask = offs_m < M
    nmask = offs_n < N
    kb = tl.arange(0, BK)
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    k0 = pid_k * (KPS // BK) * BK  # = pid_k * KPS; so written, k0 % BK == 0 is known (16-byte loads)
    k1 = tl.minimum(k0 + KPS, K)
    XDT = x_ptr.dtype.element_ty
    if F16X:
        xinv = 1.0 / tl.load(xs_ptr + offs_m, mask=mmask, other=1.0)  # exact: powers of two
    for k in range(k0, k1, BK):
        kk = k + kb
        if EVEN_K:
            a = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + kk[None, :], mask=mmask[:, None], other=0.0)
            b = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + kk[None, :], mask=nmask[:, None], other=0.0)
        else:
            kmask = kk < k1
            a = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + kk[None, :],
                        mask=mmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + kk[None, :],
                        mask=nmask[:, None] & kmask[None, :], other=0.0)
        if F16X:
            a = (a.to(tl.float32) * xinv[:, None]).to(tl.float16)
            b = b.to(tl.float16)
        if _INTERP:
            if SWAP:
                acc = tl.dot(b.to(tl.float32), tl.trans(a.to(tl.float32)), acc)
            else:
                acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc)
        elif SWAP:
            acc = tl.dot(b.to(a.dtype), tl.trans(a), acc)
        elif XSCALE or F16X:
            acc = tl.dot(a, tl.trans(b), acc)
        else:
            acc = tl.dot(a, tl.trans(b.to(XDT)), acc)
    if SWAP:
        acc = tl.trans(acc)
    if WS_ROW:
        sw = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
    else:
        sw = tl.load(ws_ptr + offs_n * 0)
    acc = acc * sw[None, :]
    if XSCALE or F16X:
        sx = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
        acc = acc * sx[:, None]
    _finish(acc, out_ptr, part_ptr, cnt_ptr, offs_m, offs_n, M, N, pid, pid_k, SPLIT, BM, BN, SPLITK)


class FP8Kernel(LayerKernel):
    """``x -> x @ W^T`` for one fp8 layer."""

    def __init__(self, shape, device, w, ws, act: str, act_dtype, xs_static, fallback, tag: str):
        super().__init__(shape, device, tag, fallback)
        self.w = w                       # [N, K] fp8, as stored
        self.ws = ws                     # [N] or [1] fp32
        self.ws_row = ws.numel() > 1
        self.ws_full = ws.expand(self.N).reshape(1, self.N).contiguous()  # [1, N] for _scaled_mm
        self.act = act                   # "none" | "dynamic" | "static"
        self.act_dtype = act_dtype
        self.fmax = _FMAX.get(act_dtype, 448.0)
        self.xs_static = xs_static
        # cuBLASLt has no e5m2 x e5m2 FP8 GEMM
        self.smm_ok = not (w.dtype == torch.float8_e5m2 and act_dtype == torch.float8_e5m2)
        # K loads are unmasked whenever BK divides K (EVEN_K): a run-time K mask keeps them byte-wide
        bk = min(triton.next_power_of_2(self.K), 2048)
        # the activation format's mantissa bits and lowest normal exponent (_round_fp8), for both act-quant paths
        self.mbits, self.emin = mbits, emin = (2, -14) if act_dtype == torch.float8_e5m2 else (3, -6)
        self.q_launch = Launcher(_act_quant, dict(FMAX=self.fmax, STATIC=act == "static", BK=bk, MBITS=mbits,
                                                  EMIN=emin),
                                 num_warps=8 if bk >= 1024 else 4, num_stages=1, device=device)
        self.s_launch = Launcher(_pow2_scale, dict(BK=bk), num_warps=8 if bk >= 1024 else 4, num_stages=1,
                                 device=device)

    def default_config(self, mb: int, dtype) -> dict:
        n, k, sms = self.N, self.K, 132
        if mb <= 4:
            bn, bk = 16, 256
            tiles = cdiv(n, bn)
            split = max(1, min(cdiv(k, 4 * bk), cdiv(4 * sms, tiles)))
            return {"path": "gemv", "BN": bn, "BK": bk, "warps": 4, "stages": 3, "split": split}
        if self.act != "none" and mb >= 8 and dtype == torch.bfloat16 and self.smm_ok:
            return {"path": "scaled_mm"}
        if self.act == "none" and mb >= 512:
            return {"path": "dq"}
        bm = 16 if mb <= 16 else (32 if mb <= 32 else (64 if mb <= 64 else 128))
        bn = 64 if mb <= 64 else 128
        bk = 128
        tiles = cdiv(n, bn) * cdiv(mb, bm)
        split = max(1, min(cdiv(k, 4 * bk), cdiv(2 * sms, tiles))) if mb <= 64 else 1
        return {"path": "gemm", "BM": bm, "BN": bn, "BK": bk, "warps": 4 if bm <= 64 else 8, "stages": 3,
                "split": split, "group_m": 1 if mb <= 64 else 8}

    def check_config(self, cfg: dict, mb: int, dtype) -> dict:
        if cfg["path"] == "gemv" and mb > self.gemv_max_m:
            return self.default_config(64, dtype)
        if cfg["path"] == "scaled_mm" and (dtype != torch.bfloat16 or not self.smm_ok):
            return self.default_config(64, dtype) | {"split": 1, "BM": 128, "BN": 128, "warps": 8, "group_m": 8}
        return cfg

    def make_plan(self, cfg: dict, dtype, mb: int):
        N, K = self.N, self.K
        w, ws = self.w, self.ws
        path = cfg["path"]
        quant = self.act != "none"
        qlau = self.q_launch
        sin = self.xs_static if self.xs_static is not None else ws
        adt = self.act_dtype

        def qx(x, M):
            xq = torch.empty((M, K), dtype=adt, device=x.device)
            xs = torch.empty((M,), dtype=torch.float32, device=x.device)
            qlau((M, 1, 1), x, xq, xs, sin, K)
            return xq, xs

        if path == "scaled_mm":
            wt = w.t()
            wsf = self.ws_full
            smm = torch._scaled_mm

            def run_smm(x, out, M):
                xq, xs = qx(x, M)
                smm(xq, wt, scale_a=xs.view(M, 1), scale_b=wsf, out_dtype=out.dtype, out=out)
            return run_smm
        if path == "dq":
            ws_row = ws.view(1, -1).to(dtype)

            def run_dq(x, out, M):
                torch.mm(x, w.to(dtype).t(), out=out)
                out.mul_(ws_row)
            return run_dq
        bk = cfg["BK"]
        split = max(1, min(int(cfg.get("split", 1)), cdiv(K, bk)))
        kps = cdiv(cdiv(K, split), bk) * bk
        split = cdiv(K, kps)
        splitk = split > 1
        bn = cfg["BN"]
        tiles_n = cdiv(N, bn)
        f16x = False
        if path == "gemv":
            bm = mb
            # W8A8: quantize x inside the GEMV (one launch, no buffers) unless the config says "fq": False
            qx_mode = (2 if self.act == "static" else 1) if quant and cfg.get("fq", True) else 0
            bka = max(bk, min(triton.next_power_of_2(K), 2048 // triton.next_power_of_2(bm)))
            lau = Launcher(_fp8_gemv, dict(XSCALE=quant, WS_ROW=self.ws_row, BM=bm, BN=bn, BK=bk, SPLITK=splitk,
                                           EVEN_K=K % bk == 0, QX=qx_mode, FMAX=self.fmax, MBITS=self.mbits,
                                           EMIN=self.emin, BKA=bka),
                           num_warps=cfg["warps"], num_stages=cfg["stages"], device=self.device)
            part, cnt = workspace(self.device, tiles_n * split * bm * bn if splitk else 0, tiles_n)
            grid = (tiles_n, split, 1)
        else:
            bm = cfg["BM"]
            f16x = (not quant) and dtype == torch.bfloat16 and bool(cfg.get("f16", True))
            lau = Launcher(_fp8_gemm, dict(XSCALE=quant, WS_ROW=self.ws_row, BM=bm, BN=bn, BK=bk, SPLITK=splitk,
                                           GROUP_M=int(cfg.get("group_m", 1)), EVEN_K=K % bk == 0, F16X=f16x,
                                           SWAP=bool(cfg.get("swap", False)) and not quant),
                           num_warps=cfg["warps"], num_stages=cfg["stages"], device=self.device)
            ws_for = tiled_workspace(self.device, bm, tiles_n, split, bm * bn)
            part, cnt = ws_for(mb)
            grid = None

        slau = self.s_launch
        if path == "gemv":
            return self._gemv_run(lau, grid, qx, part, cnt, kps, split, fused=qx_mode != 0)

        def run_triton(x, out, M):
            if quant:
                xq, xs = qx(x, M)
            elif f16x:
                xq, xs = x, torch.empty((M,), dtype=torch.float32, device=x.device)
                slau((M, 1, 1), x, xs, K)
            else:
                xq, xs = x, ws
            if grid is not None:
                lau(grid, xq, w, xs, ws, out, part, cnt, M, N, K, kps, split)
            else:
                pt, c = (part, cnt) if M <= mb else ws_for(M)
                lau((cdiv(M, bm) * tiles_n, split, 1), xq, w, xs, ws, out, pt, c, M, N, K, kps, split)
        return run_triton


    def _gemv_run(self, lau, grid, qx, part, cnt, kps, split, fused=False):
        """The GEMV plan (M <= 4): the activation quantization (W8A8; inside the GEMV when ``fused``) and
        the GEMV. After the first call they launch through the ctypes launch (kernels/src/_cuda_launch.py)
        where it is proven the same, else through Triton's compiled launcher."""
        N, K, w, ws = self.N, self.K, self.w, self.ws
        quant = self.act != "none" and not fused
        sin = self.xs_static if self.xs_static is not None else ws
        adt = self.act_dtype
        dev = lau.dev
        fast = []

        def first(x, out, M):
            xq, xs = qx(x, M) if quant else (x, sin if fused else ws)
            lau(grid, xq, w, xs, ws, out, part, cnt, M, N, K, kps, split)
            return xq, xs

        def run(x, out, M):
            if fast:
                fast[0](x, out, M)
                return
            xq, xs = first(x, out, M)
            fast.append(self._ctypes_gemv(lau, grid, x, xq, xs, out, part, cnt, M, kps, split, sin, adt, dev)
                        or first)
        return run

    def _ctypes_gemv(self, lau, grid, x, xq, xs, out, part, cnt, M, kps, split, sin, adt, dev):
        N, K, w, ws = self.N, self.K, self.w, self.ws
        args = (xq.data_ptr(), w.data_ptr(), xs.data_ptr(), ws.data_ptr(), out.data_ptr(), part.data_ptr(),
                cnt.data_ptr(), M, N, K, kps, split)
        if self.act == "none" or xq is x:  # W8A16, or W8A8 quantized in the GEMV: one launch, x as it is
            return ctypes_run(lau, grid, args, ("x_ptr", "out_ptr", "M"), x, out, M, dev)
        cg = ctypes_launch(lau, grid, args, out)
        if cg is None:
            return None
        gx, gxs, go, gm = (cg.slot(n) for n in ("x_ptr", "xs_ptr", "out_ptr", "M"))
        stream = torch._C._cuda_getCurrentRawStream
        cq = ctypes_launch(self.q_launch, (M, 1, 1), (x.data_ptr(), xq.data_ptr(), xs.data_ptr(), sin.data_ptr(), K),
                           out)
        if cq is None:
            return None
        qx_, qq, qs = (cq.slot(n) for n in ("x_ptr", "q_ptr", "s_ptr"))
        qrows = cq.grid[0]
        empty = torch.empty
        f32 = torch.float32
        device = x.device

        def run(x, out, M):
            xq = empty((M, K), dtype=adt, device=device)
            xs = empty((M,), dtype=f32, device=device)
            s = stream(dev)
            qx_.value = x.data_ptr()
            qq.value = gx.value = xq.data_ptr()
            qs.value = gxs.value = xs.data_ptr()
            qrows.value = M
            cq(s)
            go.value = out.data_ptr()
            gm.value = M
            cg(s)
        return checked(run, x, out, M)


@register_kernel("fp8")
def build_fp8(fmt, packed, shape, device):
    cfg = fmt.cfg
    w = packed["weight"]
    if w.dtype not in _FMAX or tuple(w.shape) != tuple(shape) or min(shape) == 0:
        return None
    act = getattr(cfg, "activations", "none")
    kind = getattr(cfg, "act_kind", getattr(cfg, "dtype", "e4m3"))
    act_dtype = torch.float8_e5m2 if kind == "e5m2" else torch.float8_e4m3fn
    w = w.to(device).contiguous()
    ws = packed["weight_scale"].to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    xs = packed.get("input_scale")
    if act == "static":
        if xs is None:
            return None
        xs = xs.to(device=device, dtype=torch.float32).reshape(1).contiguous()
    desc = f"fp8{'e5' if w.dtype == torch.float8_e5m2 else 'e4'}{'r' if ws.numel() > 1 else 't'}-{act}"

    def fallback(x, _fmt=fmt, _p=packed, _shape=shape):
        return _fmt.linear(x, _p, _shape)

    return FP8Kernel(shape, device, w, ws, act, act_dtype, xs if act == "static" else None, fallback, desc)
