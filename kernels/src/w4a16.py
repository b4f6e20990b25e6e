"""The default W4A16 kernels of the ``int`` (INT2-INT4) and ``lut`` (any4/any3/any2, NF4, FP4) formats:
on the checkpoint's own K-major layout, no repack, no second copy (implementation "k").

Layout. The 4-bit ``qweight`` of docs/FORMAT.md (uint8 [out, in/2], two codes per byte, even column
in the low nibble) read as int32 is ``w [N, K/8]``: word j of row n holds the codes of columns
8j..8j+7, column 8j+i in nibble i. The kernels read that tensor as is (a view, no copy) together
with the checkpoint's ``scales`` [N, G], ``zeros`` [N, G] and ``lut`` [N or 1, 2^b]: nothing is
repacked and the GPU holds the weights once. Only 2/3-bit codes, rows whose byte count is not a
multiple of 4, and act-order (``g_idx``) need a repack (codes widened to nibbles, columns sorted
by group); then the kernel owns that copy.

Paths, by the row count M of x (measured on an H100 and an H200, docs/PERFORMANCE.md):
  * ``gemv`` (M = 1-2; ``w4a16_gemv``): a program reads [BN, BKW] words (16-byte loads along K) and
    dequantizes nibble by nibble: ``(w & (15 << 4p)) | 0x3F800000`` read as fp32 is
    ``1 + q * 2^(4p-23)`` (p = i, or i-3 of ``w >> 12`` for the top three nibbles), minus
    ``1 + z * 2^(4p-23)`` is exact, and one FMA with ``x[8*kw + i] * 2^(23-4p)`` accumulates it (LOP3,
    FADD, FFMA per weight, no int->float convert); scale and row sums once per chunk; the next chunk's
    words are loaded before the current one is computed (``pf``); split-K over programs. For lut
    formats the values come from the row's table held in registers (``_lut16``: byte-permute lookups
    in inline PTX, fp16 planes, exact; ``asm: False`` in a config falls back to L1 loads).
  * ``mma`` (M = 2-64 by the tuned table; ``w4a16_mma``): the 8 nibble tensors are interleaved
    (``tl.interleave``, in registers) into the [BN, 8*BKW] tile in column order, ``q - z`` (or the
    table value) in the x dtype, and go to ``tl.dot``; ``swap`` computes W·xᵀ (the weight tile is the
    register A operand of wgmma, x the narrow side). When a chunk lies in one group the scale
    multiplies the chunk's dot product. ``asm`` dequantizes with inline PTX (``_ptx._kdeq_asm``: packed
    magic-number pairs for int, register-table lookups for lut; compiled GPU only, whole groups per
    chunk); ``unroll`` handles U chunks per loop iteration.
  * ``gemm`` (M = 64-256 by the tuned table; ``w4a16_gemm``): the weight tile dequantized *with its
    scale* in the x dtype (inline PTX: one more packed FMA per pair) so that tl.dot accumulates every
    chunk into one accumulator and wgmma chains across chunks; large tiles, split-K where the output
    tiles leave SMs idle. On the H200 it beat dequantize + cuBLAS at M = 128 (0.59-0.88x bf16) but
    plateaus at 0.55-0.67x cuBLAS at large M (docs/PERFORMANCE.md says why).
  * ``dq``: dequantize the weight to a scratch buffer and call cuBLAS (M >= 512, and 256 on some shapes).
Split-K partial sums go to the shared workspace; the last program of each tile (counted with an
atomic) sums them in a fixed order (deterministic, one launch).

Own code. Ideas from Marlin and gemlite (Apache-2.0): magic-number dequant, split-K GEMV; nothing
copied.
"""

from __future__ import annotations

import os

import torch

from quantkit.formats.packing import unpack_codes

from ._launch import (
    INTERPRET,
    TOP_BUCKET,
    Launcher,
    cdiv,
    ctypes_run,
    dequant_then_mm,
    nibble_words,
    tiled_workspace,
    workspace,
)
from ._ptx import lut_planes
from .base import DTYPE_NAMES, LayerKernel
from .w4a16_jit import w4a16_dequant, w4a16_gemm, w4a16_gemv, w4a16_mma

ASM_OFF = os.environ.get("QUANTKIT_KERNEL_ASM", "1") == "0"  # 0: never the inline-PTX dequant


