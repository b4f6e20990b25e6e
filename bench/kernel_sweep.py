"""One GPU call's worth of kernel variants: correctness against a float reference with poisoned outputs,
then CUDA-graph timings of several configs per (Llama shape, M) next to bf16 cuBLAS, the
dequantize + cuBLAS path and (M <= 2) torch's tinygemm, in the same process.

    python bench/kernel_sweep.py --out DIR [--shapes 8B.qkv,...] [--ms 64,256] [--kinds int4,any4]

Prints a short table (best variant per cell, its speed-up over bf16) and writes every timing to
DIR/sweep.json; ``--emit-tuned FILE`` writes the best config per (kind, shape, M bucket) as a tuned
table (kernels/src/tuned_<gpu>.json format). Timing as bench/kernel_bench.py: median of
``do_bench_cudagraph``, weights rotating through copies > 3x L2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import importlib.util

import torch
import triton
import triton.language as tl

_spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernel_bench.py")
kb = importlib.util.module_from_spec(_spec)  # bench/kernel_bench.py (not importable as "kernels": a PyPI name)
sys.modules["bench_kernels"] = kb
_spec.loader.exec_module(kb)

CAND = "gemm"
# large-M candidates: (name, BM, BN, BKW, warps, stages, swap)
GEMM = [("s128x128k64", 128, 128, 8, 8, 4, True), ("s128x128k128", 128, 128, 16, 8, 3, True),
        ("s128x64k128", 128, 64, 16, 4, 4, True), ("s64x128k64", 64, 128, 8, 8, 4, True),
        ("s64x64k128", 64, 64, 16, 4, 4, True), ("n128x128k64", 128, 128, 8, 8, 4, False)]


# second round (large M, the x tile as the A operand): two programs per SM (a register cap, or
# 4-warp tiles) so that one dequantizes while the other's wgmma runs; a 256-row x tile (half the
# dequant work per FLOP); 128-column chunks
GEMM2 = [("n128x128k64", 128, 128, 8, 8, 4, False, None), ("n128x128k64r128", 128, 128, 8, 8, 3, False, 128),
         ("n128x64k64", 128, 64, 8, 4, 4, False, None), ("n128x128k128", 128, 128, 16, 8, 3, False, None),
         ("n256x128k64", 256, 128, 8, 8, 3, False, None)]
# the Hopper Gluon GEMM (kernels/src/_wgmma.py, path "wg"): (name, BM, BN, BK, warps, stages)
WG = [("wg128x128k64", 128, 128, 64, 8, 5), ("wg128x256k64", 128, 256, 64, 8, 4),
      ("wg64x128k64", 64, 128, 64, 4, 6), ("wg128x128k64w4", 128, 128, 64, 4, 5),
      ("wg256x128k64", 256, 128, 64, 8, 4), ("wg128x128k128", 128, 128, 128, 8, 3),
      ("wg128x128k64s3", 128, 128, 64, 8, 3)]  # 108 KB shared: two programs per SM
# its warp-specialized variant (a loader warp, a dequantizing warpgroup, the MMA warps; "ws" key):
# (name, BM, BN, BK, MMA warps, stages, dequantized-tile buffers, split-K ranges)
WS = [("ws128x128k64", 128, 128, 64, 4, 4, 2, 1), ("ws128x128k64n3", 128, 128, 64, 4, 4, 3, 1),
      ("ws128x256k64", 128, 256, 64, 8, 4, 2, 1), ("ws256x128k64", 256, 128, 64, 8, 4, 2, 1),
      ("ws64x128k64", 64, 128, 64, 4, 6, 2, 1), ("ws128x128k128", 128, 128, 128, 4, 3, 2, 1),
      ("ws128x64k64", 128, 64, 64, 4, 6, 3, 1),
      ("ws128x128k64sk2", 128, 128, 64, 4, 4, 2, 2), ("ws128x128k64sk4", 128, 128, 64, 4, 4, 2, 4),
      ("ws256x128k64sk2", 256, 128, 64, 8, 4, 2, 2)]  # split-K: narrow N leaves SMs idle
# second ws round: deeper rings, more buffers, split-K on the 256-row and 128-column-chunk tiles
WS2 = [("ws256x128k64", 256, 128, 64, 8, 4, 2, 1), ("ws256x128k64s5", 256, 128, 64, 8, 5, 2, 1),
       ("ws256x128k64n3", 256, 128, 64, 8, 4, 3, 1), ("ws256x128k64sk3", 256, 128, 64, 8, 4, 2, 3),
       ("ws256x128k64sk4", 256, 128, 64, 8, 4, 2, 4), ("ws128x128k128", 128, 128, 128, 4, 3, 2, 1),
       ("ws128x128k128sk2", 128, 128, 128, 4, 3, 2, 2), ("ws128x128k128sk4", 128, 128, 128, 4, 3, 2, 4),
       ("ws128x128k64sk3", 128, 128, 64, 4, 4, 2, 3)]
# the register-A kernel (kernels/src/_wgmma_rs.py, "rs" key: outᵀ = W · xᵀ, the dequantized weights as
# wgmma's A operand in registers, re-laid words): (name, BM x rows, BN weight rows, BK, warps, stages,
# extra keys: split-K, epi 0 = strided stores, ws = a 1-warp TMA loader partition); BN = 64 per warpgroup
# (or 128 with 4 warps)
RS = [("rs256x64k64", 256, 64, 64, 4, 4, {}), ("rs256x128k64", 256, 128, 64, 8, 4, {}),
      ("rs128x128k64", 128, 128, 64, 8, 5, {}), ("rs128x64k64", 128, 64, 64, 4, 5, {}),
      ("rs128x128k64w4", 128, 128, 64, 4, 4, {}), ("rs256x64k128", 256, 64, 128, 4, 3, {}),
      ("rs64x128k64", 64, 128, 64, 8, 6, {}), ("rs256x128k64e0", 256, 128, 64, 8, 4, {"epi": 0}),
      ("rs128x128k64sk2", 128, 128, 64, 8, 5, {"split": 2}), ("rs128x64k64sk4", 128, 64, 64, 4, 5, {"split": 4}),
      ("rs256x128k64sk2", 256, 128, 64, 8, 4, {"split": 2}),
      ("rs256x128k64ws", 256, 128, 64, 8, 4, {"ws": True}), ("rs256x64k64ws", 256, 64, 64, 4, 4, {"ws": True}),
      ("rs128x128k64ws", 128, 128, 64, 8, 5, {"ws": True}),
      ("rs128x128k64wssk2", 128, 128, 64, 8, 5, {"ws": True, "split": 2})]
# second rs round (after the race fix, H100 2026-12-07): the large-M winners, plus strided stores
# with the loader partition and a fifth stage on the 256-row tile
RS2 = [c for c in RS if c[0] in ("rs256x128k64", "rs256x128k64e0", "rs256x128k64ws", "rs128x128k64ws",
                                   "rs128x128k64wssk2", "rs128x64k64", "rs128x128k64sk2", "rs128x128k64")] + [
    ("rs256x128k64wse0", 256, 128, 64, 8, 4, {"ws": True, "epi": 0}),
    ("rs256x128k64s5", 256, 128, 64, 8, 5, {}), ("rs256x128k64wss5", 256, 128, 64, 8, 5, {"ws": True})]
# small M (1-32, the decode GEMV's range): the rs kernel with an 8/16/32-row x tile (wgmma N = BM; the
# weights are the whole traffic), split-K sized to fill the SMs ("split": "fill" once, "fill2" twice), deep
# rings of 64- or 128-column chunks; the best BM for M is picked per cell (gemm_cfgs)
RSS = [(f"rss{bm}x{bn}k{bk}{'ws' if ws else ''}{'' if f == 'fill' else 'f2'}", bm, bn, bk, w, st,
        {"split": f, **({"ws": True} if ws else {})})
       for bm in (8, 16, 32) for bn, bk, w, st in ((64, 64, 4, 8), (64, 128, 4, 5), (128, 64, 8, 6), (128, 128, 8, 4))
       for ws in (False, True) for f in ("fill", "fill2") if not (ws and bn == 64 and bk == 64)]
RS = [(n, bm, bn, bk, w, st, {"rs": True, **x}) for n, bm, bn, bk, w, st, x in RS]
RSS = [(n, bm, bn, bk, w, st, {"rs": True, **x}) for n, bm, bn, bk, w, st, x in RSS]
RS2 = [(n, bm, bn, bk, w, st, {"rs": True, **x}) for n, bm, bn, bk, w, st, x in RS2]
CANDS = {"gemm": GEMM, "gemm2": GEMM2, "wg": WG, "ws": WS, "wgws": WG[:1] + WG[4:5] + WS, "ws2": WS2, "rs": RS,
         "wgrs": WG[4:5] + WS[3:4] + WS[7:8] + WS[9:10] + [c for c in RS if c[0] in (
             "rs256x64k64", "rs256x128k64", "rs128x128k64", "rs128x64k64", "rs128x128k64sk2", "rs256x128k64ws",
             "rs128x128k64ws", "rs128x128k64wssk2")],  # the best wg / ws of rounds four-five beside rs
         "rs2": WS[3:4] + RS2, "rss": RSS}
WG_SETS = ("wg", "ws", "wgws", "ws2", "rs", "wgrs", "rs2", "rss")
SMALL_SETS = ("rss",)  # candidate sets for M < 64 (the others: M >= 64)


def rss_bm(mb: int) -> int:
    """The x-tile rows of the small-M rs candidates for M bucket mb: the smallest of 8, 16, 32 holding it."""
    return next((b for b in (8, 16, 32) if mb <= b), 32)


def fill_split(kern, bn: int, bk: int, mode, sms: int = 132) -> int:
    """Split-K ranges so that (N / bn) tiles x split programs fill the SMs once ("fill") or twice ("fill2"),
    at least 2 chunks of bk columns per range."""
    tiles = -(-kern.N // bn)
    target = sms * (2 if mode == "fill2" else 1)
    return max(1, min((kern.K // bk) // 2, -(-target // tiles)))


def gemm_cfgs(kern, mb: int, which: str = "gemm") -> list[tuple[str, dict]]:
    if which in SMALL_SETS:  # the tile holding M's bucket; "split" names a fill_split mode
        return [(name, {"path": "wg", "BM": bm, "BN": bn, "BK": bk, "warps": w, "stages": st,
                        **extra, "split": fill_split(kern, bn, bk, extra["split"])})
                for name, bm, bn, bk, w, st, extra in CANDS[which] if bm == rss_bm(mb)]
    out = []
    if which in WG_SETS:  # extra: (tile buffers, split-K) of a ws entry, or the keys of an rs entry
        return [(name, {"path": "wg", "BM": bm, "BN": bn, "BK": bk, "warps": w, "stages": st,
                        **(nb[0] if nb and isinstance(nb[0], dict) else
                           {"ws": True, "nb": nb[0], "split": nb[1]} if nb else {})})
                for name, bm, bn, bk, w, st, *nb in CANDS[which] if bm <= 2 * mb]
    for name, bm, bn, bkw, w, st, swap, *reg in CANDS[which]:
        if bm > 2 * mb:
            continue
        c = kern.gemm_config(mb, bm, bn, bkw, w, st, swap, *reg)
        out.append((name + (f"/sk{c['split']}" if c["split"] > 1 else ""), c))
        if c["split"] > 1:
            out.append((name, dict(c, split=1)))
    return out


def _compile_worker(jobs):
    """Compile (and run once, on a small layer of the same divisibility) each (kind, M, cfg): the
    timing process then finds every variant in Triton's on-disk cache."""
    dev = torch.device("cuda")
    built, done, errs = {}, 0, []
    for kind, M, cfg in jobs:
        try:
            if kind not in built:
                spec = kb.KINDS[kind]
                built[kind] = kb.build_kernel(spec, kb.make_packed(spec, 256, 2048, dev), 256, 2048, dev)[1]
            kern = built[kind]
            kern.plans.clear()
            kern.plan(M, torch.bfloat16, cfg)
            kern(torch.randn(M, 2048, device=dev, dtype=torch.bfloat16))
            torch.cuda.synchronize()
            done += 1
        except Exception as e:  # noqa: BLE001
            errs.append(f"{kind} M={M} {cfg}: {e!r:.200}")
    return done, errs


