"""KV-cache quantization quality on a real model: perplexity with the quantized cache in the
attention path, and KV bytes per token. Writes the table of docs/quality/kv.md.

    python bench/quality_kv.py                      # smollm2-135m, 20 windows x 512, chunk 64
    python bench/quality_kv.py --windows 40 --kl --json /tmp/kv.json --md /tmp/kv.md

Every row uses the same text and windows (evaluation split, disjoint windows of --seq-len tokens)
fed in chunks of --chunk tokens through one cache per window, so each chunk's attention reads the
earlier tokens back from the cache. Weights stay float. Allocations are computed on the
calibration split (even-numbered articles; evaluation uses the odd ones).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch

FIXED = ["k8v8", "k4v4", "k3v3", "k2v2", "k4v2", "k2v4", "k3v2", "k2v3"]
BUDGETS = [3.0, 2.5]


def bits_summary(alloc: dict | None, n_layers: int) -> tuple[str, str]:
    if alloc is None:
        return "16", "16"
    from quantkit.kv.spec import layer_bits

    kb, vb = zip(*layer_bits(alloc, n_layers))
    f = lambda xs: (str(xs[0]) if len(set(xs)) == 1  # noqa: E731
                    else f"{sum(xs) / len(xs):.2f} ({min(xs)}-{max(xs)})")
    return f(kb), f(vb)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--residual", type=int, default=32)
    p.add_argument("--key-group", type=int, default=32)
    p.add_argument("--value-group", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--kl", action="store_true", help="also the end-to-end KL sensitivity allocation (slow on CPU)")
    p.add_argument("--kl-samples", type=int, default=2)
    p.add_argument("--fixed", default=",".join(FIXED), help="fixed rows, comma separated (e.g. k4v2,k2v4)")
    p.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))
    p.add_argument("--tasks", default="", help="zero-shot tasks with the quantized cache, e.g. lambada,hellaswag")
    p.add_argument("--task-limit", type=int, default=500)
    p.add_argument("--task-rows", default="float,k4v4,k2v2,k4v2,k2v4,adaptive@2.5,norm@2.5",
                   help="which rows get zero-shot scores (float, kXvY, <policy>@<budget>)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from quantkit.api import QuantizedModel, default_device
    from quantkit.data import calibration_batch
    from quantkit.kv import allocate, evaluate_with_kv, measure, measure_kl, normalize_allocation
    from quantkit.kv.spec import _kv_shape
    from quantkit.models import load_float_model

    device = a.device or default_device()
    t_start = time.time()
    lm = load_float_model(a.model)
    qm = QuantizedModel(lm.model, lm.tokenizer, lm.source, lm.path, {"float": True})
    qm.model.to(device).eval()
    print(f"model loaded on {device} (t={time.time() - t_start:.0f}s)", flush=True)
    n_layers, kv_heads, head_dim = _kv_shape(qm.model.config)
    geo = {"key_group_size": a.key_group, "value_group_size": a.value_group, "residual": a.residual}
    suffix = f"-r{a.residual}-gk{a.key_group}-gv{a.value_group}"
    from quantkit.data import tokenize_split

    split = tokenize_split(qm.tokenizer, "enwiki", "evaluation")
    print(f"evaluation split tokenized: {split.ids.numel()} tokens (t={time.time() - t_start:.0f}s)", flush=True)
    ev = dict(split=split, seq_len=a.seq_len, max_windows=a.windows, chunk=a.chunk, batch_size=a.batch_size,
              progress=False)

    rows: list[dict] = []

    def run(name: str, spec, note: str = "") -> None:
        r = evaluate_with_kv(qm, None, spec, **ev)
        kb, vb = bits_summary(r["allocation"], n_layers)
        rows.append({"row": name, "key_bits": kb, "value_bits": vb, "avg_bits": r["avg_bits"], "ppl": r["ppl"],
                     "kv_bytes_per_token": r["kv_bytes_per_token"],
                     "kv_bytes_per_token_long": r["kv_bytes_per_token_long"],
                     "float16_bytes_per_token": r["float16_bytes_per_token"], "note": note,
                     "tokens_scored": r["tokens_scored"], "windows": r["windows"], "seconds": r["seconds"],
                     "text_sha256": r["text_sha256"], "allocation": r["allocation"]})
        print(f"{name:28s} K {kb:>14s} V {vb:>14s} bits {r['avg_bits']:.3f} ppl {r['ppl']:.4f} "
              f"B/tok {r['kv_bytes_per_token']:.1f} ({r['seconds']:.0f}s, t={time.time() - t_start:.0f}s)", flush=True)
        if a.json:  # partial results survive an interrupted run
            with open(a.json + ".partial", "w") as f:
                json.dump(rows, f, indent=1, default=str)

    run("float cache", None, "transformers DynamicCache, same chunked path")
    for s in [x for x in a.fixed.split(",") if x]:
        if "-r" in s or "-g" in s:  # its own geometry, e.g. k2v2-r128
            g = normalize_allocation(s)
            run(f"uniform {s.split('-')[0].upper()} (R={g['residual']}, G={g['key_group_size']}, "
                f"g={g['value_group_size']})", g)
        else:
            run(f"uniform {s.upper()}", normalize_allocation(s + suffix))

    # calibration statistics (one probe pass), then the allocations
    ids = calibration_batch(qm.tokenizer, a.calib_samples, a.calib_seq_len, 0, "enwiki", qm.bos_token_id)
    t = time.time()
    stats = measure(qm.model, ids, choices=(1, 2, 3, 4, 5, 6, 8), spectral=True, **geo)
    t_probe = time.time() - t
    print(f"probe pass {t_probe:.0f}s", flush=True)
    kl_stats, t_kl = None, None
    if a.kl:
        t = time.time()
        kl_stats = measure_kl(qm.model, ids[:a.kl_samples], choices=(2, 3, 4, 5), chunk=a.chunk, progress=True,
                              **geo)
        t_kl = time.time() - t
        print(f"kl sensitivity {t_kl:.0f}s", flush=True)
    allocations = {}
    for B in [float(x) for x in a.budgets.split(",") if x]:
        for pol, kw, label in [("norm", {"norm": "frobenius"}, "norm rule (Frobenius)"),
                               ("norm", {"norm": "spectral"}, "norm rule (spectral)"),
                               ("adaptive", {"metric": "attn"}, "adaptive (attn-output error)")] + \
                              ([("sensitivity", {"metric": "kl"}, "sensitivity (KL, real cache)")] if a.kl else []):
            st = kl_stats if kw.get("metric") == "kl" else stats
            alloc = allocate(qm.model, B, pol, stats=st, **kw, **geo)
            allocations[f"{label} @ {B:g}"] = alloc
            run(f"{label} @ {B:g}", alloc)

    kn, vn = stats["key_fro"], stats["value_fro"]
    ks, vs = stats["key_spectral"], stats["value_spectral"]
    out = {
        "model": a.model, "device": str(device),
        "device_name": torch.cuda.get_device_name() if str(device).startswith("cuda") else platform.processor()
        or platform.machine(),
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "settings": {"windows": a.windows, "seq_len": a.seq_len, "chunk": a.chunk, **geo,
                     "calibration": f"{a.calib_samples} x {a.calib_seq_len} tokens of the calibration split",
                     "kl_samples": a.kl_samples if a.kl else None, "fp_bytes": 2, "scale_dtype": "float16"},
        "kv_shape": {"layers": n_layers, "kv_heads": kv_heads, "head_dim": head_dim},
        "norms": {"key_fro": kn, "value_fro": vn, "key_spectral": ks, "value_spectral": vs},
        "probe_seconds": t_probe, "kl_seconds": t_kl, "total_seconds": time.time() - t_start,
        "rows": rows, "stats": {k: v for k, v in stats.items() if k.endswith("attn_err")},
        "kl_stats": kl_stats, "zero_shot": {},
    }

    def dump() -> None:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1, default=str)
        md = to_markdown(out)
        print(md, flush=True)
        if a.md:
            with open(a.md, "w") as f:
                f.write(md)

    dump()
    zs = out["zero_shot"]
    if a.tasks:
        from kv_zeroshot import zero_shot_with_kv  # bench/kv_zeroshot.py (bench/ is on sys.path)

        for key in [x for x in a.task_rows.split(",") if x]:
            if key == "float":
                spec = None
            elif "@" in key:
                pol, B = key.split("@")
                lab = {"adaptive": "adaptive (attn-output error)", "norm": "norm rule (Frobenius)",
                       "spectral": "norm rule (spectral)", "kl": "sensitivity (KL, real cache)"}[pol]
                spec = allocations.get(f"{lab} @ {float(B):g}")
                if spec is None:
                    continue
            else:
                spec = normalize_allocation(key + suffix)
            t = time.time()
            zs[key] = zero_shot_with_kv(qm, None, spec, tasks=a.tasks.split(","), limit=a.task_limit, chunk=a.chunk)
            print(f"zero-shot {key}: " + ", ".join(f"{n} acc {m['acc']:.4f}" for n, m in zs[key].items()) +
                  f" ({time.time() - t:.0f}s)", flush=True)

    if zs:
        dump()
    return 0


def to_markdown(o: dict) -> str:
    s = o["settings"]
    f16 = o["rows"][0]["float16_bytes_per_token"]
    base = o["rows"][0]["ppl"]
    lines = [
        f"Model {o['model']} (weights float32), device {o['device']} ({o['device_name']}), {o['date']}, "
        f"torch {o['torch']}, transformers {o['transformers']}.",
        f"Evaluation split of enwiki, {o['rows'][0]['windows']} disjoint windows of {s['seq_len']} tokens "
        f"({o['rows'][0]['tokens_scored']} tokens scored, text sha256 {o['rows'][0]['text_sha256']}), fed in chunks of "
        f"{s['chunk']} tokens through one cache per window. Residual window R = {s['residual']} tokens, key groups "
        f"G = {s['key_group_size']} tokens (per channel), value groups g = {s['value_group_size']} channels "
        f"(per token), "
        f"float16 scales and minima. Allocations from {s['calibration']}.",
        "",
        "| cache | key bits | value bits | mean code bits | ppl | Δ ppl | KV bytes/token @ "
        f"{s['seq_len']} | KV bytes/token, long context | vs fp16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in o["rows"]:
        lines.append(f"| {r['row']} | {r['key_bits']} | {r['value_bits']} | {r['avg_bits']:.2f} | {r['ppl']:.3f} | "
                     f"{r['ppl'] - base:+.3f} | {r['kv_bytes_per_token']:.0f} | {r['kv_bytes_per_token_long']:.0f} | "
                     f"{r['kv_bytes_per_token_long'] / f16:.3f} |")
    zs = o.get("zero_shot") or {}
    if zs:
        tasks = list(next(iter(zs.values())))
        lines += ["", "Zero-shot with the cache in the path (context prefilled in chunks through the cache, the answer "
                  "choices read it back):", "",
                  "| cache | " + " | ".join(f"{t} acc (n) | {t}: context tokens read quantized" for t in tasks) + " |",
                  "|---|" + "---|---|" * len(tasks)]
        for key, res in zs.items():
            cells = []
            for t in tasks:
                m = res[t]
                cells += [f"{m['acc']:.4f} ± {m['acc_stderr']:.4f} ({m['n']})",
                          f"{100 * m['quantized_context_share']:.0f}% of {m['mean_context_tokens']:.0f} mean"]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
