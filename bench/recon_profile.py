"""Where recon's time goes on one real decoder block (issue 19): a per-phase time table.

Runs quantkit's GPTQ on smollm2-135m up to the first block's recon hook, keeps that block, its
calibration inputs and float outputs, then times recon's step phases on it (the same calls as
the recon training loop (quantkit/transforms/_recon_train.py), timed apart): quantize-dequantize of every linear (``_FakeQuant`` or the old
small-op chain), the block forward (fp32 or bf16 autocast), the backward, the sign update + clamp,
the best-iterate copy, and the final whole-calibration evaluations. Then the plugin itself
(``Recon.after_block``) end to end on a copy of the block, for each variant. Deterministic inputs;
times are wall-clock and depend on the machine's load (printed)::

    nice -n -5 python -P bench/recon_profile.py --threads 1 --iters 10 --batch 4
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch


class _Stop(Exception):
    pass


def capture(model_name: str, samples: int, seq_len: int, bits: int, group: int, sym: bool):
    import quantkit
    from quantkit.data import calibration_batch
    from quantkit.models import load_float_model
    from quantkit.transforms.recon import Recon

    lm = load_float_model(model_name)
    ids = calibration_batch(lm.tokenizer, samples, seq_len, 0, "enwiki", lm.bos_token_id)
    got = {}
    orig = Recon.after_block

    def hook(self, block, inputs, kwargs, float_outputs, forward):
        got.update(block=copy.deepcopy(block), inputs=inputs, kwargs=kwargs, targets=float_outputs,
                   forward=forward, floats={k: v.clone() for k, v in self._float.items()}, prefix=self._prefix)
        raise _Stop

    Recon.after_block = hook
    recipe = {"quantizer": {"type": "gptq", "damp": 0.01, "act_order": True, "static_groups": True},
              "format": {"type": "int", "bits": bits, "group_size": group, "sym": sym},
              "block_plugins": [{"type": "recon", "iters": 1}], "ignore": ["lm_head"],
              "calibration": {"samples": samples, "seq_len": seq_len, "seed": 0, "corpus": "enwiki"}}
    try:
        quantkit.quantize(lm.model, recipe, calibration=ids, progress=False)
    except _Stop:
        pass
    finally:
        Recon.after_block = orig
    return got


def phases(got, iters: int, batch: int, fake: bool, amp: bool) -> dict[str, float]:
    from quantkit.transforms.recon import Recon, ReconConfig, _Layer, _Sampler

    block = copy.deepcopy(got["block"])
    mods = dict(block.named_modules())
    layers = [_Layer(n, mods[n], w, "quantizer", True) for n, w in got["floats"].items() if n in mods]
    for p in block.parameters():
        p.requires_grad_(False)
    sampler = _Sampler(got["inputs"], got["kwargs"], got["targets"], batch, 0)
    params = [p for L in layers for p in L.params()]
    t = dict.fromkeys(["draw", "fakequant", "forward", "backward", "update+clamp", "best copy"], 0.0)
    best = float("inf")
    clock = time.perf_counter
    for it in range(iters):
        c0 = clock()
        h, kw, f = sampler.draw(torch.device("cpu"))
        c1 = clock()
        with torch.enable_grad():
            for L in layers:
                L.ql.dense_weight = L.dequant() if fake else L.dequant_reference()
            c2 = clock()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = got["forward"](block, h, kw)
            ref = f.float()
            loss = (out.float() - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)
            c3 = clock()
            grads = torch.autograd.grad(loss, params)
        c4 = clock()
        lv = float(loss)
        lr = (1.0 / iters) * (1.0 - it / iters)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * torch.sign(g))
        for L in layers:
            L.clamp_((0.5, 1.0))
        c5 = clock()
        if lv < best:
            best = lv
            _ = [L.state() for L in layers]
        c6 = clock()
        for k, a, b in (("draw", c0, c1), ("fakequant", c1, c2), ("forward", c2, c3), ("backward", c3, c4),
                        ("update+clamp", c4, c5), ("best copy", c5, c6)):
            t[k] += b - a
    for L in layers:
        L.ql.dense_weight = None
        L.write()
    c0 = clock()
    Recon._block_error(block, got["inputs"], got["kwargs"], got["targets"], got["forward"], torch.device("cpu"))
    t["one full evaluation"] = clock() - c0
    out = {k: v / iters for k, v in t.items() if k != "one full evaluation"}
    out["step total"] = sum(out.values())
    out["one full evaluation"] = t["one full evaluation"]
    # the plugin end to end
    block = copy.deepcopy(got["block"])
    plugin = Recon(ReconConfig(iters=iters, batch_size=batch, autocast="on" if amp else "off"))
    plugin._float, plugin._prefix = {k: v.clone() for k, v in got["floats"].items()}, got["prefix"]
    if not fake:  # the old path: dequant through the small-op chain
        from quantkit.transforms import recon as R
        keep, R._Layer.dequant = R._Layer.dequant, R._Layer.dequant_reference
    try:
        c0 = clock()
        m = plugin.after_block(block, got["inputs"], got["kwargs"], got["targets"], got["forward"])
        out["after_block total"] = clock() - c0
    finally:
        if not fake:
            R._Layer.dequant = keep
    out["err before"], out["err after"] = m["recon_err_before"], m["recon_err_after"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, action="append", help="repeat for several (default 1 and 2)")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = args.threads or [1, 2]
    torch.set_num_threads(max(threads))
    got = capture(args.model, args.samples, args.seq_len, args.bits, args.group_size, not args.asym)
    variants = [("small-op chain, fp32 (before)", False, False), ("_FakeQuant, fp32", True, False),
                ("_FakeQuant, bf16 autocast", True, True)]
    results = []
    for n in threads:
        torch.set_num_threads(n)
        for name, fake, amp in variants:
            load0 = os.getloadavg()[0]
            r = phases(got, args.iters, args.batch, fake, amp)
            r.update(variant=name, threads=n, load_start=round(load0, 2), load_end=round(os.getloadavg()[0], 2))
            results.append(r)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    keys = ["draw", "fakequant", "forward", "backward", "update+clamp", "best copy", "step total",
            "one full evaluation", "after_block total"]
    print(f"\n{args.model} block 0 ({got['prefix']}), int{args.bits} {'asym' if args.asym else 'sym'} "
          f"g{args.group_size}, {args.iters} steps x {args.batch} x {args.seq_len} tokens, calibration "
          f"{args.samples} x {args.seq_len}; seconds (per step for the step phases)")
    print("| threads | variant | " + " | ".join(keys) + " | err after |")
    print("|---" * (len(keys) + 3) + "|")
    for r in results:
        print(f"| {r['threads']} | {r['variant']} | " + " | ".join(f"{r[k]:.3f}" for k in keys)
              + f" | {r['err after']:.4e} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