def precompile(kinds, shapes, ms, workers: int) -> None:
    import multiprocessing as mp

    from quantkit.kernels import _launch

    dev = torch.device("cuda")
    jobs, seen = [], set()
    for kind in kinds:
        spec = kb.KINDS[kind]
        for sname in shapes:
            K, N = kb.SHAPES[sname]
            _, kern = kb.build_kernel(spec, kb.make_packed(spec, N, K, dev), N, K, dev)
            for M in ms:
                mb = _launch.m_bucket(M)
                cands = [kern.config(mb, torch.bfloat16)] + ([{"path": "dq"}] if M > 2 else [])
                cands += [c for _, c in gemm_cfgs(kern, mb, CAND)] if (M >= 64) != (CAND in SMALL_SETS) else []
                cands += kb.k_candidates(kern, mb) if M <= 2 else []
                for cfg in cands:
                    sig = json.dumps([kind, min(M, 4) if cfg["path"] == "gemv" else 64,
                                      dict(cfg, split=int(cfg.get("split", 1)) > 1)], sort_keys=True)
                    if sig not in seen:
                        seen.add(sig)
                        jobs.append((kind, M, cfg))
            del kern
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        res = pool.map(_compile_worker, [jobs[i::workers] for i in range(workers)])
    errs = [e for _, es in res for e in es]
    print(f"precompiled {sum(d for d, _ in res)}/{len(jobs)} variants in {time.perf_counter() - t0:.0f} s "
          f"({workers} processes); {len(errs)} failed", flush=True)
    for e in errs[:20]:
        print("  precompile:", e)


