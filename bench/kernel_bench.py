"""Kernel benchmark: quantkit's Triton kernels vs bf16 ``F.linear`` (cuBLAS) on Llama-3 linear shapes.

    python bench/kernel_bench.py [--tune] [--shapes 8B.qkv,70B.o] [--ms 1,16,2048] [--kinds int4,any4,...]
    quantkit bench kernels [same options]

For every shape and M: median time of ``triton.testing.do_bench`` (eager: each call timed alone,
L2 flushed before it) and ``do_bench_cudagraph`` (many calls in one CUDA graph), each kernel next to
bf16 cuBLAS in the same run. Weights (and x) rotate through enough copies that the L2 cache
(50 MB) cannot serve them between graph replays. Achieved bandwidth counts the bytes a call must
move (packed weights with scales/zeros/tables, x, output) over the measured device-to-device copy
bandwidth (bytes read + written). Every kernel's output is checked against a reference before it
is timed. ``--tune`` first times a few configs per (kernel, shape, M bucket) and stores the best
in kernels/src/tuned_<gpu>.json (or --tuned-out), which the kernels of that GPU read.

Random weights, packed following docs/FORMAT.md. Peers measured in the same run: torch's tinygemm
int4 (``_weight_int4pack_mm``, asym g128 in its own convention), its weights rotating through copies
like the others (before 2026-12-05 it was timed on one copy, which L2 could serve under graphs on
the smaller shapes). Marlin and gemlite: bench/peers.py.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

SHAPES = {"8B.qkv": (4096, 6144), "8B.o": (4096, 4096), "8B.gateup": (4096, 28672), "8B.down": (14336, 4096),
          "70B.o": (8192, 8192), "70B.gateup": (8192, 57344), "70B.down": (28672, 8192)}
MS = [1, 2, 4, 16, 64, 128, 256, 512, 2048, 8192]
KINDS = {
    # int/lut formats through the default implementation (kernels/src/w4a16.py, checkpoint layout)
    "int4": {"type": "int", "bits": 4, "group_size": 128, "sym": True},
    "int4a": {"type": "int", "bits": 4, "group_size": 128, "sym": False},
    "any4": {"type": "lut", "bits": 4, "group_size": 128, "table": "learned"},
    "nf4": {"type": "lut", "bits": 4, "group_size": 128, "table": "nf4"},
    # the same, naming the implementation: "k" (the default) or "v1" (kernels/src/w4a16_repacked.py)
    "int4k": {"type": "int", "bits": 4, "group_size": 128, "sym": True, "impl": "k"},
    "any4k": {"type": "lut", "bits": 4, "group_size": 128, "table": "learned", "impl": "k"},
    "nf4k": {"type": "lut", "bits": 4, "group_size": 128, "table": "nf4", "impl": "k"},
    "int4v1": {"type": "int", "bits": 4, "group_size": 128, "sym": True, "impl": "v1"},
    "any4v1": {"type": "lut", "bits": 4, "group_size": 128, "table": "learned", "impl": "v1"},
    "fp8": {"type": "fp8", "dtype": "e4m3", "weight_scale": "channel", "activations": "dynamic"},
    "fp8w": {"type": "fp8", "dtype": "e4m3", "weight_scale": "channel", "activations": "none"},
}
L2_BYTES = 50 * 2 ** 20


# ---- weights ---------------------------------------------------------------------------------------
def make_packed(spec: dict, n: int, k: int, dev) -> dict:
    """Random packed tensors of a format, per docs/FORMAT.md (random bytes = random 4-bit codes)."""
    t = spec["type"]
    if t in ("int", "lut"):
        g = spec["group_size"]
        ng = -(-k // g)
        p = {"qweight": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev),
             "scales": (torch.rand(n, ng, device=dev) * 0.01 + 0.001).to(torch.float16)}
        if t == "int" and not spec["sym"]:
            p["zeros"] = torch.randint(0, 16, (n, ng), dtype=torch.uint8, device=dev)
        if t == "lut":
            if spec.get("table", "learned") == "learned":
                p["lut"] = torch.sort(torch.randn(n, 16, device=dev), dim=1).values.to(torch.float16)
            else:
                from quantkit.formats.base import format_from_spec

                p["lut"] = format_from_spec(fmt_spec(spec)).fixed_table().to(dev, torch.float16)
        return p
    w = torch.randn(n, k, device=dev) * 0.02
    s = w.abs().amax(1, keepdim=True) / 448.0
    return {"weight": (w / s).to(torch.float8_e4m3fn), "weight_scale": s.float()}


def fmt_spec(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "impl"}


def build_kernel(spec: dict, packed: dict, n: int, k: int, dev):
    from quantkit import kernels
    from quantkit.formats.base import format_from_spec

    fmt = format_from_spec(fmt_spec(spec))
    if spec["type"] in ("int", "lut"):
        from quantkit.kernels import lowbit

        b = lowbit.build_int if spec["type"] == "int" else lowbit.build_lut
        kern = b(fmt, packed, (n, k), dev, impl=spec.get("impl"))
    else:
        kern = kernels.find_kernel(fmt, packed, (n, k), dev)
    if kern is None:
        raise RuntimeError(f"no kernel for {spec} {(n, k)}")
    return fmt, kern


def clone_kernel(kern):
    """An independent copy (own weight tensors) of a built kernel, for L2 rotation."""
    from quantkit.kernels.base import Plans

    c = copy.copy(kern)
    c._calls = {}
    c.plans = Plans(c._calls)
    for a in ("w", "s", "z", "lut", "gmap", "ws"):
        v = getattr(c, a, None)
        if isinstance(v, torch.Tensor):
            setattr(c, a, v.clone())
    if getattr(c, "impl", "") == "k":
        c._ptrs = tuple(t if t is not None else c.w for t in (c.w, c.s, c.z, c.lut))
    elif hasattr(c, "_ptrs"):
        c._ptrs = tuple(t if t is not None else c.w for t in (c.w, c.s, c.z, c.lut, c.gmap))
    if hasattr(c, "ws_full"):
        c.ws_full = c.ws.expand(c.N).reshape(1, c.N).contiguous()
    return c


def kernel_bytes(kern) -> int:
    tot = 0
    for a in ("w", "s", "z", "lut", "gmap", "ws"):
        v = getattr(kern, a, None)
        if isinstance(v, torch.Tensor):
            tot += v.numel() * v.element_size()
    return tot


def tinygemm_pack(n, k, dev):
    """tinygemm int4 (asym g128) weights in its own layout; None where this torch lacks it."""
    try:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=dev)
        u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        wp = torch._convert_weight_to_int4pack(u8, 8)
        sz = torch.stack([torch.rand(k // 128, n, device=dev) * 0.01 + 1e-3,
                          torch.randn(k // 128, n, device=dev) * 0.01], -1).to(torch.bfloat16).contiguous()
        return wp, sz
    except Exception as e:  # noqa: BLE001
        print(f"tinygemm unavailable: {e!r:.100}")
        return None


# ---- timing ----------------------------------------------------------------------------------------
def copy_bandwidth(dev) -> float:
    from triton.testing import do_bench

    a = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def rotated(fns, xs):
    """One call per invocation, rotating through the weight copies ``fns`` and inputs ``xs``. Every
    copy is called once here first: a copy's first call makes its plan (for the rs kernel also the
    re-laid words), and do_bench sizes its warm-up and repetitions from its first calls, so cold
    copies would be timed (eager 8B.qkv/8B.o M = 128 read 0.02x on an H100, 2026-12-07, before this)."""
    i = [0]
    nf, nx = len(fns), len(xs)
    for j in range(nf):
        fns[j](xs[j % nx])

    def f():
        j = i[0]
        fns[j % nf](xs[j % nx])
        i[0] = j + 1
    return f


def time_both(f, rep_ms: float) -> tuple[float, float]:
    from triton.testing import do_bench, do_bench_cudagraph

    eager = do_bench(f, warmup=max(5, rep_ms / 4), rep=rep_ms, return_mode="median") * 1e3
    graph = do_bench_cudagraph(f, rep=rep_ms, return_mode="median") * 1e3
    return eager, graph


def host_overhead_us(f, n=300) -> tuple[float, float]:
    """(host µs to issue one call, wall µs per call) over n back-to-back eager calls: the first is
    the Python + launch cost (the GPU queue does not fill in n calls), the second what a caller
    waits when the kernels are shorter than that."""
    for _ in range(20):
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def layer_host_us(spec, packed, n, k, x) -> float:
    """Host µs per call of the whole quantkit.nn.QuantLinear (forward + kernel launch) at M = 1."""
    from quantkit.kernels import lowbit
    from quantkit.nn import QuantLinear

    old = lowbit.IMPL
    lowbit.IMPL = spec.get("impl")
    try:
        layer = QuantLinear(k, n, {"format": fmt_spec(spec)}, packed)
        layer(x)
    finally:
        lowbit.IMPL = old
    return host_overhead_us(lambda: layer(x))[0]


def rel_err(y, ref) -> float:
    y, ref = y.float(), ref.float()
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y - ref).norm() / ref.norm())


# ---- tuning ----------------------------------------------------------------------------------------
def candidates(kind: str, kern, mb: int) -> list[dict]:
    n, nb = kern.N, -(-kern.K // 128)
    out = [kern.default_config(mb, torch.bfloat16)]
    if kind in ("fp8", "fp8w"):
        k = kern.K
        if mb <= 4:
            for bn, bk, w in ((16, 512, 4), (32, 256, 4), (8, 512, 4)):
                tiles = -(-n // bn)
                s0 = max(1, min(-(-k // (4 * bk)), -(-528 // tiles)))
                for s in {s0, max(1, s0 // 2), s0 * 2}:
                    out.append({"path": "gemv", "BN": bn, "BK": bk, "warps": w, "stages": 3, "split": s})
                    if kind == "fp8":  # the activation quantization as its own launch (before 2026-12-08)
                        out.append(out[-1] | {"fq": False})
            if mb >= 2:  # tensor cores with x padded to 16 rows
                if kind == "fp8":
                    out.append({"path": "scaled_mm"})
                for bn in (64, 128):
                    tiles = -(-n // bn)
                    s0 = max(1, min(-(-k // 512), -(-264 // tiles)))
                    out.append({"path": "gemm", "BM": 16, "BN": bn, "BK": 128, "warps": 4, "stages": 4, "split": s0,
                                "group_m": 1})
        else:
            if kind == "fp8":
                out.append({"path": "scaled_mm"})
            else:
                out.append({"path": "dq"})
            for bm, bn, bk, w in ((16, 64, 128, 4), (16, 128, 128, 4), (16, 64, 256, 4), (64, 128, 128, 4),
                                  (128, 128, 128, 8), (128, 256, 128, 8)):
                if bm < min(mb, 128) // 2 or (bm > 16 and bm > mb):
                    continue
                tiles = -(-n // bn) * -(-mb // bm)
                s0 = max(1, min(-(-k // (4 * bk)), -(-264 // tiles))) if mb <= 64 else 1
                for s in ({s0, 1} if mb <= 64 else {1}):
                    out.append({"path": "gemm", "BM": bm, "BN": bn, "BK": bk, "warps": w, "stages": 3, "split": s,
                                "group_m": 1 if mb <= 64 else 8})
                    if kind == "fp8w" and bm <= 64:
                        out.append({"path": "gemm", "BM": bm, "BN": bn, "BK": bk, "warps": w, "stages": 3,
                                    "split": s, "group_m": 1, "swap": True})
        return _uniq(out)
    if getattr(kern, "impl", "") == "k":
        return _uniq(out + k_candidates(kern, mb))
    if mb == 1:
        for bn, w, st in ((64, 4, 3), (128, 8, 3), (32, 2, 4)):
            tiles = -(-n // bn)
            s0 = max(1, min(nb // 4, -(-528 // tiles)))
            for s in {s0, min(nb, s0 * 2)}:
                out.append({"path": "gemv", "BN": bn, "warps": w, "stages": st, "split": s})
    elif mb <= 64:
        for bm, bn, w in ((16, 64, 4), (16, 128, 4), (16, 256, 8), (32, 128, 4), (64, 128, 4), (64, 64, 4)):
            if bm < mb // 2 or (bm > 16 and bm > mb):
                continue
            tiles = -(-n // bn) * -(-mb // bm)
            s0 = max(1, min(nb // 4, -(-264 // tiles)))
            for s in {s0, 1}:
                out.append({"path": "post", "BM": bm, "BN": bn, "warps": w, "stages": 3, "split": s})
        if mb >= 32:
            out.append({"path": "pre", "BM": 64, "BN": 128, "warps": 4, "stages": 3, "split": 1})
        if mb >= 16:
            out.append({"path": "dq"})
    else:
        for bm, bn, w, st in ((64, 128, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3)):
            out.append({"path": "pre", "BM": bm, "BN": bn, "warps": w, "stages": st, "split": 1})
        out.append({"path": "post", "BM": 64, "BN": 128, "warps": 4, "stages": 3, "split": 1})
        out.append({"path": "post", "BM": 128, "BN": 128, "warps": 8, "stages": 3, "split": 1})
        out.append({"path": "dq"})
    return _uniq(out)


def k_candidates(kern, mb: int) -> list[dict]:
    """Configs timed per (shape, M bucket) for the default W4A16 kernels (kernels/src/w4a16.py)."""
    n, kws = kern.N, kern.KWS
    out = []
    if mb <= 4:
        for bn, bkw, w in ((64, 32, 4), (128, 32, 4), (128, 16, 4), (32, 32, 4), (256, 16, 8), (128, 32, 8)):
            if mb > 1 and bn * bkw > 4096:
                continue
            nch = -(-kws // bkw)
            tiles = -(-n // bn)
            s0 = max(1, min(nch, -(-528 // tiles)))
            for s in {s0, max(1, s0 // 2), max(1, s0 // 4), min(nch, 2 * s0)}:
                out.append({"path": "gemv", "BN": bn, "BKW": bkw, "warps": w, "split": s})
        nch = -(-kws // 32)
        s0 = max(1, min(nch, -(-528 // -(-n // 64))))
        out.append({"path": "gemv", "BN": 64, "BKW": 32, "warps": 4, "split": s0, "pf": False})
        if getattr(kern, "mode", 0) == 1:  # lut: the GEMV's table lookups from L1 instead of registers
            out.append({"path": "gemv", "BN": 128, "BKW": 16, "warps": 4, "split": s0, "asm": False})
        # tensor cores with the inline-PTX dequant, even at M = 1 (x padded to 16 rows)
        for bn, w in ((64, 4), (128, 4), (128, 8)):
            nch = -(-kws // 16)
            tiles = -(-n // bn)
            s0 = max(1, min(nch // 2 or 1, -(-264 // tiles)))
            for s in {s0, max(1, s0 // 2), min(nch, 2 * s0)}:
                out.append({"path": "mma", "BM": 16, "BN": bn, "BKW": 16, "warps": w, "stages": 3, "split": s,
                            "swap": True, "asm": True})
    elif mb <= 64:
        for bm, bn, bkw, w, swap, asm in ((16, 64, 16, 4, True, True), (16, 128, 16, 4, True, True),
                                          (16, 128, 16, 8, True, True), (32, 64, 16, 4, True, True),
                                          (64, 64, 16, 4, True, True), (64, 128, 16, 8, False, True),
                                          (32, 128, 16, 4, False, True), (16, 64, 16, 4, True, False)):
            if bm < min(mb, 64) // 2 or (bm > 16 and bm > mb):
                continue
            nch = -(-kws // bkw)
            tiles = -(-n // bn) * -(-mb // bm)
            s0 = max(1, min(nch // 2 or 1, -(-264 // tiles)))
            for s in {s0, min(nch, 2 * s0)} | ({1} if s0 <= 2 else set()):
                out.append({"path": "mma", "BM": bm, "BN": bn, "BKW": bkw, "warps": w, "stages": 3, "split": s,
                            "swap": swap, "asm": asm})
        if mb >= 32:
            out.append({"path": "dq"})
    # several chunks per loop iteration (more weight bytes in flight per pipeline stage)
    for c in [c for c in out if c.get("path") == "mma" and c.get("asm") and c["BM"] <= 64 and c["BN"] <= 128]:
        if c["BN"] == 64 or mb <= 16:
            out.append(dict(c, unroll=2, stages=3))
            out.append(dict(c, unroll=4, stages=2))
    if mb > 64:
        for bm, bn, bkw, w in ((64, 64, 16, 4), (128, 64, 16, 8), (64, 128, 16, 8), (128, 128, 16, 8)):
            out.append({"path": "mma", "BM": bm, "BN": bn, "BKW": bkw, "warps": w, "stages": 3, "split": 1,
                        "group_m": 8, "asm": True})
        out.append({"path": "dq"})
        out.append({"path": "dq", "BN": 64, "BKW": 32})
    return out


def _uniq(cfgs):
    seen, out = set(), []
    for c in cfgs:
        k = json.dumps(c, sort_keys=True)
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out


def tune_one(kind, kern, x, ref, log) -> dict:
    from triton.testing import do_bench

    mb = max(1, 1 << (x.shape[0] - 1).bit_length())
    best = None
    for cfg in candidates(kind, kern, mb):
        try:
            kern.plans.clear()
            kern.plan(x.shape[0], x.dtype, cfg)
            y = kern(x)
            err = rel_err(y, ref)
            if not err < 2e-2:
                log.append({"cfg": cfg, "error": f"rel err {err:.3g}"})
                continue
            t = do_bench(lambda: kern(x), warmup=5, rep=30, return_mode="median") * 1e3
            log.append({"cfg": cfg, "us": t})
            if best is None or t < best[0]:
                best = (t, cfg)
        except Exception as e:  # noqa: BLE001
            log.append({"cfg": cfg, "error": repr(e)[:200]})
    kern.plans.clear()
    return best[1] if best else kern.default_config(mb, x.dtype)


# ---- parallel precompile ---------------------------------------------------------------------------
# Compiled kernels depend only on the constexprs and on the divisibility of N and K by 16 (the
# other integer arguments are not specialized), so every candidate config can be compiled ahead,
# in parallel processes, on a small layer of the same divisibility; the tuning run then finds them
# in Triton's on-disk cache.
PC_N, PC_K = 256, 2048


def _stub(kind, n, k):
    from types import SimpleNamespace

    from quantkit.kernels.fp8 import FP8Kernel
    from quantkit.kernels.w4a16 import W4A16Kernel
    from quantkit.kernels.w4a16_repacked import RepackedW4A16Kernel

    gs = KINDS[kind].get("group_size") or (1 << 30)
    if kind.startswith("fp8"):
        st = SimpleNamespace(N=n, K=k, act=KINDS[kind]["activations"], smm_ok=True)
        cls = FP8Kernel
    elif KINDS[kind].get("impl") == "v1":
        st = SimpleNamespace(N=n, K=k, NB=-(-k // 128), gmap=None, GS=gs, gemv_max_m=4)
        cls = RepackedW4A16Kernel
    else:
        st = SimpleNamespace(N=n, K=k, KWS=k // 8, impl="k", GS=gs, mode=1 if KINDS[kind]["type"] == "lut" else 0)
        cls = W4A16Kernel
    st.default_config = lambda mb, dt, st=st, cls=cls: cls.default_config(st, mb, dt)
    return st


def _signature(kind, mb, cfg):
    c = dict(cfg)
    sp = int(c.pop("split", 1))
    c["splitk"] = sp > 1
    if c.get("path") == "gemv":
        c["BM"] = mb
    return json.dumps([kind, c], sort_keys=True)


def precompile_jobs(kinds, shapes, ms, tune: bool = True):
    """(kind, M, config) to compile: every tuning candidate, or (tune=False) the config each layer
    picks (its GPU's tuned table or default; real layers are built on the GPU to ask them)."""
    jobs, seen = [], set()
    for kind in kinds:
        for sname in shapes:
            K, N = SHAPES[sname]
            if tune:
                st = _stub(kind, N, K)
            else:
                dev = torch.device("cuda")
                st = build_kernel(KINDS[kind], make_packed(KINDS[kind], N, K, dev), N, K, dev)[1]
            for M in ms:
                mb = max(1, 1 << (M - 1).bit_length())
                picked = [st.check_config(st.config(mb, torch.bfloat16), mb, torch.bfloat16)] if not tune else None
                for cfg in picked or candidates(kind, st, mb):
                    sig = _signature(kind, mb, cfg)
                    if sig not in seen:
                        seen.add(sig)
                        jobs.append((kind, M, cfg))
    return jobs


def _pc_worker(jobs):
    import torch as t

    dev = t.device("cuda")
    built, done, errs = {}, 0, []
    for kind, M, cfg in jobs:
        try:
            if kind not in built:
                spec = KINDS[kind]
                built[kind] = build_kernel(spec, make_packed(spec, PC_N, PC_K, dev), PC_N, PC_K, dev)[1]
            kern = built[kind]
            kern.plans.clear()
            kern.plan(M, t.bfloat16, cfg)
            kern(t.randn(M, PC_K, device=dev, dtype=t.bfloat16))
            t.cuda.synchronize()
            done += 1
        except Exception as e:  # noqa: BLE001
            errs.append(f"{kind} M={M} {cfg}: {e!r:.200}")
    return done, errs


def precompile(kinds, shapes, ms, workers: int, tune: bool = True) -> None:
    import multiprocessing as mp

    jobs = precompile_jobs(kinds, shapes, ms, tune)
    t0 = time.perf_counter()
    chunks = [jobs[i::workers] for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        res = pool.map(_pc_worker, chunks)
    errs = [e for _, es in res for e in es]
    print(f"precompiled {sum(d for d, _ in res)}/{len(jobs)} kernel variants with {workers} processes in "
          f"{time.perf_counter() - t0:.0f} s; {len(errs)} failed", flush=True)
    for e in errs[:20]:
        print("  precompile:", e)


# ---- main ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--kinds", default="int4,any4,fp8,fp8w")
    ap.add_argument("--tune", action="store_true", help="time candidate configs first and store the best")
    ap.add_argument("--tune-kinds", default=None, help="with --tune: tune only these kinds (default: all)")
    ap.add_argument("--tuned-out", default=None, 
                    help="where to write tuned configs (default kernels/src/tuned_<gpu>.json)")
    ap.add_argument("--rep", type=float, default=60.0, help="ms of timed repetitions per measurement")
    ap.add_argument("--json", default=None, help="write all rows here")
    ap.add_argument("--md", default=None, help="write the markdown report here (e.g. docs/PERFORMANCE.md)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--precompile", type=int, default=0, metavar="N",
                    help="compile every candidate config first in N parallel processes")
    ap.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)  # CPU/interpreter self-test
    args = ap.parse_args(argv)
    if args.smoke_cpu:
        _smoke_patches()
    elif not torch.cuda.is_available():
        print("bench kernels: needs a CUDA GPU")
        return 2
    import triton

    from quantkit.kernels import _launch

    dev = torch.device("cpu" if args.smoke_cpu else "cuda")
    torch.manual_seed(0)
    shapes = [s for s in args.shapes.split(",") if s]
    ms = [int(m) for m in args.ms.split(",") if m]
    kinds = [k for k in args.kinds.split(",") if k]
    dt = torch.bfloat16
    bw = copy_bandwidth(dev)
    info = {"device": "cpu-smoke" if args.smoke_cpu else torch.cuda.get_device_name(),
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "copy_bw_GBs": bw / 1e9, "rep_ms": args.rep}
    print(json.dumps(info), flush=True)
    if args.precompile:
        pk = kinds if not args.tune_kinds else [k for k in kinds if k in args.tune_kinds.split(",")]
        precompile(pk, shapes, ms, args.precompile, args.tune)
    tuned_new: dict = {}
    tune_log: dict = {}
    rows = []
    for sname in shapes:
        K, N = SHAPES[sname]
        W = torch.randn(N, K, device=dev, dtype=dt) * 0.02
        ncp = lambda nbytes: max(1, min(32, math.ceil(3 * L2_BYTES / max(nbytes, 1))))
        Ws = [W] + [W.clone() for _ in range(ncp(W.numel() * 2) - 1)]
        lin = torch.nn.functional.linear
        bf16_fns = [lambda x, w=w: lin(x, w) for w in Ws]
        kern_sets = {}
        for kind in kinds:
            spec = KINDS[kind]
            packed = make_packed(spec, N, K, dev)
            fmt, kern = build_kernel(spec, packed, N, K, dev)
            wd = None if kind.startswith("fp8") and spec["activations"] != "none" else \
                fmt.unpack(packed, (N, K)).to(dt)
            if wd is not None and spec.get("impl") == "k":
                wd = None  # the reference comes from fmt.linear (shares the v1 kind's memory budget)
            kern_sets[kind] = (fmt, packed, kern, wd)
        tg = None if args.no_peers else tinygemm_pack(N, K, dev)
        if tg is not None:  # rotate through copies like every other method (one copy stayed in L2)
            tg = [tg] + [(tg[0].clone(), tg[1].clone())
                         for _ in range(ncp(sum(t.numel() * t.element_size() for t in tg)) - 1)]
        for M in ms:
            xs = [torch.randn(M, K, device=dev, dtype=dt) for _ in range(2)]
            x = xs[0]
            row = {"shape": sname, "K": K, "N": N, "M": M}
            ref_bf = lin(x, W)
            e, g = time_both(rotated(bf16_fns, xs), args.rep)
            row["bf16"] = {"eager_us": e, "graph_us": g,
                           "bw_frac": (N * K * 2 + M * K * 2 + M * N * 2) / (g * 1e-6) / bw}
            del ref_bf
            if M == 1:
                h, wall = host_overhead_us(lambda W=W: lin(x, W))
                row["bf16"].update(host_us=h, wall_us=wall)
            if tg is not None and M <= 2048:
                try:
                    fns = [lambda x, wp=wp, sz=sz: torch._weight_int4pack_mm(x, wp, 128, sz) for wp, sz in tg]
                    fns[0](x)
                    e, g = time_both(rotated(fns, xs), args.rep)
                    row["tinygemm"] = {"eager_us": e, "graph_us": g}
                except Exception as ex:  # noqa: BLE001
                    row["tinygemm"] = {"error": repr(ex)[:120]}
            for kind, (fmt, packed, kern, wd) in kern_sets.items():
                r = {}
                try:
                    ref = fmt.linear(x, packed, (N, K)) if wd is None else lin(x, wd)
                    if args.tune and (args.tune_kinds is None or kind in args.tune_kinds.split(",")):
                        log = []
                        cfg = tune_one(kind, kern, x, ref, log)
                        key = kern.key(_launch.m_bucket(M), dt)
                        tuned_new[key] = cfg
                        _launch.tuned(dev)[key] = cfg
                        tune_log[key] = log
                        r["cfg"] = cfg
                    kern.plans.clear()
                    y = kern(x)
                    r["rel_err"] = rel_err(y, ref)
                    r["path"] = kern.config(_launch.m_bucket(M), dt)["path"]
                    del ref
                    nb = kernel_bytes(kern)
                    copies = [kern] + [clone_kernel(kern) for _ in range(ncp(nb) - 1)]
                    for c in copies:
                        c(x)
                    e, g = time_both(rotated(copies, xs), args.rep)
                    r.update(eager_us=e, graph_us=g,
                             bw_frac=(nb + M * K * 2 + M * N * 2) / (g * 1e-6) / bw,
                             speedup_graph=row["bf16"]["graph_us"] / g, speedup_eager=row["bf16"]["eager_us"] / e)
                    if M == 1:
                        r["host_us"], r["wall_us"] = host_overhead_us(lambda: kern(x))
                        if KINDS[kind]["type"] in ("int", "lut"):
                            r["layer_host_us"] = layer_host_us(KINDS[kind], packed, N, K, x)
                    del copies
                except Exception as ex:  # noqa: BLE001
                    r["error"] = repr(ex)[:300]
                row[kind] = r
            rows.append(row)
            print(format_row(row, kinds), flush=True)
        del W, Ws, kern_sets, tg
        torch.cuda.empty_cache()
        save(args, info, rows, tune_log, tuned_new)
    md = report_md(info, rows, kinds)
    print(md)
    if args.md:
        write_md(Path(args.md), md)
    return 0


def save(args, info, rows, tune_log, tuned_new) -> None:
    """Write what is measured so far (a run cut short keeps its finished shapes)."""
    from quantkit.kernels import _launch

    if args.tune:
        name = info["device"]
        out = Path(args.tuned_out) if args.tuned_out else _launch.tuned_file(name)
        old = {}
        try:
            old = json.loads(out.read_text())
        except (OSError, ValueError):
            pass
        old.update(tuned_new)
        if torch.cuda.is_available():
            old.setdefault("_gpu", name)
            old.setdefault("_cc", list(torch.cuda.get_device_capability()))
        out.write_text(json.dumps(old, indent=0, sort_keys=True))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows, "tune_log": tune_log}, indent=1))


