"""One decode step of a MoE layer: quantized experts (per-expert W4A16 kernel calls) vs bf16 experts.

A Mixtral-8x7B-shaped (H 4096, I 14336, E 8, top-2) and a Qwen3-30B-A3B-shaped (H 2048, I 768, E 128,
top-8) expert layer with random weights, as quantkit.moe.Experts (the per-expert form quantkit makes of
transformers 5's fused containers); the experts are rounded with the recipe's RTN (int4 g128 by default)
and run through QuantLinear, i.e. one W4A16 kernel call per expert matrix of each hit expert.
Routing is random top-k over M tokens (M = 1, 4, 16). Prints a table and writes $OUT/moe_decode.json.

GPU:   python bench/moe_decode.py            (about 2 minutes on an H200)
CPU:   python bench/moe_decode.py --smoke    (tiny shapes, checks the quantized layer against the float one)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn

from quantkit.moe import Experts
from quantkit.quantizers.base import LayerStats
from quantkit.recipe import load_recipe
from quantkit.solve import quantize_linear

SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}
SMOKE = {"tiny-8e": (64, 96, 8, 2), "tiny-16e": (64, 32, 16, 4)}


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    ap.add_argument("--recipe", default="w4a16-rtn")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shapes = SMOKE if args.smoke else SHAPES
    rows = []
    for label, (H, inter, E, k) in shapes.items():
        torch.manual_seed(0)
        ref = build(H, inter, E, device, dtype)
        q = quantize_experts(build(H, inter, E, device, dtype), args.recipe)
        with torch.no_grad():  # the reference holds the dequantized weights in bf16: same math, float matmuls
            for i in range(E):
                for p in ("gate_proj", "up_proj", "down_proj"):
                    w = getattr(q.expert(i), p).dequantized_weight().to(dtype)
                    getattr(ref.expert(i), p).weight.copy_(w)
        for M in (1, 4, 16):
            g = torch.Generator().manual_seed(M)
            x = torch.randn(M, H, generator=g).to(device, dtype)
            idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)]).to(device)
            w = torch.softmax(torch.randn(M, k, generator=g), -1).to(device, dtype)
            with torch.no_grad():
                yq, yf = q(x, idx, w), ref(x, idx, w)
                err = float((yq.float() - yf.float()).norm() / yf.float().norm())
                t_q = timed(lambda: q(x, idx, w), device, args.reps)
                t_f = timed(lambda: ref(x, idx, w), device, args.reps)
            rows.append({"shape": label, "H": H, "I": inter, "E": E, "top_k": k, "M": M, "hit_experts":
                         int(idx.unique().numel()), "bf16_us": round(t_f, 1), "w4a16_us": round(t_q, 1),
                         "speedup": round(t_f / t_q, 3), "rel_err_vs_dequant": err})
            r = rows[-1]
            print(f"{label:14s} M={M:3d} hit={r['hit_experts']:3d}  float {t_f:9.1f} us  quant {t_q:9.1f} us  "
                  f"x{t_f / t_q:5.2f}  rel err {err:.1e}", flush=True)
            assert err < (1e-4 if dtype == torch.float32 else 3e-2), "quantized experts disagree with their dequant"
    out = os.environ.get("OUT", ".")
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "dtype": str(dtype), "recipe": args.recipe, "rows": rows}
    tmp = os.path.join(out, "moe_decode.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out, "moe_decode.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
