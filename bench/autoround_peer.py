"""auto-round (Intel's SignRound, PyPI ``auto-round``) beside quantkit's recon, same model, windows and bits.

auto-round is never a quantkit dependency: install it apart, e.g. into a folder put on PYTHONPATH only
for this script (checked on the project's CPU machine: no CUDA torch is pulled in this way)::

    pip install --no-deps --target /tmp/ar_pkgs auto-round==0.16.1 py-cpuinfo threadpoolctl \\
        datasets pyarrow dill xxhash multiprocess pandas python-dateutil pytz tzdata
    PYTHONPATH=/tmp/ar_pkgs nice -n 10 python -P bench/autoround_peer.py --bits 4 --group-size 128 --iters 200

Both tools get the same calibration token ids (quantkit's ``calibration_batch``: ``--samples`` x
``--seq-len`` windows of the even enwiki articles, seed 0) and are scored by the same
``quantkit.evaluate`` (``--max-windows`` x ``--seq-len``, odd articles). auto-round runs its default
algorithm (sign-SGD on rounding offsets and min/max scales, lr 1/iters, quantized block inputs) with the
given bits / group / symmetry / iters / batch; its model is evaluated as auto-round leaves it after
``quantize()`` (weights fake-quantized in place: checked below by counting distinct values per group).
quantkit runs GPTQ + recon with the same bits, group, iters and batch (and GPTQ alone as a baseline).
One table row each, with wall time, the 1-minute load average at its start and end (the machine may be
shared: the load says how much), date and machine; JSON under $OUT (or --out), one file per
configuration and tool set (``--tag``). ``--threads`` sets torch's thread count for both tools;
``--autocast on`` runs quantkit's recon forward under bf16 autocast (auto-round's default ``amp`` is
bf16 on CPU). ``--smoke``: 1 step, 4 x 64 tokens, 2 windows (a plumbing check).

The matched comparison of docs/quality/recon_vs_autoround.md ran one process per configuration and
tool, e.g.::

    nice -n -5 python -P bench/autoround_peer.py --bits 4 --group-size 128 --sym --iters 30 --batch 4 \
        --samples 32 --seq-len 512 --threads 1 --autocast on --skip quantkit --skip gptq --skip float
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import time

import torch


def _grid_check(model, float_sd, bits: int, group: int) -> str:
    """How many linears changed and whether their groups hold at most 2^bits distinct values."""
    changed = ok = 0
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(m, torch.nn.Linear) or "lm_head" in n or w is None:
            continue
        if torch.equal(w.detach().cpu(), float_sd[n + ".weight"]):
            continue
        changed += 1
        cols = w.shape[1] - w.shape[1] % group
        g = w.detach()[:, :cols].reshape(w.shape[0], -1, group)
        ok += int(max(len(torch.unique(g[0, j])) for j in range(g.shape[1])) <= 2 ** bits)
    return f"{changed} linears changed, {ok} on a <= {2 ** bits}-value grid per group (row 0)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action="store_true", help="symmetric grids (auto-round's default is sym)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (both tools)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--skip", choices=["quantkit", "autoround", "gptq", "float"], action="append", default=[])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both tools")
    ap.add_argument("--autocast", choices=["auto", "on", "off"], default="on",
                    help="quantkit recon's autocast option (auto-round: its default amp)")
    ap.add_argument("--recon-set", action="append", default=[], metavar="KEY=VALUE",
                    help="one more recon option for quantkit's run (YAML value), e.g. target=model, init=rtn")
    ap.add_argument("--fmt-set", action="append", default=[], metavar="KEY=VALUE",
                    help="one more int-format option for quantkit's runs (YAML value), e.g. sym_range=full")
    ap.add_argument("--quantizer", choices=["gptq", "rtn"], default="gptq", help="quantkit's quantizer before recon")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if args.smoke:
        args.iters, args.samples, args.seq_len, args.max_windows, args.batch = 1, 4, 64, 2, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    import quantkit
    from quantkit.api import QuantizedModel
    from quantkit.data import calibration_batch
    from quantkit.models import load_float_model

    lm = load_float_model(args.model)
    ids = calibration_batch(lm.tokenizer, args.samples, args.seq_len, 0, "enwiki", lm.bos_token_id)
    rows = []

    sym = "sym" if args.sym else "asym"

    def score(model, name, secs, bpw, load0, note="", extra=None):
        load1 = os.getloadavg()[0]
        qm = QuantizedModel(model, lm.tokenizer, lm.source, lm.path, {"float": True})
        t = time.time()
        ev = quantkit.evaluate(qm, seq_len=args.seq_len, max_windows=args.max_windows, device="cpu", progress=False)
        ppl = ev["ppl"]
        rows.append({"method": name, "ppl": float(ppl), "seconds": round(secs, 1), "bits_per_weight": bpw,
                     "load_start": round(load0, 2), "load_end": round(load1, 2),
                     "eval_seconds": round(time.time() - t, 1), "tokens_scored": ev.get("tokens_scored"),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "note": note, **(extra or {})})
        print(rows[-1], flush=True)

    def report_stats(qm) -> dict:
        blocks = qm.report.blocks
        out = {"block_rel_err_mean": sum(b.get("block_rel_err", 0.0) for b in blocks) / max(len(blocks), 1)}
        rs = [b["recon_s"] for b in blocks if "recon_s" in b]
        if rs:
            out.update({"recon_s_total": round(sum(rs), 1), "recon_s_per_block": round(sum(rs) / len(rs), 2),
                        "recon_kept": [int(b["recon_kept"]) for b in blocks if "recon_kept" in b]})
        return out

    import yaml

    def pairs(items):
        return {k: yaml.safe_load(v) for k, _, v in (kv.partition("=") for kv in items)}

    extra, fmt_extra = pairs(args.recon_set), pairs(args.fmt_set)
    quantizer = ({"type": "gptq", "damp": 0.01, "act_order": True, "static_groups": True}
                 if args.quantizer == "gptq" else {"type": "rtn"})

    def qk_recipe(recon: bool) -> dict:
        r = {"name": "recon-peer" if recon else "gptq-peer",
             "quantizer": quantizer,
             "format": {"type": "int", "bits": args.bits, "group_size": args.group_size, "sym": args.sym,
                        **fmt_extra},
             "block_plugins": [], "ignore": ["lm_head"],
             "calibration": {"samples": args.samples, "seq_len": args.seq_len, "seed": 0, "corpus": "enwiki"}}
        if recon:
            r["block_plugins"] = [{"type": "recon", "iters": args.iters, "batch_size": args.batch,
                                   "autocast": args.autocast, **extra}]
        return r

    if "float" not in args.skip:
        score(copy.deepcopy(lm.model), "float", 0.0, 32.0, os.getloadavg()[0])
    if "gptq" not in args.skip:
        load0, t = os.getloadavg()[0], time.time()
        qm = quantkit.quantize(copy.deepcopy(lm.model), qk_recipe(False), calibration=ids, progress=False)
        secs = time.time() - t
        fopts = "".join(f" {k}={v}" for k, v in fmt_extra.items())
        score(qm.model, f"quantkit {args.quantizer}{fopts} int{args.bits} {sym} g{args.group_size}", secs,
              round(qm.bits_per_weight(), 4), load0, extra=report_stats(qm))
    if "autoround" not in args.skip:
        from auto_round import AutoRound

        model = copy.deepcopy(lm.model)
        float_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        load0, t = os.getloadavg()[0], time.time()
        ar = AutoRound(model, lm.tokenizer, bits=args.bits, group_size=args.group_size, sym=args.sym,
                       iters=args.iters, nsamples=args.samples, seqlen=args.seq_len, batch_size=args.batch,
                       dataset=list(ids.split(args.batch)), device_map="cpu", seed=0)
        ar.quantize()
        secs = time.time() - t
        torch.set_num_threads(args.threads or torch.get_num_threads())  # auto-round may change it
        bpw = args.bits + (16 + (0 if args.sym else args.bits)) / args.group_size  # fp16 scale (+ zero) / group
        score(model, f"auto-round int{args.bits} {sym} g{args.group_size}", secs, round(bpw, 4), load0,
              _grid_check(model, float_sd, args.bits, args.group_size))
    if "quantkit" not in args.skip:
        load0, t = os.getloadavg()[0], time.time()
        qm = quantkit.quantize(copy.deepcopy(lm.model), qk_recipe(True), calibration=ids, progress=False)
        secs = time.time() - t
        opts = "".join(f" {k}={v}" for k, v in {**extra, **fmt_extra}.items())
        score(qm.model, f"quantkit {args.quantizer}+recon{opts} int{args.bits} {sym} g{args.group_size}",
              secs, round(qm.bits_per_weight(), 4), load0, extra=report_stats(qm))
    fl = rows[0]["ppl"] if rows and rows[0]["method"] == "float" else float("nan")
    print(f"\n{args.model}, calibration {args.samples} x {args.seq_len}, {args.iters} steps of {args.batch} "
          f"sequences, eval {args.max_windows} x {args.seq_len}, torch threads {torch.get_num_threads()}")
    print("| method | ppl | gap | quantize s | bits/weight | note |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ppl']:.2f} | {r['ppl'] - fl:+.2f} | {r['seconds']} | {r['bits_per_weight']} "
              f"| {r['note']} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"autoround_peer_w{args.bits}g{args.group_size}{sym}{args.tag}.json")
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}
    with open(path + ".tmp", "w") as f:
        json.dump({"args": vars(args), "machine": machine, "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
