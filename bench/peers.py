"""Peers in the same run: bf16 cuBLAS, quantkit int4 g128 / any4 g128 / FP8 W8A8, torch tinygemm, Marlin, gemlite.

    python bench/peers.py [--out DIR] [--shapes 8B.qkv,...] [--ms 1,2,...] [--methods quantkit,marlin]
    python bench/peers.py --smoke          # CPU: tiny shape, wall-clock timing, peers reported missing
    bash bench/gpu_kernels.sh peers        # on the GPU (builds Marlin, installs gemlite; see there)

For every shape (K -> N) and M: median of ``triton.testing.do_bench`` (eager; it flushes L2 before
each call) and ``do_bench_cudagraph`` (graph). Every method, bf16 included, rotates through enough
copies of its weights (> 3x the 50 MB L2) that the cache cannot serve them between calls, and every
output is checked against the method's own dequantized weights in bf16 ``F.linear`` first (rel err
recorded; a method above 2e-2 is still timed but flagged). Methods: bf16 ``F.linear`` (the baseline),
quantkit's shipped kernels as bench/kernel_bench.py builds them (``quantkit``: int4 sym g128;
``any4``: the LUT format g128; ``fp8``: W8A8 e4m3, activations quantized per token, checked against
the format's own emulation), torch's
tinygemm ``_weight_int4pack_mm`` (asym g128), Marlin (IST-DASLab, fp16 activations: Marlin has no
bf16 path; sym g128) and gemlite (A16W4 g128 bf16, asym). A peer that fails to build, import or run
is reported in the table and the JSON with its error; the run goes on. Writes peers.md and
peers.json to --out after every shape (atomic).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _load_kernels_bench():
    """bench/kernel_bench.py as a module (registered, so spawned precompile workers find it)."""
    name = "quantkit_bench_kernels"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "kernel_bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


kb = _load_kernels_bench()
SHAPES = kb.SHAPES
MS = kb.MS
METHODS = ("bf16", "quantkit", "any4", "fp8", "tinygemm", "marlin", "gemlite")
PEERS = METHODS[1:]
NAMES = {"bf16": "bf16 `F.linear` (cuBLAS)", "quantkit": "quantkit int4 g128",
         "any4": "quantkit any4 g128 (LUT)", "fp8": "quantkit FP8 W8A8 (e4m3, dynamic per token)",
         "tinygemm": "torch tinygemm int4 g128", "marlin": "Marlin int4 g128 (fp16)",
         "gemlite": "gemlite A16W4 g128"}
G = 128
TOL = 2e-2


class Built:
    """One method on one shape: per-copy callables f(x) -> y, what its output is checked against
    (the dequantized weight (N, K) bf16 for bf16 ``F.linear``, or a function x -> reference output;
    None: the method is the reference), its input dtype."""

    def __init__(self, fns, wref, x_dtype=torch.bfloat16, note=""):
        self.fns, self.wref, self.x_dtype, self.note = fns, wref, x_dtype, note

    def reference(self, x):
        if callable(self.wref):
            return self.wref(x)
        return torch.nn.functional.linear(x.to(torch.bfloat16), self.wref)


def n_copies(nbytes: int) -> int:
    """Copies of a weight set so that a rotation through them moves > 3x L2 (as bench/kernel_bench.py)."""
    return max(1, min(32, math.ceil(3 * kb.L2_BYTES / max(nbytes, 1))))


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# ---- methods ---------------------------------------------------------------------------------------
def setup_bf16(K, N, dev):
    W = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
    Ws = [W] + [W.clone() for _ in range(n_copies(_nbytes(W)) - 1)]
    lin = torch.nn.functional.linear
    return Built([lambda x, w=w: lin(x, w) for w in Ws], None)


def setup_quantkit(K, N, dev, kind="int4"):
    """quantkit's shipped kernel of a kernel_bench kind (int4, any4, fp8), built as kernel_bench builds
    it; FP8 W8A8 is checked against the format's own emulation (activations quantized per token)."""
    spec = kb.KINDS[kind]
    packed = kb.make_packed(spec, N, K, dev)
    fmt, kern = kb.build_kernel(spec, packed, N, K, dev)
    if spec["type"] == "fp8":
        wref = lambda x, f=fmt, p=packed: f.linear(x.to(torch.bfloat16), p, (N, K))  # noqa: E731
    else:
        wref = fmt.unpack(packed, (N, K)).to(torch.bfloat16)
    copies = [kern] + [kb.clone_kernel(kern) for _ in range(n_copies(kb.kernel_bytes(kern)) - 1)]
    return Built(copies, wref, note=f"impl {getattr(kern, 'impl', '?')}")


