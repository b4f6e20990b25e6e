"""Many block-reconstruction settings and auto-round runs on one model, in one process, one table.

The model, calibration token ids and evaluation windows are loaded once and shared by every row, so
a GPU call (or a CPU session) compares several settings under the same conditions. Each ``--run``
is one row, ``TOOL:key=value,...``:

    qk:bits=4,g=128,sym=1,sym_range=full,quantizer=gptq,iters=30,batch=4,target=model,init=quantizer
    ar:bits=4,g=128,sym=1,iters=30,batch=4           (auto-round, its default SignRound algorithm)
    qk:bits=4,g=128,sym=1,iters=0                     (the quantizer alone: no recon plugin)

quantkit keys: bits, g (group size), sym (0/1), sym_range (half/full), fmt (int, or lut: any4-style
learned tables), quip (1: the input-side QuIP rotation of ``w2a16-quip-recon``; 2: both sides), quantizer (gptq/rtn), iters,
batch, and any other recon option (target, init, lr, learn_clip, autocast, patience).
End-to-end scale tuning after the block pass (quantkit/transforms/e2e.py, the recipe key ``finetune``):
any ``e2e_<option>`` key (e2e_epochs, e2e_lr, e2e_batch, e2e_loss, e2e_optimizer, e2e_holdout,
e2e_eval_every, e2e_tables, e2e_norms, e2e_norms_lr, e2e_autocast, e2e_seed) makes the row two rows from one
quantization: the block pass alone (label ``...,e2e=base``), then the same model after ``run_finetune`` (the function
``quantkit.quantize`` calls for ``finetune``) against the float model's final hidden states, captured
once from the float model; the e2e row's time is the stage's alone, its loss record is in the JSON.
``e2e_lr=0.001/0.003`` gives one e2e row per step size, each from a copy of the same block pass (any e2e
option may list values so, ``e2e_epochs=1/2``; several such options give every combination).
``--tasks sciq,arc_easy,piqa`` also scores every row on those zero-shot tasks (``--task-limit`` documents each,
0 = all) with its paired difference to the float row. Rows that differ only in ``seed`` (the recon sampler's
batch order) are summarised at the end: the mean and the standard deviation between seeds of the perplexity
and of every paired difference (one model's difference to float is not the method's).

    python -P bench/recon_matrix.py --run qk:bits=3,sym=1,sym_range=full,quantizer=rtn,iters=30,batch=4,\
offsets=value,target=model,e2e_epochs=2,e2e_lr=0.001 auto-round
keys: bits, g, sym, iters, batch, seed. The same calibration ids (quantkit's ``calibration_batch``,
``--samples`` x ``--seq-len`` of the even enwiki articles, seed 0) go to both tools, and every row is
scored by ``quantkit.evaluate`` on ``--max-windows`` x ``--seq-len`` windows of the odd articles (the
docs/QUALITY.md harness). auto-round is never a quantkit dependency: put it on PYTHONPATH for this
script only (bench/autoround_peer.py says how). Rows print as they finish; the JSON under $OUT (or
``--out``) is rewritten after each, so a run cut short keeps its rows.

    python -P bench/recon_matrix.py --run qk:bits=4,sym=1,iters=30,batch=4 --run ar:bits=4,sym=1,iters=30
    python -P bench/recon_matrix.py --smoke      # 1 step, 4 x 64 tokens, 2 windows (plumbing)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import os
import platform
import time

import torch
import yaml

QK_FMT = {"bits", "g", "sym", "sym_range", "fmt", "quip"}


def parse_run(text: str) -> tuple[str, dict]:
    tool, _, rest = text.partition(":")
    if tool not in ("qk", "ar"):
        raise SystemExit(f"--run {text!r}: the tool must be qk or ar")
    kv = {k: yaml.safe_load(v) for k, _, v in (p.partition("=") for p in rest.split(",") if p)}
    return tool, kv


def seed_groups(rows: list[dict]) -> list[dict]:
    """Rows that differ only in their ``seed`` (the recon sampler's; the e2e stage's rows of one seed
    stay apart by label) as groups of two or more: n, and per quantity (ppl; each task's paired
    differences in points) the mean and the standard deviation between the seeds (n - 1)."""
    import statistics as st

    groups: dict[str, list[dict]] = {}
    for r in rows:
        if "ppl" not in r or "seed" not in r.get("settings", {}):
            continue
        key = ",".join(p for p in r["label"].split(":", 1)[1].split(",") if not p.startswith("seed="))
        groups.setdefault(r["tool"] + ":" + key, []).append(r)
    out = []
    for key, rs in groups.items():
        if len(rs) < 2:
            continue
        vals: dict[str, list[float]] = {"ppl": [r["ppl"] for r in rs]}
        for r in rs:
            for task, m in (r.get("tasks") or {}).items():
                for k in ("d_correct", "d_correct_norm"):
                    if k in m:
                        vals.setdefault(f"{task} {k}", []).append(m[k])
        out.append({"group": key, "n": len(rs), "seeds": [r["settings"]["seed"] for r in rs],
                    **{k: {"mean": st.mean(v), "sd": st.stdev(v)} for k, v in vals.items() if len(v) == len(rs)}})
    return out


def e2e_field(key: str) -> str:
    """The FinetuneConfig field of a row's ``e2e_<option>`` key (``e2e_batch`` -> ``batch_size``)."""
    return {"batch": "batch_size"}.get(key[4:], key[4:])