def _smoke_patches():
    """Run the script's logic on CPU under TRITON_INTERPRET=1 (tiny shapes, wall-clock timing)."""
    global time_both, copy_bandwidth, host_overhead_us, build_kernel, tinygemm_pack
    from quantkit import kernels

    def tb(f, rep_ms):
        t0 = time.perf_counter()
        f()
        return (time.perf_counter() - t0) * 1e6, (time.perf_counter() - t0) * 1e6
    time_both = tb
    import triton.testing

    def db(f, warmup=0, rep=0, return_mode="median"):
        t0 = time.perf_counter()
        f()
        return (time.perf_counter() - t0) * 1e3
    triton.testing.do_bench = db
    copy_bandwidth = lambda dev: 1e11
    host_overhead_us = lambda f, n=3: (1.0, 1.0)
    tinygemm_pack = lambda n, k, dev: None
    kernels._scan()

    def bk(spec, packed, n, k, dev):
        from quantkit.formats.base import format_from_spec
        from quantkit.kernels import lowbit

        fmt = format_from_spec(fmt_spec(spec))
        if spec["type"] in ("int", "lut"):
            b = lowbit.build_int if spec["type"] == "int" else lowbit.build_lut
            return fmt, b(fmt, packed, (n, k), dev, impl=spec.get("impl"))
        for t, b in kernels._BUILDERS:
            if t == spec["type"]:
                return fmt, b(fmt, packed, (n, k), dev)
    build_kernel = bk
    SHAPES["tiny"] = (256, 48)
    torch.cuda.synchronize = lambda *a: None