def check(kern, cfg, x, ref) -> float:
    """Rel. error of one config on x, output poisoned with NaN first (unwritten elements fail)."""
    kern.plans.clear()
    p = kern.plan(x.shape[0], x.dtype, cfg)
    out = torch.full((x.shape[0], kern.N), float("nan"), dtype=x.dtype, device=x.device)
    p(x, out, x.shape[0])
    if x.is_cuda:
        torch.cuda.synchronize()
    return kb.rel_err(out, ref)


def graph_us(fn, rep) -> float:
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3


def plan_fns(copies, cfg, M, dt):
    fns = []
    for c in copies:
        c.plans.clear()
        p = c.plan(M, dt, cfg)
        out = torch.empty((M, c.N), dtype=dt, device=c.device)
        fns.append(lambda x, p=p, out=out: p(x, out, M))
    return fns


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--shapes", default=",".join(kb.SHAPES))
    ap.add_argument("--ms", default="64,128,256,512,2048,8192")
    ap.add_argument("--small-ms", default="1,2")
    ap.add_argument("--kinds", default="int4")
    ap.add_argument("--rep", type=float, default=12.0)
    ap.add_argument("--emit-tuned", default=None)
    ap.add_argument("--precompile", type=int, default=0, metavar="N", help="compile every variant first in N processes")
    ap.add_argument("--cands", default="gemm", choices=sorted(CANDS),
                    help="candidate set: for M >= 64 (rss: for the smaller M of --small-ms and --ms)")
    ap.add_argument("--merge-into", default=None, help="update this tuned table with the best configs measured")
    ap.add_argument("--lut-too", action="store_true", help="with --merge-into: int4's winners for the lut keys too")
    ap.add_argument("--diag", action="store_true", help="also time a plain Triton bf16 GEMM (the tiles' ceiling)")
    ap.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)  # CPU/interpreter self-test
    a = ap.parse_args(argv)
    import triton

    from quantkit.kernels import _launch

    global graph_us
    dev = torch.device("cpu" if a.smoke_cpu else "cuda")
    if a.smoke_cpu:
        kb._smoke_patches()
        graph_us = lambda fn, rep: (lambda t0: (fn(), (time.perf_counter() - t0) * 1e6)[1])(time.perf_counter())
    dt = torch.bfloat16
    torch.manual_seed(0)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bw = kb.copy_bandwidth(dev)
    n = 256 if a.smoke_cpu else 8192
    xa = torch.randn(n, n, device=dev, dtype=dt)
    xb = torch.randn(n, n, device=dev, dtype=dt)
    from triton.testing import do_bench

    ms_mm = do_bench(lambda: xa @ xb, warmup=25, rep=200, return_mode="median")
    info = {"device": "cpu-smoke" if a.smoke_cpu else torch.cuda.get_device_name(),
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__, "copy_bw_GBs": bw / 1e9,
            "bf16_8192_tflops": 2 * n ** 3 / (ms_mm * 1e-3) / 1e12}
    print(json.dumps(info), flush=True)
    small = [int(m) for m in a.small_ms.split(",") if m]
    large = [int(m) for m in a.ms.split(",") if m]
    global CAND
    CAND = a.cands
    if a.precompile:
        precompile(a.kinds.split(","), a.shapes.split(","), small + large, a.precompile)
    rows, errs, best_cfg = [], [], {}
    t_start = time.time()
    for sname in a.shapes.split(","):
        K, N = kb.SHAPES[sname]
        W = torch.randn(N, K, device=dev, dtype=dt) * 0.02
        ncp = lambda nbytes: max(1, min(32, math.ceil(3 * kb.L2_BYTES / max(nbytes, 1))))
        Ws = [W] + [W.clone() for _ in range(ncp(W.numel() * 2) - 1)]
        lin = torch.nn.functional.linear
        tg = kb.tinygemm_pack(N, K, dev)
        kerns = {}
        for kind in a.kinds.split(","):
            spec = kb.KINDS[kind]
            packed = kb.make_packed(spec, N, K, dev)
            fmt, kern = kb.build_kernel(spec, packed, N, K, dev)
            copies = [kern] + [kb.clone_kernel(kern) for _ in range(ncp(kb.kernel_bytes(kern)) - 1)]
            kerns[kind] = (fmt, packed, kern, copies)
        for M in small + large:
            xs = [torch.randn(M, K, device=dev, dtype=dt) for _ in range(2)]
            x = xs[0]
            row = {"shape": sname, "M": M, "bf16": graph_us(kb.rotated([lambda x, w=w: lin(x, w) for w in Ws], xs),
                                                             a.rep)}
            if tg is not None and M <= 2:
                wp, sz = tg
                row["tinygemm"] = graph_us(kb.rotated([lambda x: torch._weight_int4pack_mm(x, wp, 128, sz)], xs),
                                           a.rep)
            mb = _launch.m_bucket(M)
            for kind, (fmt, packed, kern, copies) in kerns.items():
                ref = fmt.linear(x, packed, (N, K)).float()
                cands = [("tuned", kern.config(mb, dt))]
                if M > 2:
                    cands.append(("dq", {"path": "dq"}))
                if (M >= 64) != (a.cands in SMALL_SETS):
                    cands += gemm_cfgs(kern, mb, a.cands)
                if M <= 2:  # GEMV (and BM=16 tensor-core) candidates of bench/kernel_bench.py --tune
                    cands += [(f"t{i}", c) for i, c in enumerate(kb.k_candidates(kern, mb))]
                res = {}
                for name, cfg in cands:
                    try:
                        e = check(kern, cfg, x, ref)
                        if not e < 1e-2:
                            errs.append(f"{sname} M={M} {kind} {name}: rel err {e:.3g}")
                            continue
                        res[name] = {"us": graph_us(kb.rotated(plan_fns(copies, cfg, M, dt), xs), a.rep),
                                     "err": e, "cfg": cfg}
                    except Exception as ex:  # noqa: BLE001
                        errs.append(f"{sname} M={M} {kind} {name}: {ex!r:.300}")
                for c in copies:
                    c.plans.clear()
                row[kind] = res
                row.setdefault("keys", {})[kind] = kern.key(mb, dt)
                if res:
                    bname = min(res, key=lambda n: res[n]["us"])
                    best_cfg[kern.key(mb, dt)] = res[bname]["cfg"]
                del ref
            rows.append(row)
            print(fmt_row(row, a.kinds.split(",")), flush=True)
            (out_dir / "sweep.json").write_text(json.dumps({"info": info, "rows": rows, "errors": errs}, indent=1))
        del W, Ws, kerns, tg
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"## sweep {time.time() - t_start:.0f} s; {len(errs)} failures")
    for e in errs[:30]:
        print("  FAIL", e)
    if a.emit_tuned:
        Path(a.emit_tuned).write_text(json.dumps(best_cfg, indent=0, sort_keys=True))
    if a.merge_into:
        p = Path(a.merge_into)
        t = json.loads(p.read_text()) if p.exists() else {}
        for k, c in best_cfg.items():
            t[k] = c
            if a.lut_too and k.startswith("int4g128.k:") and not k.endswith(("m1", "m2")):
                t[k.replace("int4g128.k:", "lut4rg128s.k:")] = c
        p.write_text(json.dumps(t, indent=0, sort_keys=True))
        print(f"merged {len(best_cfg)} configs into {p}")
    if a.diag and not a.smoke_cpu:
        diag(a.rep)
    return 0