def qk_recipe(kv: dict, args) -> dict:
    bits, g, sym = int(kv.get("bits", 4)), kv.get("g", 128), bool(kv.get("sym", 0))
    if kv.get("fmt", "int") == "lut":  # any4/any3/any2: learned per-row tables, activation-weighted k-means
        fmt = {"type": "lut", "table": "learned", "bits": bits, "group_size": g, "weighting": "sq"}
    else:
        fmt = {"type": "int", "bits": bits, "group_size": g, "sym": sym}
    if "sym_range" in kv:
        fmt["sym_range"] = kv["sym_range"]
    quant = kv.get("quantizer", "gptq")
    quantizer = ({"type": "gptq", "damp": 0.01, "act_order": True, "static_groups": True}
                 if quant == "gptq" else {"type": "rtn"})
    recon = {k: v for k, v in kv.items() if k not in QK_FMT | {"quantizer", "iters", "batch"}
             and not k.startswith("e2e_")}
    iters = int(kv.get("iters", 0))
    plugins = ([{"type": "recon", "iters": iters, "batch_size": int(kv.get("batch", 4)), **recon}]
               if iters > 0 else [])
    # quip=1: the input-side rotation (w2a16-quip-recon's); quip=2: both sides (QuIP's incoherence processing)
    transforms = ([{"type": "quip", "seed": 0, "rotate_in": True, "rotate_out": str(kv.get("quip")) == "2"}]
                  if kv.get("quip") else [])
    return {"name": "recon-matrix", "quantizer": quantizer, "format": fmt, "block_plugins": plugins,
            "transforms": transforms, "ignore": ["lm_head"],
            "calibration": {"samples": args.samples, "seq_len": args.seq_len, "seed": 0, "corpus": "enwiki"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--run", action="append", default=[], help="one row: TOOL:key=value,... (see above)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tasks", default="", help="zero-shot tasks scored for every row too (e.g. sciq,arc_easy,piqa),"
                    " with each row's paired difference to the float row")
    ap.add_argument("--task-limit", type=int, default=0, help="documents per task (0 = all)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8 for every row "
                         "(to tell non-deterministic kernels from other run-to-run differences)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if args.smoke:
        args.samples, args.seq_len, args.max_windows = 4, 64, 2
        args.run = args.run or ["qk:bits=4,sym=1,sym_range=full,iters=1,batch=2,target=model"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deterministic:  # for the whole process, before any CUDA work (quantkit.determinism)
        from quantkit.determinism import deterministic_algorithms

        deterministic_algorithms().__enter__()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import quantkit
    from quantkit.api import QuantizedModel
    from quantkit.data import calibration_batch
    from quantkit.models import load_float_model

    runs = [parse_run(r) for r in args.run]
    lm = load_float_model(args.model)
    ids = calibration_batch(lm.tokenizer, args.samples, args.seq_len, 0, "enwiki", lm.bos_token_id)
    dev = torch.device(args.device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "gpu": gpu}
    rows: list[dict] = []
    path = os.path.join(args.out, f"recon_matrix{args.tag}.json")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def score(model, label, tool, kv, secs, bpw, extra=None):
        qm = QuantizedModel(model, lm.tokenizer, lm.source, lm.path, {"float": True})
        ev = quantkit.evaluate(qm, seq_len=args.seq_len, max_windows=args.max_windows, device=args.device,
                               progress=False)
        rows.append({"label": label, "tool": tool, "settings": kv, "ppl": float(ev["ppl"]),
                     "seconds": round(secs, 1), "bits_per_weight": bpw, "load": round(os.getloadavg()[0], 2),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     **(extra or {})})
        fl = rows[0]["ppl"] if rows[0]["tool"] == "float" else float("nan")
        print(f"| {label} | {rows[-1]['ppl']:.3f} | {rows[-1]['ppl'] - fl:+.3f} | {secs:.1f} | {bpw} |", flush=True)
        if args.tasks:
            rows[-1]["tasks"] = zero_shot(model)
        os.makedirs(args.out, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"args": vars(args), "machine": machine, "rows": rows}, f, indent=1)
        os.replace(path + ".tmp", path)

    print(f"{args.model} on {gpu or 'cpu'}, calibration {args.samples} x {args.seq_len}, "
          f"eval {args.max_windows} x {args.seq_len}\n| run | ppl | gap | quantize s | bits/weight |\n|---|---|---|---|---|",
          flush=True)
    float_target: dict = {}

    def zero_shot(model) -> dict:
        """Every task's accuracies for this row, and (after the float row) the paired differences in points."""
        from quantkit.eval.tasks import evaluate_tasks, paired_difference

        t = time.time()
        res = evaluate_tasks(model, lm.tokenizer, args.tasks, limit=args.task_limit or None,
                             bos_token_id=lm.bos_token_id, device=args.device, progress=False)
        base = rows[0].get("tasks") if rows and rows[0]["tool"] == "float" and len(rows) > 1 else None
        cells = []
        for name, m in res.items():
            if base is not None:
                for k in ("correct", "correct_norm"):
                    d, se = paired_difference(base[name][k], m[k])
                    m[f"d_{k}"], m[f"d_{k}_se"] = 100 * d, 100 * se
                cells.append(f"{name} acc {m['acc']:.3f} ({m['d_correct']:+.1f} ± {m['d_correct_se']:.1f}), "
                             f"acc_norm {m['acc_norm']:.3f} ({m['d_correct_norm']:+.1f} ± {m['d_correct_norm_se']:.1f})")
            else:
                cells.append(f"{name} acc {m['acc']:.3f}, acc_norm {m['acc_norm']:.3f}")
        print(f"|   zero-shot (n = {', '.join(str(m['n']) for m in res.values())}; {time.time() - t:.0f} s): "
              + "; ".join(cells) + " | | | |", flush=True)
        return res

    def e2e_config(kv):
        from quantkit.transforms.e2e import FinetuneConfig

        opts = {e2e_field(k): v for k, v in kv.items() if k.startswith("e2e_")}
        for k, v in opts.items():  # several values (e2e_lr=0.001/0.003): the config holds the first
            if "/" in str(v):
                opts[k] = yaml.safe_load(str(v).split("/")[0])
        return FinetuneConfig(**opts) if opts else None

    def e2e_sweep(kv) -> list[dict]:
        """The e2e rows of a run: one per combination of the values of its e2e options listing several
        (``e2e_epochs=1/2,e2e_norms=0/1``: four), as ``{key: value}``; [{}] if none lists several."""
        multi = [k for k, v in kv.items() if k.startswith("e2e_") and "/" in str(v)]
        vals = [[yaml.safe_load(x) for x in str(kv[k]).split("/")] for k in multi]
        return [dict(zip(multi, combo, strict=True)) for combo in itertools.product(*vals)]

    def one(tool, kv, label):
        model = copy.deepcopy(lm.model)
        if tool == "qk":
            ft = e2e_config(kv)
            if ft is not None and "t" not in float_target:  # the float model's final hidden states, once
                from quantkit.transforms.e2e import capture_float

                t = time.time()
                float_target["t"] = capture_float(copy.deepcopy(lm.model), ids, ft.model_copy(update={"loss": "kl"}),
                                                  args.device)
                print(f"float hidden states captured in {time.time() - t:.1f} s", flush=True)
            sync()
            t = time.time()
            qm = quantkit.quantize(model, qk_recipe(kv, args), calibration=ids, device=args.device, progress=False)
            sync()
            secs = time.time() - t
            blocks = qm.report.blocks
            extra = {"block_rel_err_mean": sum(b.get("block_rel_err", 0.0) for b in blocks) / max(len(blocks), 1)}
            if any("recon_s" in b for b in blocks):
                extra.update({"recon_s_total": round(sum(b.get("recon_s", 0.0) for b in blocks), 1),
                              "recon_kept": [int(b["recon_kept"]) for b in blocks if "recon_kept" in b]})
            if ft is None:
                score(qm.model, label, tool, kv, secs, round(qm.bits_per_weight(), 4), extra)
                return
            from quantkit.transforms.e2e import run_finetune

            score(qm.model, label + ",e2e=base", tool, kv, secs, round(qm.bits_per_weight(), 4), extra)
            tgt = float_target["t"]
            if ft.loss == "ce":
                tgt = type(tgt)(None, tgt.head, tgt.softcap)
            combos = e2e_sweep(kv)
            for i, combo in enumerate(combos):  # one e2e row per combination, each from a copy of the block pass
                cfg = ft.model_copy(update={e2e_field(k): v for k, v in combo.items()})
                model_i = qm.model if i == len(combos) - 1 else copy.deepcopy(qm.model)
                sync()
                t = time.time()
                rec = run_finetune(model_i, ids, tgt, cfg, args.device, seed=0, progress=True)
                sync()
                lab = label
                for k, v in combo.items():
                    lab = lab.replace(f"{k}={kv[k]}", f"{k}={v}")
                score(model_i, lab, tool, kv, time.time() - t, round(qm.bits_per_weight(), 4),
                      {"finetune": rec, "block_pass_seconds": round(secs, 1)})
            return
        from auto_round import AutoRound

        bits, g, sym = int(kv.get("bits", 4)), int(kv.get("g", 128)), bool(kv.get("sym", 1))
        batch = int(kv.get("batch", 8))
        sync()
        t = time.time()
        ar = AutoRound(model, lm.tokenizer, bits=bits, group_size=g, sym=sym, iters=int(kv.get("iters", 200)),
                       nsamples=args.samples, seqlen=args.seq_len, batch_size=batch,
                       dataset=list(ids.split(batch)), device_map=0 if dev.type == "cuda" else "cpu", seed=int(kv.get("seed", 0)))
        ar.quantize()
        sync()
        secs = time.time() - t
        if args.threads:
            torch.set_num_threads(args.threads)  # auto-round may change it
        bpw = bits + (16 + (0 if sym else bits)) / g  # fp16 scale (+ zero) per group, computed
        score(model.to("cpu"), label, tool, kv, secs, round(bpw, 4))

    score(copy.deepcopy(lm.model), "float", "float", {}, 0.0, 32.0)
    for tool, kv in runs:
        label = tool + ":" + ",".join(f"{k}={v}" for k, v in kv.items())
        try:
            one(tool, kv, label)
        except Exception as e:  # noqa: BLE001 - one failed row is reported; the others still run
            print(f"| {label} | failed: {type(e).__name__}: {str(e)[:300]} | | | |", flush=True)
            rows.append({"label": label, "tool": tool, "settings": kv, "error": f"{type(e).__name__}: {e}"})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    groups = seed_groups(rows)
    for g in groups:  # across seeds: is a difference the method's, or one model's?
        cells = "; ".join(f"{k} {v['mean']:+.2f} (sd {v['sd']:.2f})" if k != "ppl" else
                          f"ppl {v['mean']:.3f} (sd {v['sd']:.3f})" for k, v in g.items() if isinstance(v, dict))
        print(f"| seeds {g['seeds']} of {g['group']} (n = {g['n']}): {cells} |", flush=True)
    if groups:
        with open(path + ".tmp", "w") as f:
            json.dump({"args": vars(args), "machine": machine, "rows": rows, "seed_groups": groups}, f, indent=1)
        os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