# ================================================================================================
# Layer kernel
# ================================================================================================
class W4A16Kernel(LayerKernel):
    """``x -> x @ W^T`` for one int/lut layer on the checkpoint layout; built once, called per forward.

    The call path (``LayerKernel.__call__``) does the least Python it can: one dict lookup for the
    plan of the row count, one output allocation, one launch (``_fast``: the compiled kernel's
    launcher called directly)."""

    impl = "k"
    key_suffix = ".k"

    def __init__(self, mode, shape, device, w, s, z, lut, lut_row, ls, perm, G, GS, zc, fallback, tag,
                 owns_codes: bool):
        super().__init__(shape, device, tag, fallback, perm)
        self.mode = mode
        self.w, self.s, self.z, self.lut = w, s, z, lut
        self.gmap = None
        self.G, self.GS, self.zc, self.lut_row, self.LS = G, GS, zc, lut_row, ls
        self.KWS = w.shape[1]
        self.owns_codes = owns_codes  # True when w is a repacked copy (2/3-bit, odd rows, act-order)
        self._ptrs = tuple(t if t is not None else w for t in (w, s, z, lut))
        self._planes: dict = {}  # dtype -> lut_planes (the asm lookup's table), built on first use

    # ---- configs ---------------------------------------------------------------------------
    def default_config(self, mb: int, dtype) -> dict:
        """Heuristic Hopper config when no tuned one is stored."""
        n, sms = self.N, 132
        if mb <= 2:  # at M = 3-4 the BM=16 tensor-core tile below was faster on all 7 Llama shapes (H100)
            bn, bkw = 64, 32
            nch = cdiv(self.KWS, bkw)
            split = max(1, min(nch // 2 or 1, cdiv(4 * sms, cdiv(n, bn))))
            return {"path": "gemv", "BN": bn, "BKW": bkw, "warps": 4, "split": split}
        if mb <= 64:
            bm = max(16, mb)
            bn, bkw = 64, 16
            if self.GS < (1 << 30) and self.GS % 128:
                bkw = max(4, min(16, self.GS // 8))  # whole groups per chunk: the scale after the dot
            nch = cdiv(self.KWS, bkw)
            split = max(1, min(nch // 2 or 1, cdiv(2 * sms, cdiv(n, bn) * cdiv(mb, bm))))
            return {"path": "mma", "BM": bm, "BN": bn, "BKW": bkw, "warps": 4, "stages": 2, "split": split,
                    "swap": mb <= 16, "asm": True}
        if mb <= 128:  # H200, 2026-12-04: the fused GEMM beat dequantize + cuBLAS at M = 128 on all 7 Llama shapes
            return self.gemm_config(mb, 128, 128, 16, 8, 3, swap=True)
        return {"path": "dq"}  # ... and lost to it from M = 512 (at M = 256: 4 of 7 shapes)

    def gemm_config(self, mb: int, bm: int = 128, bn: int = 128, bkw: int = 8, warps: int = 8, stages: int = 4,
                    swap: bool = False, maxnreg: int | None = None) -> dict:
        """A ``gemm`` config (large M) with split-K only where the output tiles leave SMs idle."""
        sms = 132
        tiles = cdiv(mb, bm) * cdiv(self.N, bn)
        nch = cdiv(self.KWS, bkw)
        split = 1 if tiles >= sms * 3 // 4 else max(1, min(nch // 8 or 1, round(sms / tiles)))
        cfg = {"path": "gemm", "BM": bm, "BN": bn, "BKW": bkw, "warps": warps, "stages": stages, "split": split,
               "group_m": 8, "swap": swap}
        if maxnreg:
            cfg["maxnreg"] = maxnreg
        return cfg

    def asm_ok(self, bkw: int, dtype, any_group: bool = False) -> bool:
        """Whether the inline-PTX dequant (``_ptx``) serves this layer at chunk width bkw: compiled CUDA
        (not the interpreter), a 16-bit dot dtype, <= 16 table entries, and whole groups per chunk
        unless the path takes a scale per word (``any_group``: the GEMV and the large-M GEMM)."""
        if INTERPRET or dtype not in DTYPE_NAMES or self.device.type != "cuda" or ASM_OFF:
            return False
        if self.s is not None and self.GS % (8 * bkw) != 0 and not any_group:
            return False
        return self.mode == 0 or self.LS <= 16

    def planes(self, dtype) -> torch.Tensor:
        p = self._planes.get(dtype)
        if p is None:
            p = self._planes[dtype] = lut_planes(self.lut, dtype)
        return p

    def config(self, mb: int, dtype) -> dict:
        c = self.tuned_near(lambda b: self.key(b, dtype), mb)
        if c is None:  # no entry for this format: the tuned config of the same shape's reference format
            ref = "int4g128" if self.mode == 0 else "lut4rg128s"
            c = self.tuned_near(lambda b: f"{ref}.k:{self.N}x{self.K}:{DTYPE_NAMES.get(dtype, 'fp16')}:m{b}", mb)
            if c is not None and c.get("path") == "mma" and self.GS < 8 * int(c["BKW"]):
                c = dict(c, BKW=max(4, self.GS // 8))  # whole groups per chunk (the scale after the dot)
        return c or self.default_config(mb, dtype)

    def _common(self):
        return dict(MODE=self.mode, HAS_SCALE=self.s is not None, HAS_ZERO=self.z is not None,
                    ZC=float(self.zc), GS=self.GS, LS=self.LS, LUT_ROW=self.lut_row)

    def make_plan(self, cfg: dict, dtype, mb: int):
        """A closure ``(x2d, out, M) -> None`` running one config for rows M <= mb."""
        N, K, KWS, G = self.N, self.K, self.KWS, self.G
        path = cfg["path"]
        wp, sp, zp, lp = self._ptrs
        common = self._common()
        if path == "dq":
            bn, bkw = int(cfg.get("BN", 32)), int(cfg.get("BKW", 16))
            even = KWS % bkw == 0 and K == KWS * 8
            dasm = self.mode == 1 and bool(cfg.get("asm", True)) and self.asm_ok(bkw, dtype)
            if dasm:
                lp = self.planes(torch.float16)
            lau = Launcher(w4a16_dequant, dict(common, BN=bn, BKW=bkw, EVEN=even, LUTG=False, ASM=dasm), num_warps=4,
                           num_stages=1, device=self.device)
            grid = (cdiv(KWS, bkw), cdiv(N, bn), 1)
            return dequant_then_mm(lau, grid, (wp, sp, zp, lp), (N, K, KWS, G), N, K, dtype, self.device)
        if path == "wg":
            return self.wg_plan(cfg, dtype, mb)
        bn, bkw = int(cfg["BN"]), int(cfg["BKW"])
        if path == "gemm" and self.s is not None and self.GS % (8 * bkw):
            # chunks inside one group (one scale per row per chunk): Triton 3.6 fails to compile the
            # large tiles with a scale per word (TritonGPUOptimizeDotOperands, sm_90)
            while bkw > 2 and self.GS % (8 * bkw):
                bkw //= 2
            if self.GS % (8 * bkw):
                return self.make_plan({"path": "dq"}, dtype, mb)
        nch = cdiv(KWS, bkw)
        split = max(1, min(int(cfg.get("split", 1)), nch))
        cps = cdiv(nch, split)
        split = cdiv(nch, cps)
        splitk = split > 1
        even = KWS % bkw == 0 and K == KWS * 8
        lutg = bool(cfg.get("lutg", False)) and self.mode == 1
        tiles_n = cdiv(N, bn)
        if path == "gemv":
            bm = 1 if mb <= 1 else (2 if mb <= 2 else 4)
            # lut formats: table lookups in registers (inline PTX, fp16 planes: exact) unless disabled
            gasm = self.mode == 1 and bool(cfg.get("asm", True)) and self.asm_ok(bkw, dtype, any_group=True)
            ptrs = (wp, sp, zp, self.planes(torch.float16)) if gasm else None
            lau = Launcher(w4a16_gemv, dict(common, BM=bm, BN=bn, BKW=bkw, SPLITK=splitk, EVEN=even,
                                            PF=bool(cfg.get("pf", True)), LUTG=lutg and not gasm, ASM=gasm),
                           num_warps=int(cfg["warps"]), num_stages=int(cfg.get("stages", 1)), device=self.device)
            grid = (tiles_n, split, 1)
            ws, cnt = workspace(self.device, tiles_n * split * bm * bn if splitk else 0, tiles_n)
            return self._fast(lau, grid, ws, cnt, cps, split, ptrs)
        bm = int(cfg["BM"])
        gemm = path == "gemm"
        if gemm:  # the scale rides in the dequantized tile: any group size takes the inline PTX
            asm = bool(cfg.get("asm", True)) and self.asm_ok(bkw, dtype, any_group=True)
        else:
            asm = bool(cfg.get("asm", False)) and self.asm_ok(bkw, dtype)
        ptrs = self._ptrs
        if asm and self.mode == 1:
            lp = self.planes(dtype)
            ptrs = (wp, sp, zp, lp)
        tile = dict(common, BM=bm, BN=bn, BKW=bkw, SPLITK=splitk, EVEN=even, SWAP=bool(cfg.get("swap", False)),
                    GROUP_M=int(cfg.get("group_m", 8 if gemm else 1)), INTERP=INTERPRET)
        if gemm:
            lau = Launcher(w4a16_gemm, dict(tile, ASM=asm), num_warps=int(cfg["warps"]),
                           num_stages=int(cfg.get("stages", 3)), device=self.device, maxnreg=cfg.get("maxnreg"))
        else:
            lau = Launcher(w4a16_mma, dict(tile, LUTG=lutg and not asm, ASM=asm, U=int(cfg.get("unroll", 1))),
                           num_warps=int(cfg["warps"]), num_stages=int(cfg.get("stages", 2)), device=self.device)
        ws_for = tiled_workspace(self.device, bm, tiles_n, split, bm * bn)
        ws, cnt = ws_for(mb)
        if mb <= bm and mb < TOP_BUCKET:  # one row tile for every M of the bucket
            return self._fast(lau, (tiles_n, split, 1), ws, cnt, cps, split, ptrs)

        def run_mma(x, out, M):
            w, c = (ws, cnt) if M <= mb else ws_for(M)
            lau((cdiv(M, bm) * tiles_n, split, 1), x, wp, sp, zp, lp, out, w, c, M, N, K, KWS, G, cps, split)
        return run_mma

    def wg_ok(self, bk: int, dtype) -> bool:
        """Whether the Hopper Gluon GEMM (``_wgmma``, path ``wg``) serves this layer: compiled CUDA on
        compute capability 9.x with Gluon, int or lut (<= 16 entries) codes as nibble words, a 16-bit x
        dtype, K % bk == 0 and whole groups per chunk."""
        if INTERPRET or ASM_OFF or self.device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            return False
        if self.K % bk or self.KWS * 8 != self.K or (self.s is not None and self.GS % bk):
            return False
        if self.mode == 1 and self.LS > 16:
            return False
        from . import _wgmma

        return _wgmma.HAVE_GLUON and torch.cuda.get_device_capability(self.device)[0] == 9

    def rs_words(self) -> torch.Tensor:
        """The words re-laid for the register-A kernel (``_wgmma_rs.rs_shuffle``), made once per layer
        (and again only if ``w`` is replaced, e.g. by a copy): an extra buffer the size of ``w``."""
        from . import _wgmma_rs

        c = getattr(self, "_rs", None)
        if c is None or c[0] != self.w.data_ptr():
            c = self._rs = (self.w.data_ptr(), _wgmma_rs.rs_shuffle(self.w, self.mode))
        return c[1]

    def rs_plan(self, cfg: dict, dtype, mb: int):
        """The ``wg`` path with ``rs``: outᵀ = W · xᵀ, the dequantized weights as wgmma's register A
        operand (``_wgmma_rs``; keys ``split`` (split-K), ``epi`` (0: strided stores), ``ws`` (a 1-warp TMA
        loader partition)); None where the tile is not one it takes (the caller runs plain wg / ws)."""
        from . import _wgmma_rs

        warps = int(cfg.get("warps", 4))
        bm, bn, bk = int(cfg.get("BM", 128)), int(cfg.get("BN", 16 * warps)), int(cfg.get("BK", 64))
        if not (_wgmma_rs.HAVE_GLUON and _wgmma_rs.rs_ok(bn, bk, warps) and bm in _wgmma_rs.RS_BM
                and self.wg_ok(bk, dtype)):
            return None
        from . import _wgmma

        N, K, G = self.N, self.K, self.G
        wd = _wgmma.w_descriptor(self.rs_words(), bn, bk)
        xl = _wgmma.x_layout(bm, bk, dtype)
        s = self.s if self.s is not None else self.w
        z = self.z if self.z is not None else self.w
        lp = self.planes(dtype) if self.mode == 1 else self.w
        nch = K // bk
        cps = cdiv(nch, max(1, min(int(cfg.get("split", 1)), nch)))
        split = cdiv(nch, cps)  # every range non-empty (the kernel assumes it)
        consts = dict(MODE=self.mode, LUT_ROW=bool(self.lut_row), HAS_SCALE=self.s is not None,
                      HAS_ZERO=self.z is not None, ZC=float(self.zc), GS=min(self.GS, 1 << 30),
                      STAGES=int(cfg.get("stages", 4)), GROUP_M=int(cfg.get("group_m", 8)),
                      EPI=int(cfg.get("epi", 1)), SPLITK=split > 1, WS=bool(cfg.get("ws", False)))
        lau = Launcher(_wgmma_rs.w4a16_wgmma_rs, consts, num_warps=warps, device=self.device)
        tiles_n = cdiv(N, bn)
        ws_for = tiled_workspace(self.device, bm, tiles_n, split, bm * bn)
        ws, cnt = ws_for(mb)
        TD = _wgmma.TensorDescriptor

        def run_rs(x, out, M):
            w, c = (ws, cnt) if M <= mb else ws_for(M)
            lau((cdiv(M, bm) * tiles_n, split, 1), TD(x, [M, K], [K, 1], [bm, bk], xl), wd, s, z, out, M, N, K, G,
                lp, w, c, cps, split)
        return run_rs

    def wg_plan(self, cfg: dict, dtype, mb: int):
        """The ``wg`` path's closure: the weight's TMA descriptor made once, x's per call. ``rs``: the
        register-A kernel (``rs_plan``) where it takes the tile, else this plain/ws kernel."""
        if cfg.get("rs"):
            p = self.rs_plan(cfg, dtype, mb)
            if p is not None:
                return p
            cfg = {k: v for k, v in cfg.items() if k not in ("rs", "epi")}
        bm, bn, bk = int(cfg.get("BM", 128)), int(cfg.get("BN", 128)), int(cfg.get("BK", 64))
        if not self.wg_ok(bk, dtype):
            return self.make_plan(self.default_config(mb, dtype), dtype, mb)
        from . import _wgmma

        N, K, G = self.N, self.K, self.G
        wd = _wgmma.w_descriptor(self.w, bn, bk)
        xl = _wgmma.x_layout(bm, bk, dtype)
        s = self.s if self.s is not None else self.w
        z = self.z if self.z is not None else self.w
        lp = self.planes(dtype) if self.mode == 1 else self.w
        consts = dict(MODE=self.mode, LUT_ROW=bool(self.lut_row), HAS_SCALE=self.s is not None,
                      HAS_ZERO=self.z is not None, ZC=float(self.zc), GS=min(self.GS, 1 << 30),
                      STAGES=int(cfg.get("stages", 5)), GROUP_M=int(cfg.get("group_m", 8)))
        warps = int(cfg.get("warps", 8))
        tiles_n = cdiv(N, bn)
        TD = _wgmma.TensorDescriptor
        # warp-specialized (a BN 256 tile runs out of registers): + a 1-warp loader, 4 dequant warps
        if cfg.get("ws") and bn <= 128:
            # the register file (64 K) shared by every warpgroup: the per-thread cap Triton divides
            maxnreg = min(int(cfg.get("maxnreg", 256)), (65536 // (32 * (warps + 8))) // 8 * 8)
            dq_regs = int(cfg.get("dq_regs", 128 if warps <= 4 else 96))
            nch = K // bk
            cps = cdiv(nch, max(1, min(int(cfg.get("split", 1)), nch)))
            split = cdiv(nch, cps)
            lau = Launcher(_wgmma.w4a16_wgmma_ws, dict(consts, NB=int(cfg.get("nb", 2)), DQ_REGS=dq_regs,
                                                       SPLITK=split > 1),
                           num_warps=warps, device=self.device, maxnreg=maxnreg)
            ws_for = tiled_workspace(self.device, bm, tiles_n, split, bm * bn)
            ws, cnt = ws_for(mb)

            def run_ws(x, out, M):
                w, c = (ws, cnt) if M <= mb else ws_for(M)
                lau((cdiv(M, bm) * tiles_n, split, 1), TD(x, [M, K], [K, 1], [bm, bk], xl), wd, s, z, out, M, N, K,
                    G, lp, w, c, cps, split)
            return run_ws
        lau = Launcher(_wgmma.w4a16_wgmma, consts, num_warps=warps, device=self.device)

        def run_wg(x, out, M):
            lau((cdiv(M, bm) * tiles_n, 1, 1), TD(x, [M, K], [K, 1], [bm, bk], xl), wd, s, z, out, M, N, K, G, lp)
        return run_wg

    def _fast(self, lau, grid, ws, cnt, cps, split, ptrs=None):
        """The launch closure of a fixed grid. After the first (compiling) call it calls the compiled
        kernel's launcher directly with every pointer as a plain int: Triton's launcher then skips
        the per-pointer ``data_ptr()`` call and driver query (cuPointerGetAttribute) it does for
        tensors."""
        N, K, KWS, G = self.N, self.K, self.KWS, self.G
        wp, sp, zp, lp = ptrs or self._ptrs
        fixed = (wp.data_ptr(), sp.data_ptr(), zp.data_ptr(), lp.data_ptr())
        wsi, cnti = ws.data_ptr(), cnt.data_ptr()
        gx, gy, gz = grid
        stream = torch._C._cuda_getCurrentRawStream if torch.cuda.is_available() else None
        dev = lau.dev
        fast = []

        def run(x, out, M):
            if fast:
                if len(fast) == 1:
                    fast[0](x, out, M)
                    return
                f, fn, meta, tail = fast
                f(gx, gy, gz, stream(dev), fn, meta, None, None, None, x.data_ptr(), *fixed, out.data_ptr(), wsi,
                  cnti, M, N, K, KWS, G, cps, split, *tail)
                return
            lau(grid, x, wp, sp, zp, lp, out, ws, cnt, M, N, K, KWS, G, cps, split)
            ck = lau.ck
            if ck is not None:
                a = (x.data_ptr(), *fixed, out.data_ptr(), wsi, cnti, M, N, K, KWS, G, cps, split)
                c = ctypes_run(lau, grid, a, ("x_ptr", "out_ptr", "M"), x, out, M, dev)
                fast.extend((c,) if c is not None else (ck.run, ck.function, ck.packed_metadata, lau.tail))
        return run


# ================================================================================================
# Builder
# ================================================================================================
def build(mode: int, fmt, packed, shape, device, bits: int, has_zero: bool, zc: float, lut, lut_row: bool,
          tag: str, chunk: int = 4096):
    N, K = shape
    if bits > 4 or N == 0 or K == 0:
        return None
    gsz = fmt.group_size
    s = packed.get("scales")
    z = packed.get("zeros") if has_zero else None
    g_idx = packed.get("g_idx")
    G = s.shape[1] if s is not None else 1
    perm = None
    gs = gsz if gsz else (1 << 30)
    qw = packed["qweight"]
    if g_idx is not None:
        gi = g_idx.to(device=device, dtype=torch.long)
        perm = torch.argsort(gi, stable=True)
        gs_ = gsz if gsz else K
        # after sorting, column j must lie in group j // gs (GPTQ act-order: every group full but the last)
        if not bool((gi[perm] == torch.arange(K, device=device) // gs_).all()):
            return None
        perm = perm.contiguous()
    if gs % 8 and gs < K:
        return None  # groups must hold whole words
    owns = False
    same_dev = qw.device.type == device.type and (device.index is None or qw.device.index == device.index)
    if bits == 4 and perm is None and qw.shape[1] % 4 == 0 and qw.is_contiguous() \
            and qw.data_ptr() % 16 == 0 and same_dev:
        w = qw.view(torch.int32)  # the checkpoint's own bytes, no copy
    else:
        qw = qw.to(device)
        parts = []
        for r0 in range(0, N, chunk):
            c = unpack_codes(qw[r0:r0 + chunk], bits, K)
            if perm is not None:
                c = c[:, perm]
            parts.append(nibble_words(c))
        w = torch.cat(parts, 0).contiguous()
        owns = True
    st = s.to(device).contiguous() if s is not None else None
    zt = z.to(device).contiguous() if z is not None else None
    ls = 1 << bits
    if lut is not None:
        lut = lut.to(device=device, dtype=torch.float16).contiguous()
        ls = lut.shape[1]

    def fallback(x, _fmt=fmt, _p=packed, _shape=shape):
        return _fmt.linear(x, _p, _shape)

    return W4A16Kernel(mode, shape, device, w, st, zt, lut, lut_row, ls, perm, G, gs, zc, fallback, tag, owns)
