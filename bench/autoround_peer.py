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
quantkit runs GPTQ + recon with the same bits, group, iters and batch. One table row each, with wall
times; JSON under $OUT (or --out). ``--smoke``: 1 step, 4 x 64 tokens, 2 windows (a plumbing check).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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
    ap.add_argument("--skip", choices=["quantkit", "autoround"], action="append", default=[])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if args.smoke:
        args.iters, args.samples, args.seq_len, args.max_windows, args.batch = 1, 4, 64, 2, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import quantkit
    from quantkit.api import QuantizedModel
    from quantkit.data import calibration_batch
    from quantkit.models import load_float_model

    lm = load_float_model(args.model)
    ids = calibration_batch(lm.tokenizer, args.samples, args.seq_len, 0, "enwiki", lm.bos_token_id)
    rows = []

    def score(model, name, secs, bpw, note=""):
        qm = QuantizedModel(model, lm.tokenizer, lm.source, lm.path, {"float": True})
        ev = quantkit.evaluate(qm, seq_len=args.seq_len, max_windows=args.max_windows, device="cpu", progress=False)
        ppl = ev["ppl"]
        rows.append({"method": name, "ppl": float(ppl), "seconds": round(secs, 1), "bits_per_weight": bpw,
                     "note": note})
        print(rows[-1], flush=True)

    score(copy.deepcopy(lm.model), "float", 0.0, 32.0)
    if "autoround" not in args.skip:
        from auto_round import AutoRound

        model = copy.deepcopy(lm.model)
        float_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        t = time.time()
        ar = AutoRound(model, lm.tokenizer, bits=args.bits, group_size=args.group_size, sym=args.sym,
                       iters=args.iters, nsamples=args.samples, seqlen=args.seq_len, batch_size=args.batch,
                       dataset=list(ids.split(args.batch)), device_map="cpu", seed=0)
        ar.quantize()
        secs = time.time() - t
        score(model, f"auto-round int{args.bits} {'sym' if args.sym else 'asym'} g{args.group_size}", secs, None,
              _grid_check(model, float_sd, args.bits, args.group_size))
    if "quantkit" not in args.skip:
        recipe = {"name": "recon-peer",
                  "quantizer": {"type": "gptq", "damp": 0.01, "act_order": True, "static_groups": True},
                  "format": {"type": "int", "bits": args.bits, "group_size": args.group_size, "sym": args.sym},
                  "block_plugins": [{"type": "recon", "iters": args.iters, "batch_size": args.batch}],
                  "ignore": ["lm_head"],
                  "calibration": {"samples": args.samples, "seq_len": args.seq_len, "seed": 0, "corpus": "enwiki"}}
        t = time.time()
        qm = quantkit.quantize(copy.deepcopy(lm.model), recipe, calibration=ids, progress=False)
        secs = time.time() - t
        score(qm.model, f"quantkit gptq+recon int{args.bits} {'sym' if args.sym else 'asym'} g{args.group_size}",
              secs, round(qm.bits_per_weight(), 4))
    fl = rows[0]["ppl"]
    print(f"\n{args.model}, calibration {args.samples} x {args.seq_len}, {args.iters} steps of {args.batch} "
          f"sequences, eval {args.max_windows} x {args.seq_len}, torch threads {torch.get_num_threads()}")
    print("| method | ppl | gap | quantize s | bits/weight | note |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ppl']:.2f} | {r['ppl'] - fl:+.2f} | {r['seconds']} | {r['bits_per_weight']} "
              f"| {r['note']} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"autoround_peer_w{args.bits}g{args.group_size}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
