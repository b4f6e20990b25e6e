"""One decode step of a MoE expert layer: bf16 and int4 experts, per-expert loop vs grouped/fused launches.

A Mixtral-8x7B-shaped (H 4096, I 14336, E 8, top-2) and a Qwen3-30B-A3B-shaped (H 2048, I 768, E 128,
top-8) expert layer with random weights, as quantkit.moe.Experts (the per-expert form quantkit makes of
transformers 5's fused containers); the int4 experts are rounded with the recipe's RTN (int4 g128 asym by
default). Routing is random top-k over M tokens (M = 1, 4, 16, 64). Columns:

* ``bf16_loop``: bf16 ``nn.Linear`` experts (the int4 experts' dequantized weights), ``Experts.forward_loop``
  (one host sync, one call per matrix of each hit expert);
* ``bf16_grouped``: the same bf16 weights stacked, ``torch._grouped_mm`` (tokens sorted and padded per
  expert on the device; only where this torch has it and it runs);
* ``int4_loop``: QuantLinear experts through ``Experts.forward_loop`` (one W4A16 kernel call per matrix);
* ``int4_fused``: the fused path (``quantkit.moe.fused``: two grouped W4A16 launches, no host sync), which
  ``Experts.forward`` takes on GPU (checked: same output).

Eager: wall time per call (``--reps`` calls after warm-ups). Graph: the call captured once in a CUDA graph
and replayed (the grouped and fused columns; the loops read the routing on the host and cannot be
captured). Every output is checked against the bf16 loop on the dequantized weights (relative error of the
norm, largest over the columns; the run fails on a mismatch). Prints a table, writes $OUT/moe_decode.json.

GPU:   python3 -P bench/moe_decode.py [--shapes mixtral-8x7b,qwen3-30b-a3b] [--m 1,4,16,64] [--reps 50]
CPU:   python3 -P bench/moe_decode.py --smoke   (tiny shapes; the fused kernel in Triton's interpreter)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

if "--smoke" in sys.argv:  # the fused kernel runs on CPU through Triton's interpreter (set before importing it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from quantkit.moe import Experts, fused  # noqa: E402
from quantkit.quantizers.base import LayerStats  # noqa: E402
from quantkit.recipe import load_recipe  # noqa: E402
from quantkit.solve import quantize_linear  # noqa: E402

SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}
SMOKE = {"tiny-8e": (64, 96, 8, 2), "tiny-16e": (64, 32, 16, 4)}
COLS = ("bf16_loop", "bf16_grouped", "int4_loop", "int4_fused")


class _Host(nn.Module):
    act_fn = staticmethod(torch.nn.functional.silu)


def build(H: int, inter: int, E: int, device, dtype) -> Experts:
    ex = Experts(_Host(), E, H, inter, gated=True, bias=False, concatenated=True, device=device, dtype=dtype)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.02)
    return ex


def quantize_experts(ex: Experts, recipe: str) -> Experts:
    r = load_recipe(recipe)
    for name, mod in list(ex.named_modules()):
        if isinstance(mod, nn.Linear):
            ql, _ = quantize_linear(name, mod, r.scheme_for(f"model.layers.0.mlp.experts.{name}"), LayerStats())
            ql.dense_weight = None
            parent, _, child = name.rpartition(".")
            setattr(ex.get_submodule(parent), child, ql)
    return ex


class GroupedBF16:
    """bf16 experts stacked ([E, 2I, H], [E, H, I]) through ``torch._grouped_mm``: pairs sorted by expert and
    padded to 16 rows per expert on the device (quantkit.kernels.moe_w4a16.align), no host sync."""

    def __init__(self, ex: Experts):
        E = ex.num_experts
        self.E = E
        self.gu = torch.stack([torch.cat([ex.expert(i).gate_proj.weight, ex.expert(i).up_proj.weight]) for i in
                               range(E)]).contiguous()
        self.down = torch.stack([ex.expert(i).down_proj.weight for i in range(E)]).contiguous()
        self.inter = ex.inter

    def __call__(self, x, idx, w):
        from quantkit.kernels.moe_w4a16 import align

        T, k = idx.shape
        P = T * k
        ids, _, _ = align(idx, self.E, 16)
        cap = ids.numel()
        valid = ids < P
        pair = torch.where(valid, ids, 0).long()
        xs = torch.where(valid[:, None], x[pair // k], 0)
        flat = idx.reshape(-1).long()
        counts = torch.zeros(self.E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        offs = torch.cumsum((counts + 15) // 16 * 16, 0).to(torch.int32)
        h = torch._grouped_mm(xs, self.gu.transpose(-2, -1), offs=offs)
        a = torch.nn.functional.silu(h[:, :self.inter]) * h[:, self.inter:]
        y = torch._grouped_mm(a, self.down.transpose(-2, -1), offs=offs)
        y = torch.where(valid[:, None], y * w.reshape(-1)[pair].to(y.dtype)[:, None], 0)  # rows past offs: unset
        out = torch.zeros(T + 1, x.shape[1], dtype=torch.float32, device=x.device)
        out.index_add_(0, torch.where(valid, pair // k, T), y.float())
        assert cap >= P
        return out[:T].to(x.dtype)


def _no_loop(*a):
    raise RuntimeError("Experts.forward ran the per-expert loop")


def timed(fn, device, reps: int) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e6


def graph_timed(fn, reps: int) -> float:
    """The call captured in a CUDA graph, replayed ``reps`` times: µs per replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    ap.add_argument("--recipe", default="w4a16-rtn")
    ap.add_argument("--shapes", default=None, help=f"comma list of {sorted(SHAPES)} (default: both)")
    ap.add_argument("--m", default=None, help="token counts, comma list (default 1,4,16,64; --smoke: 1,16)")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16
    table = SMOKE if args.smoke else SHAPES
    names = args.shapes.split(",") if args.shapes else list(table)
    for n in names:
        if n not in table:
            ap.error(f"unknown shape {n!r}: choose from {sorted(table)}")
    ms = [int(m) for m in (args.m or ("1,16" if args.smoke else "1,4,16,64")).split(",")]
    reps = 2 if args.smoke else args.reps
    tol = 5e-2 if not cuda else 3e-2  # the interpreter rounds bf16 by truncation
    has_gmm = hasattr(torch, "_grouped_mm") and cuda
    rows, failures = [], []
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"torch._grouped_mm {'yes' if has_gmm else 'no'}", flush=True)
    for label in names:
        H, inter, E, k = table[label]
        torch.manual_seed(0)
        t0 = time.perf_counter()
        q = quantize_experts(build(H, inter, E, device, dtype), args.recipe)
        ref = build(H, inter, E, device, dtype)
        with torch.no_grad():  # the reference holds the dequantized weights in bf16: same math, float matmuls
            for i in range(E):
                for p in ("gate_proj", "up_proj", "down_proj"):
                    getattr(ref.expert(i), p).weight.copy_(getattr(q.expert(i), p).dequantized_weight().to(dtype))
        run = fused.stacked_for(q, device)
        if run is None:
            raise SystemExit(f"{label}: the fused path refuses these experts: {fused.reason(q)}")
        gmm = GroupedBF16(ref) if has_gmm else None
        print(f"{label}: built in {time.perf_counter() - t0:.1f} s", flush=True)
        for M in ms:
            g = torch.Generator().manual_seed(M)
            x = torch.randn(M, H, generator=g).to(device, dtype)
            idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)]).to(device)
            w = torch.softmax(torch.randn(M, k, generator=g), -1).to(device, dtype)
            fns = {"bf16_loop": partial(ref.forward_loop, x, idx, w),
                   "bf16_grouped": partial(gmm, x, idx, w) if gmm is not None else None,
                   "int4_loop": partial(q.forward_loop, x, idx, w),
                   "int4_fused": partial(run, x, idx, w)}
            row = {"shape": label, "H": H, "I": inter, "E": E, "top_k": k, "M": M,
                   "hit_experts": int(idx.unique().numel())}
            with torch.no_grad():
                yf = fns["bf16_loop"]().float()
                nrm = yf.norm()
                errs = {}
                for c in COLS[1:]:
                    if fns[c] is None:
                        continue
                    try:
                        errs[c] = float((fns[c]().float() - yf).norm() / nrm)
                    except Exception as e:  # noqa: BLE001 - _grouped_mm may not run on this GPU/torch
                        msg = f"{c} failed ({type(e).__name__}: {str(e)[:300]}): column skipped"
                        print(f"  {msg}", flush=True)
                        if c != "bf16_grouped":  # ours: a failure of the run (the other columns still run)
                            failures.append(f"{label} M={M}: {msg}")
                        fns[c] = None
                        if c == "bf16_grouped":
                            gmm = None
                if cuda and fns["int4_fused"] is not None:  # Experts.forward takes the fused path (not the loop)
                    q.__dict__["forward_loop"] = _no_loop
                    try:
                        q(x, idx, w)
                    except RuntimeError as e:
                        failures.append(f"{label} M={M}: Experts.forward did not take the fused path ({e})")
                    finally:
                        del q.__dict__["forward_loop"]
                for c in COLS:
                    row[f"{c}_us"] = round(timed(fns[c], device, reps), 1) if fns[c] is not None else None
                    row[f"{c}_graph_us"] = None
                    if c in ("bf16_grouped", "int4_fused") and cuda and fns[c] is not None:
                        try:
                            row[f"{c}_graph_us"] = round(graph_timed(fns[c], reps), 1)
                        except Exception as e:  # noqa: BLE001 - reported; the fused one is a failure
                            msg = f"{c}: CUDA graph capture failed ({type(e).__name__}: {str(e)[:300]})"
                            print(f"  {msg}", flush=True)
                            if c == "int4_fused":
                                failures.append(f"{label} M={M}: {msg}")
            row.update({f"rel_err_{c}": errs.get(c) for c in COLS[1:]})
            row["max_rel_err"] = max(errs.values()) if errs else None
            if "int4_fused" not in errs or "int4_loop" not in errs:
                rows.append(row)
                continue
            if not row["max_rel_err"] < tol:
                failures.append(f"{label} M={M}: relative error {errs} >= {tol}")
            rows.append(row)
            gr = row["int4_fused_graph_us"]
            print(f"{label:14s} M={M:3d} hit={row['hit_experts']:3d}  " + "  ".join(
                f"{c} {row[c + '_us'] if row[c + '_us'] is not None else '-':>8}" for c in COLS)
                + f"  fused graph {gr if gr is not None else '-':>8}  max rel err {row['max_rel_err']:.1e}",
                flush=True)
        q = ref = run = gmm = fns = None
        if cuda:
            torch.cuda.empty_cache()
    print("\n| shape | M | hit | bf16 loop | bf16 grouped (graph) | int4 loop | int4 fused (graph) | fused vs bf16 loop "
          "| fused graph vs bf16 grouped graph |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def f(v):
            return "-" if v is None else f"{v:.1f}"

        sp = r["bf16_loop_us"] / r["int4_fused_us"] if r["int4_fused_us"] else None
        gg = (r["bf16_grouped_graph_us"] / r["int4_fused_graph_us"]) if r["bf16_grouped_graph_us"] and \
            r["int4_fused_graph_us"] else None
        print(f"| {r['shape']} | {r['M']} | {r['hit_experts']} | {f(r['bf16_loop_us'])} | {f(r['bf16_grouped_us'])} "
              f"({f(r['bf16_grouped_graph_us'])}) | {f(r['int4_loop_us'])} | {f(r['int4_fused_us'])} "
              f"({f(r['int4_fused_graph_us'])}) | {'-' if sp is None else f'{sp:.2f}x'} | {'-' if gg is None else f'{gg:.2f}x'} |")
    out = os.environ.get("OUT", ".")
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "triton": _triton_version(), "dtype": str(dtype), "recipe": args.recipe, "reps": reps,
            "grouped_mm": has_gmm, "rows": rows, "failures": failures}
    tmp = os.path.join(out, "moe_decode.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out, "moe_decode.json"))
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