def setup_tinygemm(K, N, dev):
    """Asym int4 g128 in tinygemm's convention: w = (q - 8) * s + z, q in [0, 15]."""
    q = torch.randint(0, 16, (N, K), dtype=torch.int32, device=dev)
    s = torch.rand(K // G, N, device=dev) * 0.01 + 1e-3
    z = torch.randn(K // G, N, device=dev) * 0.01
    sz = torch.stack([s, z], -1).to(torch.bfloat16).contiguous()
    u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    wp = torch._convert_weight_to_int4pack(u8, 8)
    sb, zb = sz[..., 0].float().t(), sz[..., 1].float().t()  # (N, K/G), the rounded values used
    wref = ((q.view(N, K // G, G) - 8) * sb[..., None] + zb[..., None]).view(N, K).to(torch.bfloat16)
    del q, u8
    sets = [(wp, sz)] + [(wp.clone(), sz.clone()) for _ in range(n_copies(_nbytes(wp, sz)) - 1)]
    mm = torch._weight_int4pack_mm
    return Built([lambda x, w=w, t=t: mm(x, w, G, t) for w, t in sets], wref)


def marlin_pack(q: torch.Tensor, s: torch.Tensor, perm, scale_perm):
    """marlin.Layer.pack (groupsize 128) from codes q (N, K) in [0, 15] (w = (q - 8) * s) and scales
    s (N, K/128) fp16, on q's device (Marlin's own pack round-trips through numpy on the host).
    Returns (B int32 (K/16, 2N), s fp16 (K/128, N)) in Marlin's layout."""
    N, K = q.shape
    tile = 16
    w = q.t().contiguous().to(torch.int32)  # (K, N); pack()'s group permute and its undo cancel out
    st = s.t().contiguous().reshape(-1, len(scale_perm))[:, scale_perm].reshape(-1, N).contiguous()
    w = w.reshape(K // tile, tile, N // tile, tile).permute(0, 2, 1, 3).reshape(K // tile, N * tile)
    res = w.reshape(-1, perm.numel())[:, perm.to(w.device)].reshape(w.shape)
    B = torch.zeros(res.shape[0], res.shape[1] // 8, dtype=torch.int32, device=q.device)
    for i in range(8):
        B |= (res[:, i::8] & 0xF) << (4 * i)
    return B, st


def setup_marlin(K, N, dev):
    import marlin

    if K % 128 or N % 256:
        raise ValueError(f"Marlin needs K % 128 == 0 and N % 256 == 0, got K={K}, N={N}")
    q = torch.randint(0, 16, (N, K), dtype=torch.int32, device=dev)
    s = (torch.rand(N, K // G, device=dev) * 0.01 + 1e-3).half()
    wref = ((q.view(N, K // G, G) - 8) * s.float()[..., None]).view(N, K).to(torch.bfloat16)
    layer = marlin.Layer(K, N, groupsize=G).to(dev)
    B, st = marlin_pack(q, s, marlin._perm, marlin._scale_perm)
    layer.B.copy_(B)
    layer.s.copy_(st)
    del q, B
    layers = [layer] + [copy.deepcopy(layer) for _ in range(n_copies(_nbytes(layer.B, layer.s)) - 1)]
    return Built(layers, wref, x_dtype=torch.half, note="fp16 activations")


def setup_gemlite(K, N, dev):
    import gemlite
    from gemlite import DType, GemLiteLinear

    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev)
    s = (torch.rand(N, K // G, device=dev) * 0.01 + 1e-3).to(torch.bfloat16)
    z = torch.randint(6, 10, (N, K // G), device=dev).to(torch.bfloat16)

    def make():  # copies are packed anew (the module holds bound methods and meta state)
        lay = GemLiteLinear(4, group_size=G, in_features=K, out_features=N,
                            input_dtype=DType.BF16, output_dtype=DType.BF16)
        lay.pack(q, s, z, None)
        return lay

    layer = make()
    # gemlite packs in fma mode: w = q * s + (-z * s) with -z * s rounded to bf16
    zs = (-z.float() * s.float()).to(torch.bfloat16).float()
    wref = (q.view(N, K // G, G).float() * s.float()[..., None] + zs[..., None]).view(N, K).to(torch.bfloat16)
    nb = sum(_nbytes(t) for t in layer.parameters()) + sum(_nbytes(t) for t in layer.buffers())
    layers = [layer] + [make() for _ in range(n_copies(nb) - 1)]
    return Built(layers, wref, note=f"gemlite {getattr(gemlite, '__version__', '?')}")


SETUPS = {"bf16": setup_bf16, "quantkit": setup_quantkit, "any4": lambda K, N, dev: setup_quantkit(K, N, dev, "any4"),
          "fp8": lambda K, N, dev: setup_quantkit(K, N, dev, "fp8"), "tinygemm": setup_tinygemm,
          "marlin": setup_marlin, "gemlite": setup_gemlite}


def peer_import(name: str, marlin_dir: str | None) -> str | None:
    """None when the peer's package imports, else the reason (one line)."""
    try:
        if name == "marlin":
            if marlin_dir and os.path.abspath(marlin_dir) not in sys.path:
                sys.path.insert(0, os.path.abspath(marlin_dir))
            import marlin  # noqa: F401
        elif name == "gemlite":
            import gemlite
            from gemlite import core

            if core.get_default_cache_config() is None:  # e.g. the H200: no config of its own
                h100 = Path(gemlite.__file__).parent / "configs" / "h100.json"
                gemlite.load_config(str(h100))
                return None if h100.exists() else "gemlite: no h100.json config"
    except Exception as e:  # noqa: BLE001
        return f"{name} unavailable: {e!r:.200}"
    return None


def probe_start(name: str, marlin_dir: str | None) -> subprocess.Popen:
    """Run the peer once on a small layer in a child process (a CUDA trap there, e.g. Marlin's
    illegal instruction, must not kill this run); probe_wait gives its verdict."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", name]
    if marlin_dir:
        cmd += ["--marlin-dir", marlin_dir]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def probe_wait(name: str, p: subprocess.Popen, timeout: float = 240) -> str | None:
    """None when the probe ran and its output matched the reference, else the reason (one line)."""
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return f"{name}: probe timed out after {timeout:g} s"
    if p.returncode == 0 and "PROBE OK" in out:
        return None
    tail = out.strip().splitlines()[-3:]
    return f"{name}: probe failed (rc {p.returncode}): {' | '.join(tail)[:300]}"


def run_probe(name: str, marlin_dir: str | None) -> int:
    err = peer_import(name, marlin_dir)
    if err:
        print(err)
        return 1
    dev = torch.device("cuda")
    b = SETUPS[name](1024, 512, dev)
    ok = True
    for M in (1, 16, 128):
        x = torch.randn(M, 1024, device=dev, dtype=b.x_dtype)
        e = kb.rel_err(b.fns[0](x), b.reference(x))
        torch.cuda.synchronize()
        ok = ok and e < TOL
        print(f"{name} M={M} rel err {e:.2e}")
    print("PROBE OK" if ok else f"output off its reference (rel err > {TOL:g})")
    return 0 if ok else 1


# ---- timing ----------------------------------------------------------------------------------------
def time_cell(fns, xs, rep_ms: float, eager: bool) -> dict:
    from triton.testing import do_bench, do_bench_cudagraph

    f = kb.rotated(fns, xs)
    r = {}
    if eager:
        r["eager_us"] = do_bench(f, warmup=max(5, rep_ms / 4), rep=rep_ms, return_mode="median") * 1e3
    r["graph_us"] = do_bench_cudagraph(f, rep=rep_ms, return_mode="median") * 1e3
    return r


def cuda_ok() -> bool:
    if not torch.cuda.is_available():
        return True
    try:
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001
        return False


# ---- report ----------------------------------------------------------------------------------------
def ratio(row, m, mode):
    """bf16 time / method time for one row and mode ('graph' or 'eager'); None when missing."""
    b, r = row.get("bf16", {}), row.get(m, {})
    k = mode + "_us"
    if k in b and k in r and r[k] > 0:
        return b[k] / r[k]
    return None


def fmt_range(vals, total):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    s = f"{min(vals):.2f} – {max(vals):.2f}x" if len(vals) > 1 else f"{vals[0]:.2f}x"
    return s if len(vals) == total else f"{s} ({len(vals)}/{total})"


def cell_text(row, m) -> str:
    r = row.get(m)
    if r is None:
        return ""
    if "error" in r:
        return "error"
    if "skipped" in r:
        return "skipped"
    if "unavailable" in r:
        return "n/a"
    g, e = ratio(row, m, "graph"), ratio(row, m, "eager")
    s = ("–" if g is None else f"{g:.2f}x") + " / " + ("–" if e is None else f"{e:.2f}x")
    if r.get("rel_err", 0) > TOL:
        s += " †"
    return s


def method_status(info: dict, rows: list, m: str) -> str:
    """One line: why a peer did not run, or in how many cells it was timed / failed / skipped."""
    st = info.get("status", {}).get(m)
    if st:
        return f"not run: {st}"
    cells = [r.get(m, {}) for r in rows]
    n = {k: sum(k in c for c in cells) for k in ("graph_us", "error", "skipped")}
    s = f"timed in {n['graph_us']} of {len(cells)} cells"
    if n["error"]:
        first = next(c["error"] for c in cells if "error" in c)
        s += f"; {n['error']} failed (first: {first[:120]})"
    if n["skipped"]:
        why: dict[str, int] = {}
        for c in cells:
            if "skipped" in c:
                why[c["skipped"]] = why.get(c["skipped"], 0) + 1
        s += f"; {n['skipped']} skipped (" + ", ".join(f"{k}: {v}" for k, v in why.items()) + ")"
    wrong = sum(c.get("rel_err", 0) > TOL for c in cells)
    if wrong:
        s += f"; {wrong} with output off its reference (rel err > {TOL:g})"
    note = info.get("notes", {}).get(m)
    return s + (f"; note: {note}" if note else "")


def report_md(info: dict, rows: list, methods) -> str:
    peers = [m for m in methods if m != "bf16"]
    L = [f"### Peers in the same run — {info['device']}, {info['date']}", ""]
    L.append(f"torch {info['torch']}, triton {info['triton']}, Python {info['python']}; `bench/peers.py`, "
             f"median of `do_bench` (eager, L2 flushed before each call) and `do_bench_cudagraph` (graph), "
             f"{info['rep_ms']:g} ms of repetitions; every method rotates through weight copies > 3x L2 "
             f"(50 MB). Speed-up = bf16 `F.linear` time / method time, same shape and M, same process.")
    L.append("")
    for m in peers:
        L.append(f"- **{NAMES[m]}**: " + method_status(info, rows, m))
    for note in info.get("skips", []):
        L.append(f"- {note}")
    L.append("")
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    ms = sorted({r["M"] for r in rows})
    L.append("Range over the shapes, graph (eager) speed-up over bf16:")
    L.append("")
    L.append("| M | bf16 graph µs | " + " | ".join(f"{m} graph | {m} eager" for m in peers) + " |")
    L.append("|---|---|" + "---|---|" * len(peers))
    for M in ms:
        rs = [r for r in rows if r["M"] == M]
        bg = [r["bf16"]["graph_us"] for r in rs if "graph_us" in r.get("bf16", {})]
        cells = [f"{min(bg):.1f} – {max(bg):.1f}" if bg else "–"]
        for m in peers:
            for mode in ("graph", "eager"):
                cells.append(fmt_range([ratio(r, m, mode) for r in rs], len(rs)))
        L.append(f"| {M} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("Per shape: speed-up graph / eager (bf16 time over the method's); † = output off its reference "
             f"by more than {TOL:g} (timed anyway); error / skipped: see peers.json.")
    L.append("")
    L.append("| shape | M | bf16 graph µs | bf16 eager µs | " + " | ".join(peers) + " |")
    L.append("|---|---|---|---|" + "---|" * len(peers))
    for s in shapes:
        for row in (r for r in rows if r["shape"] == s):
            b = row.get("bf16", {})
            L.append(f"| {s} | {row['M']} | {kb._f(b, 'graph_us', '{:.1f}')} | {kb._f(b, 'eager_us', '{:.1f}')} | "
                     + " | ".join(cell_text(row, m) for m in peers) + " |")
    errs = [(r["shape"], r["M"], m, r[m]["error"]) for r in rows for m in peers
            if isinstance(r.get(m), dict) and "error" in r[m]]
    if errs:
        L += ["", "Errors (first 12):", ""]
        L += [f"- {s} M={M} {m}: {e[:160]}" for s, M, m, e in errs[:12]]
    return "\n".join(L) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(out: Path | None, info, rows, methods) -> str:
    md = report_md(info, rows, methods)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "peers.json", json.dumps({"info": info, "rows": rows}, indent=1))
        write_atomic(out / "peers.md", md)
    return md


# ---- main ------------------------------------------------------------------------------------------
def measure(args, methods, shapes, ms, dev, info, out) -> list:
    t_start = args.t0
    rows: list = []
    dead = None
    for sname in shapes:
        K, N = SHAPES[sname]
        built: dict = {}
        for m in methods:
            if m != "bf16" and info["status"].get(m):
                continue
            if dead or time.perf_counter() - t_start > args.budget_s:
                built[m] = Built([], None)  # not set up: every cell of this shape is marked skipped below
                continue
            try:
                built[m] = SETUPS[m](K, N, dev)
                info["notes"].setdefault(m, built[m].note)
            except Exception as e:  # noqa: BLE001
                built[m] = f"setup failed: {e!r:.300}"
        for M in ms:
            row = {"shape": sname, "K": K, "N": N, "M": M}
            xs32 = [torch.randn(M, K, device=dev) for _ in range(2)]
            for m in methods:
                b = built.get(m)
                if b is None:
                    row[m] = {"unavailable": info["status"][m]}
                    continue
                if isinstance(b, str):
                    row[m] = {"error": b}
                    continue
                if dead:
                    row[m] = {"skipped": dead}
                    continue
                if time.perf_counter() - t_start > args.budget_s:
                    row[m] = {"skipped": f"time budget ({args.budget_s:g} s) spent"}
                    continue
                if m == "tinygemm" and M > args.tinygemm_max_m:
                    row[m] = {"skipped": f"M > {args.tinygemm_max_m}"}
                    continue
                r: dict = {}
                try:
                    xs = [x.to(b.x_dtype) for x in xs32]
                    y = b.fns[0](xs[0])
                    if b.wref is not None:
                        ref = b.reference(xs[0])
                        r["rel_err"] = kb.rel_err(y, ref)
                        del ref
                    del y
                    r.update(args.timer(b.fns, xs, args.rep, M <= args.eager_max_m))
                except Exception as e:  # noqa: BLE001
                    r = {"error": f"{e!r:.300}"}
                    if not cuda_ok():
                        dead = f"CUDA context lost after {m} at {sname} M={M}"
                row[m] = r
            rows.append(row)
            print(fmt_row(row, methods), flush=True)
        del built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        info["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        save(out, info, rows, methods)
    return rows


def fmt_row(row, methods) -> str:
    b = row.get("bf16", {})
    s = f"{row['shape']:10s} M={row['M']:5d} bf16 {kb._f(b, 'graph_us', '{:8.1f}')} us"
    for m in methods[1:]:
        s += f" | {m} {cell_text(row, m)}"
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--methods", default=",".join(PEERS), help="peers to run beside bf16 (always run)")
    ap.add_argument("--rep", type=float, default=8.0, help="ms of timed repetitions per measurement")
    ap.add_argument("--eager-max-m", type=int, default=2048,
                    help="time eagerly only up to this M (above, every method is GPU-bound: eager = graph)")
    ap.add_argument("--tinygemm-max-m", type=int, default=2048,
                    help="tinygemm only up to this M (at 2048 it is ~0.04x bf16: 8192 would take seconds)")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="stop timing (cells left are marked skipped) this many seconds after the start")
    ap.add_argument("--precompile", type=int, default=14, metavar="N",
                    help="compile quantkit's picked configs first in N processes (0: off)")
    ap.add_argument("--marlin-dir", default=".peers/marlin", help="where Marlin was built (--inplace)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="write peers.md and peers.json here")
    ap.add_argument("--no-probe", action="store_true", help="skip the child-process check of Marlin/gemlite")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="CPU self-test: tiny shape, wall-clock timing")
    args = ap.parse_args(argv)
    args.timer = time_cell
    args.t0 = time.perf_counter()
    if args.probe:
        return run_probe(args.probe, args.marlin_dir)
    methods = ["bf16"] + [m for m in args.methods.split(",") if m and m != "bf16"]
    bad = [m for m in methods if m not in METHODS]
    shapes = [s for s in args.shapes.split(",") if s]
    if args.smoke:
        _smoke(args)
        shapes = ["tiny"]
    bad += [s for s in shapes if s not in SHAPES]
    if bad:
        ap.error(f"unknown method/shape {bad}: methods are {list(METHODS)}, shapes {list(SHAPES)}")
    try:
        ms = [int(m) for m in args.ms.split(",") if m]
    except ValueError:
        ap.error(f"--ms {args.ms!r}: give integers separated by commas, e.g. 1,16,2048")
    if not args.smoke and not torch.cuda.is_available():
        print("bench peers: needs a CUDA GPU (or --smoke on CPU)")
        return 2
    dev = torch.device("cpu" if args.smoke else "cuda")
    import triton

    info = {"device": "cpu-smoke" if args.smoke else torch.cuda.get_device_name(),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "rep_ms": args.rep, "status": {}, "notes": {}, "skips": [
                f"eager timed only up to M = {args.eager_max_m}: above it every method is GPU-bound "
                "(a call takes longer than its host cost), so eager = graph",
                f"tinygemm timed only up to M = {args.tinygemm_max_m} (~0.04x bf16 there)"]}
    out = Path(args.out) if args.out else None
    torch.manual_seed(0)
    probes = {}
    for m in methods[1:]:
        if m in ("marlin", "gemlite"):
            err = peer_import(m, args.marlin_dir)
            if err is None and not args.smoke and not args.no_probe:
                probes[m] = probe_start(m, args.marlin_dir)  # runs while quantkit precompiles
            elif err:
                info["status"][m] = err
    ours = [k for m, k in (("quantkit", "int4"), ("any4", "any4"), ("fp8", "fp8")) if m in methods]
    if ours and args.precompile and not args.smoke:
        try:  # only a head start: what is not compiled here compiles on first use
            kb.precompile(ours, shapes, ms, args.precompile, tune=False)
        except Exception as e:  # noqa: BLE001
            print(f"quantkit precompile failed (kernels compile on first use instead): {e!r:.200}", flush=True)
    for m, p in probes.items():
        err = probe_wait(m, p)
        if err:
            info["status"][m] = err
    for m in methods[1:]:
        print(f"{m}: {info['status'].get(m) or 'ok'}", flush=True)
    print(json.dumps(info), flush=True)
    rows = measure(args, methods, shapes, ms, dev, info, out)
    print(save(out, info, rows, methods))
    return 0


def _smoke(args) -> None:
    """CPU: Triton interpreter for quantkit, one wall-clock call instead of do_bench."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    kb._smoke_patches()

    def timer(fns, xs, rep_ms, eager):
        t0 = time.perf_counter()
        kb.rotated(fns, xs)()
        us = (time.perf_counter() - t0) * 1e6
        return {"eager_us": us, "graph_us": us} if eager else {"graph_us": us}
    args.timer = timer
    args.ms = args.ms if args.ms != ",".join(map(str, MS)) else "1,16"


if __name__ == "__main__":
    sys.exit(main())
