"""quantkit eval PATH_OR_NAME [--float MODEL]"""

from __future__ import annotations

from ._common import add_eval_args, eval_kwargs, format_table


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a checkpoint or float model on held-out text",
                       description="Token-level perplexity on the evaluation split (odd-numbered articles of the "
                                   "corpus; calibration uses the even-numbered ones, so they never overlap).")
    p.add_argument("model", nargs="+", help="checkpoint folder(s), bundled model name(s) or HF folder(s)")
    p.add_argument("--float", dest="float_model", default=None,
                   help="also evaluate this float model (bundled name or folder) as the baseline")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_eval_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from .. import api

    targets = ([args.float_model] if args.float_model else []) + list(args.model)
    rows = []
    for t in targets:
        r = api.evaluate(t, device=args.device, **eval_kwargs(args))
        r["model"] = t + (" (float)" if t == args.float_model else "")
        rows.append(r)
    first = rows[0]
    print(f"\nperplexity on {first['corpus']} {first['split']}: {first['tokens_scored']} tokens scored, "
          f"{first['windows']} windows of {first['seq_len']} tokens, stride {first['stride']}, "
          f"BOS per window: {first['bos']}\n")
    print(format_table(rows, ["model", "ppl", "tokens_scored", "seconds"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
