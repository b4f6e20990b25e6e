"""Wall time and peak GPU memory of block-output reconstruction (recon) at W4 on 8B-shaped Llama blocks.

Random bf16 weights of Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 heads / 8 KV heads), a few
decoder blocks (``--layers``, default 3, to stay under 8 minutes), 128 x 2048 calibration tokens,
recipe w4a16-recon's settings (GPTQ then 200 signed-gradient steps of 8 sequences per block) unless
``--iters`` / ``--recon-batch`` say otherwise. Prints one table row per setting: the per-block time of
each phase (GPTQ solve, recon), the extrapolation to 32 blocks (per-block time x 32 + capture), and the
peak GPU memory; writes it as JSON under $OUT (or --out). Random weights are fine for time and memory
(the work does not depend on the values); the error figures are not quality figures.

    python -P bench/recon_8b.py                 # GPU (H200: about 4 minutes expected, not yet measured)
    python -P bench/recon_8b.py --smoke         # tiny shapes on CPU, a few steps (tested here)

(``-P``: the bench folder's scripts must not shadow the PyPI ``kernels`` package transformers imports.)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _build_model(*a):
    """bench/gptq_8b.py's model builder, loaded by path (the bench folder is not put on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_gptq_8b", os.path.join(os.path.dirname(os.path.abspath(__file__)), "gptq_8b.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_model(*a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--recon-batch", type=int, default=8)
    ap.add_argument("--quantizer", choices=["gptq", "rtn"], default="gptq")
    ap.add_argument("--target", choices=["block", "model"], default="block", help="recon's target option")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, 2 blocks, 3 steps")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    import quantkit

    if args.smoke:
        args.layers, args.samples, args.seq_len, args.iters, args.recon_batch = 2, 8, 64, 3, 4
    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    model = _build_model(args.layers, args.smoke, dev)
    ids = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    quant = ({"type": "gptq", "damp": 0.01, "act_order": True, "static_groups": True, "block_size": 128}
             if args.quantizer == "gptq" else "rtn")
    recipe = {"name": "w4a16-recon-bench", "quantizer": quant,
              "format": {"type": "int", "bits": 4, "group_size": 128, "sym": False},
              "block_plugins": [{"type": "recon", "iters": args.iters, "batch_size": args.recon_batch,
                                 "target": args.target}],
              "ignore": ["lm_head"],
              "calibration": {"samples": args.samples, "seq_len": args.seq_len, "seed": 0, "corpus": "enwiki"}}
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t = time.time()
    qm = quantkit.quantize(model, recipe, calibration=ids, device=dev, batch_size=8, progress=False)
    if dev == "cuda":
        torch.cuda.synchronize()
    secs = time.time() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    b = qm.report.blocks
    per = {k: sum(x.get(k, 0.0) for x in b) / len(b) for k in ("calibrate_s", "solve_s", "propagate_s", "recon_s")}
    per_block = (secs - qm.report.capture_seconds) / len(b)
    row = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "blocks": len(b),
           "calib_tokens": ids.numel(), "iters": args.iters, "recon_batch": args.recon_batch,
           "quantizer": args.quantizer, "target": args.target, "wall_s": round(secs, 1), "capture_s": round(qm.report.capture_seconds, 1),
           "per_block_s": round(per_block, 2), "per_block_phases_s": {k: round(v, 2) for k, v in per.items()},
           "extrapolated_32_blocks_s": round(per_block * 32 + qm.report.capture_seconds, 1),
           "peak_gpu_GiB": round(peak, 2),
           "recon_err": [(round(x["recon_err_before"], 6), round(x["recon_err_after"], 6)) for x in b],
           "recon_steps": [x["recon_steps"] for x in b], "torch": torch.__version__}
    print("| device | blocks | calib tokens | quantizer + recon steps x seqs | wall s | per block s (solve / recon) "
          "| 32 blocks, extrapolated s | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {row['device']} | {row['blocks']} | {row['calib_tokens']} | {args.quantizer} + {args.iters} x "
          f"{args.recon_batch} | {row['wall_s']} | {row['per_block_s']} ({per['solve_s']:.1f} / {per['recon_s']:.1f}) "
          f"| {row['extrapolated_32_blocks_s']} | {row['peak_gpu_GiB']} |")
    print("recon block error before -> after:", row["recon_err"])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "recon_8b.json")
    with open(path + ".tmp", "w") as f:
        json.dump(row, f, indent=1)
    os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
