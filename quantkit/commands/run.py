"""quantkit run MODEL -r RECIPE [-r RECIPE ...] -o OUT: quantize, reload, evaluate, compare."""

from __future__ import annotations

from ._common import add_calibration_args, add_eval_args, eval_kwargs, format_table


def register(sub) -> None:
    p = sub.add_parser("run", help="quantize with each recipe, reload, evaluate with the float model, print the table",
                       description="The whole loop. Each checkpoint is saved, reloaded from disk and evaluated "
                                   "on held-out text beside the float model.")
    p.add_argument("model", help="bundled model name or HF model folder")
    p.add_argument("-r", "--recipe", action="append", required=True, help="recipe (repeatable)")
    p.add_argument("-o", "--output", default="runs/latest", help="output folder (default runs/latest)")
    p.add_argument("--overwrite", action="store_true", help="replace existing checkpoints in the output folder")
    p.add_argument("--device", default=None)
    add_calibration_args(p)
    add_eval_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import runner

    res = runner.run(args.model, args.recipe, args.output, device=args.device, eval_kwargs=eval_kwargs(args),
                     calib_overrides={"samples": args.samples, "seq_len": args.seq_len, "seed": args.seed,
                                      "batch_size": args.batch_size},
                     overwrite=args.overwrite)
    es = res["eval_settings"]
    print(f"\n{res['model']}: perplexity on {es['corpus']} {es['split']}; {es['tokens_scored']} tokens in "
          f"{es['windows']} windows of {es['seq_len']} (stride {es['stride']}, BOS {es['bos']})")
    for r in res["runs"][1:]:
        c = r.get("calibration") or {}
        print(f"  {r['name']}: calibration {c.get('samples')} x {c.get('seq_len')} tokens from {c.get('corpus')} "
              f"{c.get('split', '')}, seed {c.get('seed')}")
    print()
    print(format_table(runner.summary_rows(res), ["scheme", "bits/weight", "ppl", "gap to float", "quantize s"]))
    print(f"\nresults: {args.output}/results.json")
    return 0
