"""Eager host cost per call at M = 1: where it goes, and the ctypes launch (kernels/src/_cuda_launch.py)
against Triton's own launcher, on the lent GPU.

    python bench/eager_launch.py [--shapes 8B.qkv,70B.o] [--kinds int4,any4] [--n 2000] [--out DIR]

Per shape and kind, host µs to issue one call (mean of n back-to-back eager calls, after warm-up; the
GPU queue does not fill, so this is the Python + launch cost), in one process: bf16 ``F.linear``; one
``torch.empty`` of the output alone; the layer kernel through Triton's compiled launcher (the path before
the ctypes launch; ``QUANTKIT_KERNEL_CTYPES=0``); the same kernel through the ctypes launch; and the whole
``QuantLinear`` forward both ways. Kinds: int4, any4 (g128), fp8 (W8A8 dynamic: at M <= 4 the activations are
quantized inside the GEMV, one launch; two before 2026-12-08), fp8w
(W8A16). Each kernel's output is compared with the other path's and with the
dequantized weight's product (relative error). Prints a Markdown table; ``--out`` also writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def main(argv=None) -> int:
    import bench.kernel_bench as kb
    from quantkit.kernels import _cuda_launch, _launch, fp8
    from quantkit.nn import QuantLinear

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="8B.qkv,8B.o,8B.down,70B.o")
    ap.add_argument("--kinds", default="int4,any4,fp8,fp8w")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rs-small", action="store_true",
                    help="also the host µs of an 8-row register-A (rs) tile at M = 1 (int/lut kinds; sm_90)")
    a = ap.parse_args(argv)

    def host_us(f, n: int) -> float:  # kernel_bench's measure: host µs per call of n back-to-back calls
        return kb.host_overhead_us(f, n)[0]

    dev = torch.device("cuda")
    used = []  # whether each plan made took the ctypes launch (every such plan passes through checked())
    orig = _launch.checked

    def spy(*args, **kw):
        r = orig(*args, **kw)
        used.append(r is not None)
        return r

    _launch.checked = fp8.checked = spy
    rows = []
    for shape in a.shapes.split(","):
        k, n = kb.SHAPES[shape]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        W = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        row = {"shape": shape, "N": n, "K": k, "bf16_us": host_us(lambda: torch.nn.functional.linear(x, W), a.n),
               "empty_us": host_us(lambda: x.new_empty((1, n)), a.n),
               "stream_us": host_us(lambda: torch._C._cuda_getCurrentRawStream(0), a.n)}
        for kind in a.kinds.split(","):
            spec = kb.KINDS[kind]
            packed = kb.make_packed(spec, n, k, dev)
            r = {}
            outs = {}
            for mode in ("triton", "ctypes"):
                _cuda_launch.ENABLED = mode == "ctypes"
                used.clear()
                _, kern = kb.build_kernel(spec, packed, n, k, dev)
                outs[mode] = kern(x).float()
                r[f"{mode}_used_ctypes"] = any(used)
                r[f"{mode}_kernel_us"] = host_us(lambda: kern(x), a.n)
                layer = QuantLinear(k, n, {"format": kb.fmt_spec(spec)}, packed)
                layer(x)
                r[f"{mode}_layer_us"] = host_us(lambda: layer(x), a.n)
            _cuda_launch.ENABLED = True
            if a.rs_small and spec["type"] in ("int", "lut"):  # the small-M register-A tile (sweep set rss)
                _, kern = kb.build_kernel(spec, packed, n, k, dev)
                tiles = -(-n // 128)
                cfg = {"path": "wg", "rs": True, "BM": 8, "BN": 128, "BK": 128, "warps": 8, "stages": 4,
                       "split": max(1, min(k // 256, -(-132 // tiles)))}
                kern.plans.clear()
                plan = kern.plan(1, torch.bfloat16, cfg)
                r["rs_small_is_rs"] = getattr(plan, "__name__", "") == "run_rs"
                y = kern(x).float()
                r["rs_small_kernel_us"] = host_us(lambda: kern(x), a.n)
                r["rs_small_rel_err_vs_triton"] = ((y - outs["triton"]).norm() / outs["triton"].norm()).item()
            ref = kb.build_kernel(spec, packed, n, k, dev)[1].fallback(x).float()
            r["rel_err_ctypes_vs_triton"] = ((outs["ctypes"] - outs["triton"]).norm() / outs["triton"].norm()).item()
            r["rel_err_ctypes_vs_ref"] = ((outs["ctypes"] - ref).norm() / ref.norm()).item()
            row[kind] = r
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "n": a.n}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    kinds = a.kinds.split(",")
    L = [f"Eager host µs per call at M = 1 — {info['device']}, {info['date']}, torch {info['torch']}, "
         f"triton {info.get('triton')}, mean of {a.n} back-to-back calls", "",
         "| shape | bf16 F.linear | torch.empty | " + " | ".join(
             f"{k} kernel: Triton launcher / ctypes | {k} QuantLinear: Triton / ctypes | {k} ctypes used, "
             "rel err vs Triton / vs ref" for k in kinds) + " |",
         "|---|---|---|" + "---|---|---|" * len(kinds)]
    for row in rows:
        cells = [row["shape"], f"{row['bf16_us']:.1f}", f"{row['empty_us']:.1f}"]
        for k in kinds:
            r = row[k]
            cells += [f"{r['triton_kernel_us']:.1f} / **{r['ctypes_kernel_us']:.1f}**",
                      f"{r['triton_layer_us']:.1f} / **{r['ctypes_layer_us']:.1f}**",
                      f"{r['ctypes_used_ctypes']} ({r['triton_used_ctypes']}), "
                      f"{r['rel_err_ctypes_vs_triton']:.1e} / {r['rel_err_ctypes_vs_ref']:.1e}"]
        L.append("| " + " | ".join(cells) + " |")
    if a.rs_small:
        L += ["", "rs tile (BM 8, BN 128, BK 128) at M = 1, host µs per kernel call (is rs; rel err vs the GEMV): " + "; ".join(
            f"{row['shape']} {k} {row[k]['rs_small_kernel_us']:.1f} ({row[k]['rs_small_is_rs']}; "
            f"{row[k]['rs_small_rel_err_vs_triton']:.1e})" for row in rows for k in kinds
            if "rs_small_kernel_us" in row[k])]
    print("\n".join(L))
    if a.out:
        p = Path(a.out)
        p.mkdir(parents=True, exist_ok=True)
        (p / "eager_launch.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
        (p / "eager_launch.md").write_text("\n".join(L) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
