"""Number-format quality table: float, INT4, NF4, FP4, any4/any3, FP8 W8A8, INT8 W8A8 (+ SmoothQuant).

Every row: the real default model (smollm2-135m), lm_head in float, perplexity from
``quantkit.evaluate(qm, seq_len=512, max_windows=40)`` on the enwiki odd-numbered articles. Rows
that use calibration data (GPTQ, any4's activation-weighted k-means, SmoothQuant, static activation
scales) draw 64 x 512 tokens from the even-numbered articles (seed 0), except the "1 curated sample"
row, which calibrates on ``CURATED_CALIBRATION_TEXT`` (bench/curated_text.py) alone (one window).
Each row also saves the checkpoint, reloads it with ``quantkit.load`` and checks that the reloaded
model's logits equal the in-memory quantized model's (bit for bit), and records the checkpoint size.

Results are kept row by row inside ``docs/quality/formats.md`` itself (a JSON block between markers
at its end), so a killed run resumes where it stopped (``--force`` redoes rows); the table is
rewritten after every row, the prose around the markers is kept.

    nohup nice -n 10 python bench/quality_formats.py > /tmp/quality_formats.log 2>&1 &
    python bench/quality_formats.py --rows float,int4-rtn,any4-g128-rtn
    python bench/quality_formats.py --list
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_MD = os.path.join(ROOT, "docs", "quality", "formats.md")
BEGIN, END = "<!-- table:begin (bench/quality_formats.py) -->", "<!-- table:end -->"
DBEGIN, DEND = "<!-- results:begin (bench/quality_formats.py; JSON, do not edit) -->", "<!-- results:end -->"

GPTQ = {"type": "gptq", "damp": 0.01, "act_order": True, "static_groups": True, "block_size": 128}


def _lut(table="learned", bits=4, g=128, **kw):
    return {"type": "lut", "table": table, "bits": bits, "group_size": g, **kw}


INT4 = {"type": "int", "bits": 4, "group_size": 128, "sym": False}
# name -> (label, recipe or None for float, calibration: "none" | "corpus" | "curated")
ROWS: dict[str, tuple[str, dict | None, str]] = {
    "float": ("float (fp32 weights)", None, "none"),
    "int4-rtn": ("INT4 asym g128, RTN", {"quantizer": "rtn", "format": INT4}, "none"),
    "int4-gptq": ("INT4 asym g128, GPTQ", {"quantizer": GPTQ, "format": INT4}, "corpus"),
    "int4-g64-rtn": ("INT4 asym g64, RTN", {"quantizer": "rtn", "format": {**INT4, "group_size": 64}}, "none"),
    "nf4-g128-rtn": ("NF4 g128 (absmax), RTN", {"quantizer": "rtn", "format": _lut("nf4")}, "none"),
    "nf4-g64-rtn": ("NF4 g64 (absmax, bnb block), RTN", {"quantizer": "rtn", "format": _lut("nf4", g=64)}, "none"),
    "fp4-g128-rtn": ("FP4 E2M1 g128 (absmax), RTN", {"quantizer": "rtn", "format": _lut("fp4")}, "none"),
    "any4-g128-rtn": ("any4 g128 (learned row table), RTN", {"quantizer": "rtn", "format": _lut()}, "corpus"),
    "any4-g128-rtn-curated": ("any4 g128, RTN, 1 curated sample", {"quantizer": "rtn", "format": _lut()}, "curated"),
    "any4-row-rtn": ("any4 per-row table, no group scale, RTN", {"quantizer": "rtn", "format": _lut(g=None)},
                     "corpus"),
    "any4-g128-gptq": ("any4 g128, GPTQ", {"quantizer": GPTQ, "format": _lut()}, "corpus"),
    # equal bits (4.375): a row table without group scales against INT4 g64, both under GPTQ
    "any4-row-gptq": ("any4 per-row table, no group scale, GPTQ", {"quantizer": GPTQ, "format": _lut(g=None)},
                      "corpus"),
    "int4-g64-gptq": ("INT4 asym g64, GPTQ", {"quantizer": GPTQ, "format": {**INT4, "group_size": 64}}, "corpus"),
    "any3-g128-gptq": ("any3 g128, GPTQ", {"quantizer": GPTQ, "format": _lut(bits=3)}, "corpus"),
    "int3-gptq": ("INT3 asym g128, GPTQ", {"quantizer": GPTQ, "format": {**INT4, "bits": 3}}, "corpus"),
    "fp8-e4m3-w8a8": ("FP8 E4M3 W8A8 (per-channel W, dynamic per-token A)",
                      {"quantizer": "rtn", "format": {"type": "fp8", "dtype": "e4m3", "activations": "dynamic"}},
                      "none"),
    "fp8-e5m2-w8a8": ("FP8 E5M2 W8A8 (per-channel W, dynamic per-token A)",
                      {"quantizer": "rtn", "format": {"type": "fp8", "dtype": "e5m2", "activations": "dynamic"}},
                      "none"),
    "fp8-e4m3-w8a8-static": ("FP8 E4M3 W8A8, static per-tensor A scale",
                             {"quantizer": "rtn", "format": {"type": "fp8", "dtype": "e4m3", "activations": "static"}},
                             "corpus"),
    "int8-w8a8": ("INT8 W8A8 (per-channel W, dynamic per-token A)",
                  {"quantizer": "rtn", "format": {"type": "int8a8", "activations": "dynamic"}}, "none"),
    "int8-w8a8-smooth": ("INT8 W8A8 dynamic + SmoothQuant a=0.5",
                         {"quantizer": "rtn", "format": {"type": "int8a8", "activations": "dynamic"},
                          "transforms": [{"type": "smoothquant", "alpha": 0.5}]}, "corpus"),
    "int8-w8a8-static": ("INT8 W8A8, static per-tensor A scale",
                         {"quantizer": "rtn", "format": {"type": "int8a8", "activations": "static"}}, "corpus"),
    "int8-w8a8-static-smooth": ("INT8 W8A8 static + SmoothQuant a=0.5",
                                {"quantizer": "rtn", "format": {"type": "int8a8", "activations": "static"},
                                 "transforms": [{"type": "smoothquant", "alpha": 0.5}]}, "corpus"),
}
DEFAULT_ROWS = ["float", "int4-rtn", "nf4-g128-rtn", "fp4-g128-rtn", "any4-g128-rtn", "fp8-e4m3-w8a8",
                "fp8-e5m2-w8a8", "int8-w8a8", "int8-w8a8-smooth", "int4-gptq", "any4-g128-gptq",
                "any3-g128-gptq", "any4-row-rtn", "int4-g64-rtn", "nf4-g64-rtn", "any4-g128-rtn-curated"]


def _calibration(kind: str, lm, args):
    from quantkit.data import calibration_batch

    from curated_text import CURATED_CALIBRATION_TEXT  # bench/curated_text.py (bench/ is on sys.path)

    if kind == "curated":
        ids = lm.tokenizer(CURATED_CALIBRATION_TEXT, return_tensors="pt", add_special_tokens=False).input_ids
        n = min(ids.shape[1], args.seq_len)
        return ids[:, :n], f"1 curated sample ({n} tokens, CURATED_CALIBRATION_TEXT)"
    ids = calibration_batch(lm.tokenizer, args.samples, args.seq_len, 0, "enwiki", lm.bos_token_id)
    return ids, f"{args.samples} x {args.seq_len} enwiki (even articles, seed 0)"


def run_row(name: str, args) -> dict:
    import quantkit
    from quantkit.api import QuantizedModel
    from quantkit.models import load_float_model

    label, recipe, calib = ROWS[name]
    t0 = time.time()
    lm = load_float_model(args.model)
    out: dict = {"row": name, "label": label, "recipe": recipe}
    if recipe is None:
        qm = QuantizedModel(lm.model, lm.tokenizer, lm.source, lm.path, {"float": True})
        out["bits_per_weight"] = 32.0
        out["calibration"] = "none"
    else:
        recipe = {**recipe, "name": name}
        ids, what = _calibration(calib, lm, args)
        if calib == "none":
            what = "none (data-free)"
        tq = time.time()
        qm = quantkit.quantize(lm, recipe, calibration=ids, device=args.device, progress=args.progress)
        out["quantize_seconds"] = round(time.time() - tq, 1)
        out["calibration"] = what if qm.report.calibration_tokens else "none (data-free)"
        out["bits_per_weight"] = round(qm.bits_per_weight(), 4)
        layers = qm.quantized_layers()
        out["quantized_linear_bytes"] = sum(t.numel() * t.element_size() for m in layers.values()
                                            for t in m.packed.values())
        out["n_quantized_linears"] = len(layers)
        out["mean_layer_rel_err"] = sum(v.get("rel_err", 0.0) for v in qm.report.layers.values()) / max(
            len(qm.report.layers), 1)
    te = time.time()
    ev = quantkit.evaluate(qm, seq_len=args.seq_len, max_windows=args.max_windows, device=args.device,
                           progress=args.progress)
    out["eval_seconds"] = round(time.time() - te, 1)
    out["ppl"] = ev["ppl"]
    out["eval"] = {k: ev[k] for k in ("tokens_scored", "windows", "seq_len", "bos", "text_sha256") if k in ev}
    if recipe is not None and not args.no_reload:
        out.update(_reload_check(qm, args))
    out["seconds"] = round(time.time() - t0, 1)
    out["device"] = _device_name(args.device)
    out["date"] = datetime.date.today().isoformat()
    return out


def _reload_check(qm, args) -> dict:
    """Save, reload with quantkit.load, compare logits on one window; report the checkpoint size."""
    import quantkit

    tmp = tempfile.mkdtemp(prefix="qk-formats-")
    try:
        path = qm.save(os.path.join(tmp, "ckpt"))
        size = os.path.getsize(os.path.join(path, "model.safetensors"))
        lm2 = quantkit.load(path)
        ids = torch.arange(1000, 1000 + 128).unsqueeze(0) % qm.model.config.vocab_size
        with torch.no_grad():
            a = qm.model(input_ids=ids.to(args.device), use_cache=False).logits.float().cpu()
            lm2.model.to(args.device)
            b = lm2.model(input_ids=ids.to(args.device), use_cache=False).logits.float().cpu()
        return {"checkpoint_bytes": size, "reload_equal": bool(torch.equal(a, b)),
                "reload_max_abs_diff": float((a - b).abs().max())}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _fmt_mb(b) -> str:
    return "" if b is None else f"{b / 2**20:.1f}"


def render(results: dict, args) -> str:
    fl = results.get("float", {}).get("ppl")
    lines = [
        f"Model smollm2-135m (lm_head and embeddings float); perplexity "
        f"`quantkit.evaluate(qm, seq_len={args.seq_len}, max_windows={args.max_windows})` on the enwiki "
        f"odd-numbered articles (the same text for every row). Calibration: as listed per row.",
        "",
        "| row | format / method | calibration | bits/weight | ppl | gap to float | "
        "quantized linears MiB | checkpoint MiB | reload == in-memory | quantize s | device, date |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = [r for r in ROWS if r in results] + [r for r in results if r not in ROWS]
    for key in order:
        r = results[key]
        gap = "" if fl is None or key == "float" else f"{r['ppl'] - fl:+.2f}"
        bpw = "32 (fp32)" if key == "float" else f"{r.get('bits_per_weight', 0):.3f}"
        eq = "" if "reload_equal" not in r else ("yes" if r["reload_equal"] else f"NO ({r['reload_max_abs_diff']:.2e})")
        lines.append(f"| {key} | {r.get('label', key)} | {r.get('calibration', '')} | {bpw} | {r['ppl']:.3f} | {gap} | "
                     f"{_fmt_mb(r.get('quantized_linear_bytes'))} | {_fmt_mb(r.get('checkpoint_bytes'))} | "
                     f"{eq} | {r.get('quantize_seconds', '')} | {r.get('device', '')}, {r.get('date', '')} |")
    return "\n".join(lines)


def write_markdown(results: dict, path: str, args) -> None:
    table = BEGIN + "\n" + render(results, args) + "\n" + END
    data = DBEGIN + "\n```json\n" + json.dumps(results, indent=1) + "\n```\n" + DEND
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if BEGIN in old and END in old:
        old = old[:old.index(BEGIN)] + table + old[old.index(END) + len(END):]
    else:
        old = (old.rstrip() + "\n\n" if old.strip() else "") + table + "\n"
    if DBEGIN in old and DEND in old:
        old = old[:old.index(DBEGIN)] + data + old[old.index(DEND) + len(DEND):]
    else:
        old = old.rstrip() + "\n\n" + data + "\n"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(old)
    os.replace(tmp, path)


def read_results(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        text = f.read()
    if DBEGIN not in text or DEND not in text:
        return {}
    block = text[text.index(DBEGIN) + len(DBEGIN):text.index(DEND)]
    block = block.strip().removeprefix("```json").removesuffix("```").strip()
    return json.loads(block) if block else {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated row names (see --list)")
    p.add_argument("--list", action="store_true", help="list the known rows and exit")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=64, help="calibration windows (GPTQ and other calibrated rows)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--md", default=DEFAULT_MD)
    p.add_argument("--force", action="store_true", help="redo rows already recorded")
    p.add_argument("--no-reload", action="store_true", help="skip the save/reload check")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--nice", type=int, default=10, help="niceness to add (0: none)")
    args = p.parse_args(argv)
    if args.list:
        for k, (label, _, calib) in ROWS.items():
            print(f"{k:26s} {label}  [calibration: {calib}]")
        return 0
    if args.nice:
        os.nice(args.nice)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    results = read_results(args.md)
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        if row not in ROWS:
            raise SystemExit(f"unknown row {row!r}; known: {', '.join(ROWS)}")
        if row in results and not args.force:
            print(f"{row}: done before (ppl {results[row]['ppl']:.3f}); --force redoes it", flush=True)
            continue
        print(f"{row}: running ...", flush=True)
        r = run_row(row, args)
        results = read_results(args.md)  # another invocation may have added rows meanwhile
        results[row] = r
        print(f"{row}: ppl {r['ppl']:.3f}  bpw {r.get('bits_per_weight')}  quantize {r.get('quantize_seconds')} s  "
              f"reload_equal {r.get('reload_equal')}  total {r['seconds']} s", flush=True)
        write_markdown(results, args.md, args)
    write_markdown(results, args.md, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