@triton.jit
def _bf16_gemm(x_ptr, w_ptr, o_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Plain out = x @ w^T (bf16 in, fp32 accumulate), the tutorial loop: Triton's own ceiling for a tile."""
    pid = tl.program_id(0)
    n_n = tl.cdiv(N, BN)
    pm, pn = pid // n_n, pid % n_n
    rm = tl.minimum(pm * BM + tl.arange(0, BM), M - 1)
    rn = tl.minimum(pn * BN + tl.arange(0, BN), N - 1)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + (k + rk)[None, :])
        b = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + (k + rk)[None, :])
        acc = tl.dot(a, tl.trans(b), acc)
    om = pm * BM + tl.arange(0, BM)
    on = pn * BN + tl.arange(0, BN)
    tl.store(o_ptr + om[:, None].to(tl.int64) * N + on[None, :], acc.to(tl.bfloat16),
             mask=(om < M)[:, None] & (on < N)[None, :])


def diag(rep) -> None:
    """Triton's plain bf16 GEMM at the large-M tiles vs cuBLAS: how close a Triton tile loop gets at all."""
    dev = torch.device("cuda")
    for sname in ("8B.gateup", "70B.o"):
        K, N = kb.SHAPES[sname]
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        for M in (256, 2048, 8192):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            o = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
            cub = graph_us(lambda: torch.nn.functional.linear(x, w), rep)
            s = f"diag {sname:10s} M={M:5d} cuBLAS {cub:8.1f} us"
            for bm, bn, bk, nw, ns in ((128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)):
                g = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
                f = lambda: _bf16_gemm[g](x, w, o, M, N, K, BM=bm, BN=bn, BK=bk, num_warps=nw, num_stages=ns)
                f()
                e = float((o.float() - (x.float() @ w.float().t())).norm() / (x.float() @ w.float().t()).norm())
                s += f" | triton {bm}x{bn}x{bk} x{cub / graph_us(f, rep):4.2f} (err {e:.0e})"
            print(s, flush=True)


def fmt_row(row, kinds) -> str:
    b = row["bf16"]
    s = f"{row['shape']:10s} M={row['M']:5d} bf16 {b:8.1f}"
    if "tinygemm" in row:
        s += f" | tiny x{b / row['tinygemm']:4.2f}"
    for k in kinds:
        res = row.get(k) or {}
        if not res:
            s += f" | {k} FAIL"
            continue
        bn = min(res, key=lambda n: res[n]["us"])
        s += f" | {k} best {bn} x{b / res[bn]['us']:4.2f}"
        for n in res:
            if n != bn:
                s += f" {n} x{b / res[n]['us']:4.2f}"
    return s


if __name__ == "__main__":
    sys.exit(main())