def _f(r, k, fmt="{:.2f}"):
    v = r.get(k) if isinstance(r, dict) else None
    return "–" if v is None else fmt.format(v)


def format_row(row, kinds) -> str:
    b = row["bf16"]
    s = f"{row['shape']:10s} M={row['M']:5d} bf16 {b['graph_us']:8.1f}us g/{b['eager_us']:8.1f} e"
    for k in kinds:
        r = row.get(k, {})
        if "error" in r:
            s += f" | {k} ERR"
        else:
            s += (f" | {k} {r.get('graph_us', 0):7.1f} x{r.get('speedup_graph', 0):4.2f} "
                  f"e x{r.get('speedup_eager', 0):4.2f} bw {r.get('bw_frac', 0):4.2f} [{r.get('path', '')}]")
    if "tinygemm" in row and "graph_us" in row["tinygemm"]:
        s += f" | tiny x{b['graph_us'] / row['tinygemm']['graph_us']:4.2f}"
    return s


NAMES = {"int4": "W4A16 int4 sym g128", "int4a": "W4A16 int4 asym g128", "any4": "any4 g128 (LUT)",
         "nf4": "NF4 g128 (LUT)", "fp8": "FP8 W8A8 (dynamic per token)", "fp8w": "FP8 W8A16"}


