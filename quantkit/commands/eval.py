"""quantkit eval PATH_OR_NAME [--float MODEL]"""

from __future__ import annotations

from ._common import add_eval_args, add_model_args, count_int, eval_kwargs, format_table, positive_int


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a checkpoint or float model on held-out text",
                       description="Token-level perplexity on the evaluation split (odd-numbered articles of the "
                                   "corpus; calibration uses the even-numbered ones, so they never overlap).")
    p.add_argument("model", nargs="+", help="checkpoint folder(s), bundled model name(s) or HF folder(s)")
    p.add_argument("--float", dest="float_model", default=None,
                   help="also evaluate this float model (bundled name or folder) as the baseline")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--kv-bits", default=None,
                   help="evaluate with a quantized KV cache in the attention path: k4v2 (key/value bits, 16 = "
                        "float), k4v2-r64-gk32-gv32 (residual, key/value groups), 'float' or an allocation JSON; "
                        "the windows are fed in chunks of --kv-chunk tokens so attention reads the cache")
    p.add_argument("--kv-chunk", type=positive_int, default=64, help="prefill chunk for --kv-bits (default 64)")
    add_eval_args(p)
    add_model_args(p)
    p.add_argument("--tasks", default="none",
                   help="also score zero-shot tasks: comma-separated names, 'quick' or 'all' (default none)")
    p.add_argument("--limit", type=count_int, default=None, help="documents per task, the first N (default all)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from .. import api

    if args.tasks != "none":  # unknown task names fail before any perplexity run
        from ..eval.tasks import parse_tasks

        parse_tasks(args.tasks)
    targets = ([args.float_model] if args.float_model else []) + list(args.model)
    rows = []
    for i, t in enumerate(targets):
        is_float = bool(args.float_model) and i == 0
        if args.kv_bits:
            from ..kv import evaluate_with_kv

            kw = eval_kwargs(args)
            if kw.get("stride"):
                from ..errors import QuantkitError

                raise QuantkitError("--kv-bits scores disjoint windows (chunked through the cache); drop --stride")
            qm = api.load_any(t)
            spec = "float" if is_float else args.kv_bits  # the baseline: float cache through the same path
            r = evaluate_with_kv(qm, None, spec, seq_len=kw["seq_len"], max_windows=kw["max_windows"],
                                 chunk=args.kv_chunk, corpus=kw["corpus"],
                                 device=args.device or api.default_device())
            r.pop("allocation", None)
            r["stride"] = r["seq_len"]
            r["kv_bytes_per_token"] = round(r["kv_bytes_per_token"] or 0)
            r["model"] = f"{t} [kv {spec}]"
        else:
            r = api.evaluate(t, device=args.device, **eval_kwargs(args))
            r["model"] = t
        r["model"] += " (float)" if is_float else ""
        if args.tasks != "none":
            from ..eval.tasks import evaluate_tasks

            qm = api.load_any(t)
            print(f"{r['model']}:")
            r["tasks"] = evaluate_tasks(qm.model, qm.tokenizer, args.tasks, limit=args.limit,
                                        bos_token_id=qm.bos_token_id, device=args.device, log=print)
        rows.append(r)
    first = rows[0]
    print(f"\nperplexity on {first['corpus']} {first['split']}: {first['tokens_scored']} tokens scored, "
          f"{first['windows']} windows of {first['seq_len']} tokens, stride {first['stride']}, "
          f"BOS per window: {first['bos']}\n")
    cols = ["model", "ppl", "tokens_scored", "seconds"]
    if args.kv_bits:
        cols[2:2] = ["avg_bits", "kv_bytes_per_token"]
        print(f"KV cache {args.kv_bits}: windows fed in chunks of {args.kv_chunk} tokens; KV bytes per token "
              f"after a full window (16-bit residual), float16 KV = {first['float16_bytes_per_token']} bytes/token\n")
    print(format_table(rows, cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
