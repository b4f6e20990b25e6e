"""End-to-end decode speed of an 8B-shaped Llama (random weights): bf16 vs W4A16 vs W8A8-FP8.

    python bench/decode.py [--batch 1,16] [--layers 32] [--steps 200]
    quantkit bench decode [same options]

One generation loop for every variant: a minimal Llama-3-8B decoder (hidden 4096, 32 layers,
32 heads / 8 KV heads, MLP 14336, vocab 128256; RMSNorm, RoPE, static KV cache, SDPA with GQA,
greedy argmax), one decode step captured in a CUDA graph and replayed. Only the q/k/v/o and MLP
linears change between variants (the embedding and lm_head stay bf16, as in the usual W4A16
checkpoints). Weights are random (speed only); the quantized ones are random packed tensors in
quantkit's formats (docs/FORMAT.md) run through quantkit.kernels, exactly what QuantLinear calls.
Reports tokens/s and the fraction of the bandwidth bound (bytes of weights read per step over the
measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402 - after the sys.path line above
import torch.nn.functional as F  # noqa: E402

CFG = dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256)
SPECS = {
    "bf16": None,
    "w4a16": {"type": "int", "bits": 4, "group_size": 128, "sym": True},
    # the same through a named implementation (kernels/src/lowbit.py: "k" = kernels/src/w4a16.py, the default
    # for int and lut since 2026-11-26; "v1" = the first kernels), and the any4 LUT format
    "w4a16-k": {"type": "int", "bits": 4, "group_size": 128, "sym": True, "impl": "k"},
    "w4a16-v1": {"type": "int", "bits": 4, "group_size": 128, "sym": True, "impl": "v1"},
    "any4-k": {"type": "lut", "bits": 4, "group_size": 128, "table": "learned", "impl": "k"},
    "w8a8-fp8": {"type": "fp8", "dtype": "e4m3", "weight_scale": "channel", "activations": "dynamic"},
    "w8a16-fp8": {"type": "fp8", "dtype": "e4m3", "weight_scale": "channel", "activations": "none"},
}


def make_linear(kind: str, k: int, n: int, dev):
    """(callable x -> x @ W^T, bytes read per call)."""
    std = k ** -0.5
    if SPECS[kind] is None:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * std
        return (lambda x, w=w: F.linear(x, w)), w.numel() * 2
    from quantkit import kernels
    from quantkit.formats.base import format_from_spec

    spec = dict(SPECS[kind])
    impl = spec.pop("impl", None)
    fmt = format_from_spec(spec)
    if spec["type"] in ("int", "lut"):
        ng = k // 128
        packed = {"qweight": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev),
                  "scales": torch.full((n, ng), std / 4.6, device=dev, dtype=torch.float16)}
        if spec["type"] == "lut":
            packed["lut"] = torch.sort(torch.randn(n, 16, device=dev), dim=1).values.to(torch.float16)
    else:
        w = torch.randn(n, k, device=dev) * std
        s = w.abs().amax(1, keepdim=True) / 448.0
        packed = {"weight": (w / s).to(torch.float8_e4m3fn), "weight_scale": s.float()}
        del w
    if impl is not None:
        from quantkit.kernels import lowbit

        kern = (lowbit.build_int if spec["type"] == "int" else lowbit.build_lut)(fmt, packed, (n, k), dev, impl=impl)
    else:
        kern = kernels.find_kernel(fmt, packed, (n, k), dev)
    nbytes = sum(t.numel() * t.element_size() for a in ("w", "s", "z", "lut", "ws")
                 if isinstance(t := getattr(kern, a, None), torch.Tensor))
    if spec["type"] == "fp8":
        kern.fallback = None
    return kern, nbytes


class Decoder:
    def __init__(self, kind: str, batch: int, max_len: int, layers: int, dev):
        c = CFG
        h, hd = c["hidden"], c["head_dim"]
        self.c, self.batch, self.max_len, self.dev = c, batch, max_len, dev
        self.embed = torch.randn(c["vocab"], h, device=dev, dtype=torch.bfloat16) * 0.02
        self.lm_head = torch.randn(c["vocab"], h, device=dev, dtype=torch.bfloat16) * h ** -0.5
        self.bytes = 2 * self.lm_head.numel()
        self.layers = []
        qkv_n = (c["heads"] + 2 * c["kv_heads"]) * hd
        for _ in range(layers):
            L = {}
            for name, k, n in (("qkv", h, qkv_n), ("o", c["heads"] * hd, h), ("gateup", h, 2 * c["inter"]),
                               ("down", c["inter"], h)):
                L[name], nb = make_linear(kind, k, n, dev)
                self.bytes += nb
            L["n1"] = torch.ones(h, device=dev, dtype=torch.bfloat16)
            L["n2"] = torch.ones(h, device=dev, dtype=torch.bfloat16)
            L["kc"] = torch.zeros(batch, c["kv_heads"], max_len, hd, device=dev, dtype=torch.bfloat16)
            L["vc"] = torch.zeros_like(L["kc"])
            self.layers.append(L)
        self.norm = torch.ones(h, device=dev, dtype=torch.bfloat16)
        inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
        f = torch.outer(torch.arange(max_len, device=dev).float(), inv)
        self.cos = torch.cat([f.cos(), f.cos()], -1).to(torch.bfloat16)
        self.sin = torch.cat([f.sin(), f.sin()], -1).to(torch.bfloat16)
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.ar = torch.arange(max_len, device=dev)

    def step(self):
        c, B = self.c, self.batch
        H, KV, hd = c["heads"], c["kv_heads"], c["head_dim"]
        G = GLUE
        x = self.embed[self.tok]  # [B, h]
        cos, sin = self.cos[self.pos], self.sin[self.pos]  # [1, hd]
        mask = (self.ar <= self.pos).view(1, 1, 1, -1)
        d = torch.zeros_like(x)
        for L in self.layers:
            x, hn = G["add_rms"](x, d, L["n1"])
            q, k, v = G["rope_qkv"](L["qkv"](hn), cos, sin, H, KV, hd)
            L["kc"].index_copy_(2, self.pos, k)
            L["vc"].index_copy_(2, self.pos, v)
            a = F.scaled_dot_product_attention(q, L["kc"], L["vc"], attn_mask=mask, enable_gqa=True)
            x, hn = G["add_rms"](x, L["o"](a.reshape(B, H * hd)), L["n2"])
            d = L["down"](G["silu_mul"](L["gateup"](hn)))
        x, hn = G["add_rms"](x, d, self.norm)
        logits = F.linear(hn, self.lm_head)
        self.tok.copy_(logits.argmax(-1))
        self.pos.add_(1)


# The non-linear glue of a decoder layer, the same for every variant. "eager": plain PyTorch ops (about
# 30 small kernels a layer); "compiled" (--glue compiled): the same functions through torch.compile,
# fused into a few kernels, so that the step time shows the linears rather than the glue.
def _add_rms(x, d, w):
    x = x + d
    xf = x.float()
    return x, (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w


def _rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _rope_qkv(qkv, cos, sin, H: int, KV: int, hd: int):
    B = qkv.shape[0]
    q, k, v = qkv.split([H * hd, KV * hd, KV * hd], -1)
    q = _rope(q.view(B, H, hd), cos, sin).view(B, H, 1, hd)
    k = _rope(k.view(B, KV, hd), cos, sin).view(B, KV, 1, hd)
    return q, k, v.reshape(B, KV, 1, hd)


def _silu_mul(gu):
    g, u = gu.chunk(2, -1)
    return F.silu(g) * u


GLUE = {"add_rms": _add_rms, "rope_qkv": _rope_qkv, "silu_mul": _silu_mul}


def set_glue(mode: str) -> None:
    fns = {"add_rms": _add_rms, "rope_qkv": _rope_qkv, "silu_mul": _silu_mul}
    if mode == "compiled":
        fns = {k: torch.compile(f, dynamic=False, fullgraph=True) for k, f in fns.items()}
    GLUE.update(fns)


def run(kind, batch, layers, steps, start, dev, bw):
    torch.cuda.empty_cache()
    m = Decoder(kind, batch, start + steps + 64, layers, dev)
    m.pos.fill_(start)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            m.step()
    torch.cuda.current_stream().wait_stream(s)
    m.pos.fill_(start)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        m.step()
    m.pos.fill_(start)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    m.pos.fill_(start)
    t0 = time.perf_counter()
    for _ in range(steps):
        g.replay()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    r = {"kind": kind, "batch": batch, "ms_per_step": dt * 1e3, "tokens_per_s": batch / dt,
         "weight_GB": m.bytes / 1e9, "bound_tokens_per_s_b1": bw / m.bytes, "frac_of_bound": m.bytes / dt / bw}
    del m, g
    torch.cuda.empty_cache()
    return r


def copy_bandwidth(dev) -> float:
    """Device-to-device copy bandwidth in bytes/s (1 GiB read + 1 GiB written, median of runs)."""
    from triton.testing import do_bench

    a = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return 2 * a.numel() / (do_bench(lambda: b.copy_(a), rep=100, return_mode="median") * 1e-3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--context", type=int, default=256, help="KV positions already filled when timing starts")
    ap.add_argument("--kinds", default="bf16,w4a16,w8a8-fp8")
    ap.add_argument("--json", default=None)
    ap.add_argument("--glue", default="eager", help="eager | compiled | eager,compiled: the layers' non-linear "
                    "ops as plain PyTorch or fused by torch.compile (the same for every variant)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench decode: needs a CUDA GPU")
        return 2
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bw = copy_bandwidth(dev)
    rows = []
    for glue in args.glue.split(","):
        set_glue(glue)
        for kind in args.kinds.split(","):
            for B in [int(v) for v in args.batch.split(",")]:
                r = run(kind, B, args.layers, args.steps, args.context, dev, bw)
                r["glue"] = glue
                rows.append(r)
                print(f"{glue:8s} {kind:10s} batch {B:3d}: {r['ms_per_step']:7.2f} ms/step {r['tokens_per_s']:8.1f} "
                      f"tok/s (weights {r['weight_GB']:.2f} GB, {100 * r['frac_of_bound']:.0f}% of copy-bandwidth "
                      "bound)", flush=True)
    info = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "copy_bw_GBs": bw / 1e9, "layers": args.layers, "steps": args.steps,
            "context": args.context}
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