def report_md(info, rows, kinds) -> str:
    L = []
    L.append(f"Device: {info['device']}; date {info['date']}; torch {info['torch']}, triton {info['triton']}; "
             f"measured copy bandwidth {info['copy_bw_GBs']:.0f} GB/s (read + write); "
             f"median of do_bench (eager: L2 flushed before each call) and do_bench_cudagraph (graph), "
             f"{info['rep_ms']:.0f} ms of repetitions each; weights rotate through copies > 3x L2. "
             f"Speed-up = bf16 `F.linear` time / kernel time, same M, same run. bw = bytes moved / graph time / copy bandwidth.")
    L.append("")
    tag = f"{info['device']}, {info['date']}"
    for k in kinds:
        L.append(f"#### {NAMES.get(k, k)} — {tag}")
        L.append("")
        L.append("| shape | M | bf16 graph µs | kernel graph µs | speed-up graph | speed-up eager | bw | path | rel err |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            r = row.get(k, {})
            if "error" in r:
                L.append(f"| {row['shape']} | {row['M']} | {row['bf16']['graph_us']:.1f} | error: {r['error'][:60]} |"
                         " | | | | |")
                continue
            L.append(f"| {row['shape']} | {row['M']} | {row['bf16']['graph_us']:.1f} | {_f(r, 'graph_us', '{:.1f}')} | "
                     f"{_f(r, 'speedup_graph')}x | {_f(r, 'speedup_eager')}x | {_f(r, 'bw_frac')} | {r.get('path', '')} | "
                     f"{_f(r, 'rel_err', '{:.1e}')} |")
        L.append("")
    if any("tinygemm" in r for r in rows):
        L.append(f"#### Peer in the same run: torch tinygemm int4 (`_weight_int4pack_mm`, g128) — {tag}")
        L.append("")
        L.append("| shape | M | tinygemm graph µs | speed-up graph | speed-up eager |")
        L.append("|---|---|---|---|---|")
        for row in rows:
            t = row.get("tinygemm", {})
            if "graph_us" in t:
                L.append(f"| {row['shape']} | {row['M']} | {t['graph_us']:.1f} | "
                         f"{row['bf16']['graph_us'] / t['graph_us']:.2f}x | {row['bf16']['eager_us'] / t['eager_us']:.2f}x |")
        L.append("")
    ov = [(row["shape"], k, row[k]) for row in rows for k in ["bf16"] + kinds
          if row["M"] == 1 and isinstance(row.get(k), dict) and "host_us" in row[k]]
    if ov:
        L.append("#### Eager cost per call at M = 1: host time to issue a call (Python + launch), wall time per "
                 f"call of 300 back-to-back calls, and the kernel's graph time — {tag}")
        L.append("")
        L.append("| shape | kernel | host µs/call (kernel object) | host µs/call (QuantLinear) | eager wall µs/call | "
                 "graph µs/call |")
        L.append("|---|---|---|---|---|---|")
        for s, k, r in ov:
            L.append(f"| {s} | {k} | {r['host_us']:.1f} | {_f(r, 'layer_host_us', '{:.1f}')} | {r['wall_us']:.1f} | "
                     f"{r['graph_us']:.1f} |")
        L.append("")
    return "\n".join(L)


def write_md(path: Path, body: str) -> None:
    head = "# Performance\n\n"
    text = path.read_text() if path.exists() else head
    start, end = "<!-- kernels:begin -->", "<!-- kernels:end -->"
    block = f"{start}\n## Kernels (measured by bench/kernel_bench.py)\n\n{body}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
