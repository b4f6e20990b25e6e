"""Wall time and peak GPU memory of GPTQ W4A16 on an 8B-shaped Llama (random bf16 weights).

Usage (on a GPU machine):  python bench/gptq_8b.py [--layers 32] [--samples 128] [--seq-len 2048]
On N GPUs:  torchrun --nproc-per-node N bench/gptq_8b.py ...   (quantkit.distributed; rank 0 prints)
--save-codes FILE writes every quantized layer's packed tensors (rank 0) for bench/compare_codes.py.
Random weights are fine for time and memory: the work (calibration forwards, XᵀX, Cholesky, the
column solves, propagation) does not depend on the values. Calibration: random token ids of the
real count (128 x 2048 = 262k tokens, as llm-compressor's anchor run in shared/ANCHORS.md).
Prints one table row; --tiny runs a small config on CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build_model(layers: int, tiny: bool, device_init: str):
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=448, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2)
    else:  # Llama-3-8B shapes
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                          rope_theta=500000.0)
    dtype = torch.float32 if tiny else torch.bfloat16
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with init_empty_weights():
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to_empty(device="cpu")
    g = torch.Generator(device=device_init).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:  # fill on the GPU (fast), keep on CPU like a loaded checkpoint
                t = torch.empty(p.shape, dtype=p.dtype, device=device_init)
                t.normal_(0, 0.02, generator=g)
                p.copy_(t.cpu())
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # real inv_freq buffers
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--recipe", default="w4a16-gptq-sym")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--save-codes", default=None, metavar="FILE")
    ap.add_argument("--accumulate", choices=["float32", "float64"], default=None,
                    help="override the recipe's calibration.accumulate")
    args = ap.parse_args()
    import os

    import quantkit
    from quantkit import distributed

    dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dist, dev_r = distributed.setup(dev)  # under torchrun: join the group, cuda:LOCAL_RANK
    rank = dist.rank if dist is not None else 0
    t = time.time()
    model = build_model(args.layers, args.tiny, str(dev_r) if dev == "cuda" else dev)
    build_s = time.time() - t
    nparams = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t = time.time()
    recipe = quantkit.load_recipe(args.recipe)
    if args.accumulate:
        recipe = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(
            update={"accumulate": args.accumulate})})
    qm = quantkit.quantize(model, recipe, calibration=ids, device=dev, batch_size=args.batch_size,
                           progress=False)
    if dev == "cuda":
        torch.cuda.synchronize()
    secs = time.time() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    peaks = dist.gather_objects(round(peak, 2), "peak memory") if dist is not None else [round(peak, 2)]
    if rank != 0:
        return
    blocks = qm.report.blocks
    world = qm.report.world_size
    row = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "params_B": nparams / 1e9,
           "layers": args.layers, "calib_tokens": ids.numel(),
           "recipe": args.recipe + (f" ({args.accumulate} sums)" if args.accumulate else ""), "seconds": round(secs, 1),
           "peak_gpu_GiB": max(peaks), "peak_gpu_GiB_per_rank": peaks, "build_s": round(build_s, 1),
           "world_size": world, "launcher": "torchrun" if dist is not None else "none",
           "mean_layer_rel_err": sum(b["mean_layer_rel_err"] for b in blocks) / len(blocks),
           "phases_s": {k: round(sum(b.get(k, 0.0) for b in blocks), 2) for k in ("calibrate_s", "solve_s",
                                                                               "propagate_s", "finish_s", "reduce_s")},
           "capture_s": round(qm.report.capture_seconds, 2), "pipeline_s": round(qm.report.seconds, 2),
           "torch": torch.__version__}
    print("| device | ranks | launcher | params | calib tokens | recipe | wall s | peak GPU GiB per rank | "
          "capture / calibrate (of it all-reduce) / solve / propagate / finish s (pipeline total) | mean layer err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ph = row["phases_s"]
    print(f"| {row['device']} | {world} | {row['launcher']} | {row['params_B']:.2f} B | {row['calib_tokens']} | "
          f"{row['recipe']} | {row['seconds']} | {', '.join(map(str, peaks))} | {row['capture_s']} / "
          f"{ph['calibrate_s']} ({ph['reduce_s']}) / {ph['solve_s']} / {ph['propagate_s']} / {ph['finish_s']} "
          f"({row['pipeline_s']}) | {row['mean_layer_rel_err']:.4e} |", flush=True)
    if args.save_codes:
        from safetensors.torch import save_file

        tensors = {f"{n}.{k}": v.detach().cpu().contiguous() for n, m in qm.quantized_layers().items()
                   for k, v in m.packed.items()}
        save_file(tensors, args.save_codes)
        gib = os.path.getsize(args.save_codes) / 2**30
        print(f"saved {len(tensors)} packed tensors to {args.save_codes} ({gib:.2f} GiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
