"""Low-bit quality table: float, RTN, GPTQ, GPTQ+QuIP, GPTQ+QuIP+norm-tweak at 4, 3 and 2 bits.

Every row: the real default model (smollm2-135m), INT{b} asymmetric, groups of 128 input columns
(576 = 4·128 + 64: the last group is shorter), lm_head in float, the same 32 x 512 calibration
windows (even-numbered enwiki articles, seed 0) and ``quantkit.evaluate(qm, seq_len=512,
max_windows=40)`` on the odd-numbered articles. Results are kept in a JSON file row by row
(a killed run resumes: finished rows are not redone unless ``--force``), and the markdown table
is rewritten after every row (between the table markers of
``docs/quality/lowbit.md``; the prose around them is kept).

    nice python bench/quality_lowbit.py                       # all rows, CPU
    nice python bench/quality_lowbit.py --rows 3:gptq,3:gptq+quip --device cuda
    python bench/quality_lowbit.py --extra 'mine={"quantizer": "gptq", ...}' --rows mine

Run it in the background on a shared CPU: ``nohup nice -n 10 python bench/quality_lowbit.py &``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_JSON = os.path.join(ROOT, "docs", "quality", "lowbit.json")
DEFAULT_MD = os.path.join(ROOT, "docs", "quality", "lowbit.md")
BEGIN, END = "<!-- table:begin (bench/quality_lowbit.py) -->", "<!-- table:end -->"

GPTQ = {"type": "gptq", "damp": 0.01, "act_order": True, "static_groups": True, "block_size": 128}
QUIP = {"type": "quip", "seed": 0}  # both sides: W' = U W Vᵀ
QUIP_IN = {"type": "quip", "seed": 0, "rotate_out": False}  # input side only: W' = W Vᵀ
NORM_TWEAK = {"type": "norm_tweak", "lrs": [1e-3, 3e-3], "epochs": 2, "micro_batch": 1, "loss": "mse"}
NORM_TWEAK_DIST = {**NORM_TWEAK, "loss": "dist"}  # the paper's channel-wise distribution loss
# block-output reconstruction (transforms/recon.py); iterations set by --recon-iters (default below)
RECON = {"type": "recon", "iters": 100, "batch_size": 4}
METHODS = {
    "rtn": lambda b: {"quantizer": "rtn", "format": _fmt(b)},
    "gptq": lambda b: {"quantizer": GPTQ, "format": _fmt(b)},
    "gptq+nt": lambda b: {"quantizer": GPTQ, "format": _fmt(b), "block_plugins": [NORM_TWEAK]},
    "rtn+quip": lambda b: {"quantizer": "rtn", "format": _fmt(b), "transforms": [QUIP]},
    "gptq+quip": lambda b: {"quantizer": GPTQ, "format": _fmt(b), "transforms": [QUIP]},
    "gptq+quip+nt": lambda b: {"quantizer": GPTQ, "format": _fmt(b), "transforms": [QUIP],
                               "block_plugins": [NORM_TWEAK]},
    "gptq+quipin": lambda b: {"quantizer": GPTQ, "format": _fmt(b), "transforms": [QUIP_IN]},
    "gptq+quipin+nt": lambda b: {"quantizer": GPTQ, "format": _fmt(b), "transforms": [QUIP_IN],
                                 "block_plugins": [NORM_TWEAK]},
    "gptq+quip+nt-dist": lambda b: {"quantizer": GPTQ, "format": _fmt(b), "transforms": [QUIP],
                                    "block_plugins": [NORM_TWEAK_DIST]},
    "rtn+recon": lambda b: {"quantizer": "rtn", "format": _fmt(b), "block_plugins": [RECON]},
    "gptq+recon": lambda b: {"quantizer": GPTQ, "format": _fmt(b), "block_plugins": [RECON]},
    "gptq+quipin+recon": lambda b: {"quantizer": GPTQ, "format": _fmt(b), "transforms": [QUIP_IN],
                                    "block_plugins": [RECON]},
}
LABELS = {"float": "float (fp32)", "rtn": "RTN", "gptq": "GPTQ", "gptq+nt": "GPTQ + norm-tweak",
          "rtn+quip": "RTN + QuIP", "gptq+quip": "GPTQ + QuIP", "gptq+quip+nt": "GPTQ + QuIP + norm-tweak",
          "gptq+quipin": "GPTQ + QuIP (input side only)",
          "gptq+quipin+nt": "GPTQ + QuIP (input side only) + norm-tweak",
          "gptq+quip+nt-dist": "GPTQ + QuIP + norm-tweak (paper's dist loss)",
          "rtn+recon": "RTN + recon", "gptq+recon": "GPTQ + recon",
          "gptq+quipin+recon": "GPTQ + QuIP (input side only) + recon"}
DEFAULT_ROWS = ["float"] + [f"{b}:{m}" for b in (4, 3, 2) for m in ("rtn", "gptq", "gptq+quip", "gptq+quip+nt")]

# /work/shared/ANCHORS.md: llm-compressor 0.14 GPTQ int3 sym g128 on SmolLM2-135M, a different harness
# (150 windows x 512, 128 x 512 calibration): float 24.06, GPTQ int3 106.29.
ANCHOR_INT3 = {"float": 24.06, "ppl": 106.29, "what": "llm-compressor 0.14 GPTQ int3 sym, block [1,128], "
                                                       "128x512 calibration, 150 windows x 512 (ANCHORS.md)"}


def _fmt(bits: int) -> dict:
    return {"type": "int", "bits": bits, "group_size": 128, "sym": False}


def recipe_for(row: str, extra: dict[str, dict]) -> dict | None:
    if row == "float":
        return None
    if row in extra:
        return extra[row]
    bits, _, method = row.partition(":")
    if method not in METHODS or not bits.isdigit():
        raise SystemExit(f"unknown row {row!r}: rows are 'float', '<bits>:<method>' with method in "
                         f"{', '.join(METHODS)}, or a name given with --extra")
    r = METHODS[method](int(bits))
    r["name"] = f"w{bits}-{method.replace('+', '-')}"
    return r


def run_row(row: str, recipe: dict | None, args) -> dict:
    import quantkit
    from quantkit.data import calibration_batch
    from quantkit.models import load_float_model

    t0 = time.time()
    lm = load_float_model(args.model)
    out: dict = {"row": row, "recipe": recipe}
    if recipe is None:
        from quantkit.api import QuantizedModel

        qm = QuantizedModel(lm.model, lm.tokenizer, lm.source, lm.path, {"float": True})
        out["bits_per_weight"] = 32.0
    else:
        recipe = {**recipe, "calibration": {"samples": args.samples, "seq_len": args.seq_len, "seed": 0,
                                            "corpus": "enwiki", "batch_size": args.batch_size}}
        ids = calibration_batch(lm.tokenizer, args.samples, args.seq_len, 0, "enwiki", lm.bos_token_id)
        tq = time.time()
        qm = quantkit.quantize(lm, recipe, calibration=ids, device=args.device, progress=args.progress)
        out["quantize_seconds"] = round(time.time() - tq, 1)
        out["bits_per_weight"] = round(qm.bits_per_weight(), 4)
        blocks = qm.report.blocks
        out["block_rel_err_last"] = blocks[-1].get("block_rel_err") if blocks else None
        out["block_rel_err_mean"] = sum(b.get("block_rel_err", 0) for b in blocks) / max(len(blocks), 1)
        nt = [b for b in blocks if "norm_tweak_err_before" in b]
        if nt:
            out["norm_tweak"] = {
                "lrs_chosen": [b["norm_tweak_lr"] for b in nt],
                "blocks_tweaked": sum(1 for b in nt if b["norm_tweak_lr"] > 0),
                "mean_err_before": sum(b["norm_tweak_err_before"] for b in nt) / len(nt),
                "mean_err_after": sum(b["norm_tweak_err_after"] for b in nt) / len(nt),
            }
    te = time.time()
    ev = quantkit.evaluate(qm, seq_len=args.seq_len, max_windows=args.max_windows, device=args.device,
                           progress=args.progress)
    out["eval_seconds"] = round(time.time() - te, 1)
    out["ppl"] = ev["ppl"]
    out["eval"] = {k: ev[k] for k in ("tokens_scored", "windows", "seq_len", "bos", "text_sha256", "split")
                   if k in ev}
    out["seconds"] = round(time.time() - t0, 1)
    out["device"] = _device_name(args.device)
    out["date"] = datetime.date.today().isoformat()
    return out


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _ppl(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"


def _gap(x: float) -> str:
    return f"{x:+.2f}" if abs(x) < 1e4 else f"{x:+.3g}"


def write_markdown(results: dict, path: str, args) -> None:
    fl = results.get("float", {}).get("ppl")
    devices = sorted({r.get("device", "") for r in results.values()})
    lines = [
        f"Model smollm2-135m; INT asymmetric, group size 128 (576-column inputs: 4 groups of 128 + one of 64), "
        f"lm_head float; calibration {args.samples} x {args.seq_len} tokens (enwiki even articles, seed 0); "
        f"perplexity: `quantkit.evaluate(qm, seq_len={args.seq_len}, max_windows={args.max_windows})` "
        f"(enwiki odd articles), fp32. Device: {', '.join(devices)}.",
        "",
        "| bits | method | ppl | gap to float | gap / GPTQ gap | bits/weight | quantize s |",
        "|---|---|---|---|---|---|---|",
    ]
    if fl is not None:
        lines.append(f"| 32 | {LABELS['float']} | {fl:.2f} | | | | |")
    order = list(METHODS)
    for bits in (4, 3, 2):
        g = results.get(f"{bits}:gptq", {}).get("ppl")
        for method in order:
            r = results.get(f"{bits}:{method}")
            if r is None:
                continue
            ppl = r["ppl"]
            gap = "" if fl is None else _gap(ppl - fl)
            ratio = "" if (fl is None or g is None or g - fl <= 0) else f"{(ppl - fl) / (g - fl):.3g}"
            lines.append(f"| {bits} | {LABELS.get(method, method)} | {_ppl(ppl)} | {gap} | {ratio} | "
                         f"{r.get('bits_per_weight', '')} | {r.get('quantize_seconds', '')} |")
    extra = [k for k in results if k != "float" and (":" not in k or k.split(":", 1)[1] not in METHODS)]
    if extra:
        lines += ["", "Other rows (same settings; recipe as given):", "",
                  "| row | ppl | gap to float | recipe |", "|---|---|---|---|"]
        for k in extra:
            r = results[k]
            rec = json.dumps({kk: v for kk, v in (r.get("recipe") or {}).items() if kk != "name"})
            gap = "" if fl is None else _gap(r["ppl"] - fl)
            lines.append(f"| {k} | {_ppl(r['ppl'])} | {gap} | `{rec}` |")
    if fl is not None:
        a = ANCHOR_INT3
        rel_a = (a["ppl"] - a["float"]) / a["float"]
        lines += ["", f"3 bits against the anchor ({a['what']}; a different harness, so only ratios compare): "
                      f"anchor ppl / float = {a['ppl'] / a['float']:.2f}, gap / float = {rel_a:.2f}.", ""]
        for key in ("3:gptq", "3:gptq+quip", "3:gptq+quip+nt", "3:gptq+quipin", "3:gptq+quipin+nt"):
            if key in results:
                p = results[key]["ppl"]
                lines.append(f"- {LABELS[key.split(':')[1]]}: ppl / float = {p / fl:.2f}, gap / float = "
                             f"{(p - fl) / fl:.2f} = {(p - fl) / fl / rel_a:.2f} x the anchor's")
    table = BEGIN + "\n" + "\n".join(lines) + "\n" + END
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if BEGIN in old and END in old:  # replace the generated region, keep the prose around it
        text = old[:old.index(BEGIN)] + table + old[old.index(END) + len(END):]
    else:
        text = (old.rstrip() + "\n\n" if old.strip() else "") + table + "\n"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated rows (default: the table)")
    p.add_argument("--extra", action="append", default=[], help="NAME=JSON recipe dict: an extra row")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=DEFAULT_JSON)
    p.add_argument("--md", default=DEFAULT_MD)
    p.add_argument("--recon-iters", type=int, default=None, help="recon steps per block (rows with recon)")
    p.add_argument("--recon-batch", type=int, default=None, help="recon sequences per step")
    p.add_argument("--force", action="store_true", help="redo rows already in the JSON file")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--kernels", action="store_true",
                   help="on GPU, let QuantLinear use the Triton kernels (default: the plain fp32 dequantize path, "
                        "the same arithmetic as on CPU)")
    args = p.parse_args(argv)
    if not args.kernels:
        from quantkit.nn import QuantLinear

        QuantLinear._get_kernel = lambda self, device: None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.recon_iters is not None:
        RECON["iters"] = args.recon_iters
    if args.recon_batch is not None:
        RECON["batch_size"] = args.recon_batch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    extra = {}
    for e in args.extra:
        name, _, js = e.partition("=")
        extra[name] = json.loads(js)
    results: dict = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f).get("rows", {})
    settings = {"model": args.model, "samples": args.samples, "seq_len": args.seq_len,
                "max_windows": args.max_windows, "batch_size": args.batch_size}
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        if row in results and not args.force:
            print(f"{row}: done before (ppl {results[row]['ppl']:.3f}); --force redoes it", flush=True)
            continue
        rec = recipe_for(row, extra)
        print(f"{row}: running ...", flush=True)
        results[row] = run_row(row, rec, args)
        r = results[row]
        print(f"{row}: ppl {r['ppl']:.3f}  bpw {r.get('bits_per_weight')}  quantize {r.get('quantize_seconds')} s  "
              f"total {r['seconds']} s", flush=True)
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"settings": settings, "rows": results}, f, indent=1)
        os.replace(tmp, args.json)
        write_markdown(results, args.md, args)
    write_markdown(results, args.md, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
