"""quantkit run MODEL -r RECIPE [-r RECIPE ...] -o OUT: quantize, reload, evaluate, compare, report."""

from __future__ import annotations

from ._common import add_calibration_args, add_eval_args, count_int, eval_kwargs, format_table


def register(sub) -> None:
    p = sub.add_parser("run",
                       help="quantize with each recipe, reload, evaluate beside the float model, write the report",
                       description="The whole loop. Each checkpoint is saved, reloaded from disk and evaluated "
                                   "beside the float model: perplexity on held-out text (token and word level), "
                                   "zero-shot tasks, KL divergence and top-1 agreement with the float model, "
                                   "greedy generations. Writes OUT/results.json, OUT/report.md and OUT/report.html.")
    p.add_argument("model", help="bundled model name or HF model folder")
    p.add_argument("-r", "--recipe", action="append", required=True, help="recipe (repeatable)")
    p.add_argument("-o", "--output", default="runs/latest", help="output folder (default runs/latest)")
    p.add_argument("--overwrite", action="store_true", help="replace existing checkpoints in the output folder")
    p.add_argument("--device", default=None)
    add_calibration_args(p)
    add_eval_args(p)
    g = p.add_argument_group("quality suite")
    g.add_argument("--tasks", default=None,
                   help="zero-shot tasks: comma-separated names, 'quick' (default: hellaswag,piqa,arc_easy,"
                        "winogrande), 'all' or 'none'; see docs/quality/tasks.md")
    g.add_argument("--limit", type=count_int, default=None,
                   help="documents per task, the first N in file order (default 100; 0 = every document)")
    g.add_argument("--corpora", default=None,
                   help="perplexity corpora besides --corpus: 'lambada', 'all' (enwiki,lambada) or 'none'")
    g.add_argument("--kl-windows", type=count_int, default=8,
                   help="windows of --eval-seq-len tokens for KL / top-1 agreement with the float model (0 = skip)")
    g.add_argument("--generations", type=count_int, default=2, help="greedy generations shown side by side (0 = skip)")
    g.add_argument("--no-report", action="store_true", help="write results.json only")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.deterministic:  # before the float model's evaluation, the first GPU work (quantkit.determinism)
        from ..determinism import for_process

        for_process()
    from .. import runner

    res = runner.run(args.model, args.recipe, args.output, device=args.device, eval_kwargs=eval_kwargs(args),
                     calib_overrides={"samples": args.samples, "seq_len": args.seq_len, "seed": args.seed,
                                      "batch_size": args.batch_size, "path": args.calibration_data,
                                      "field": args.calibration_field},
                     deterministic=args.deterministic,
                     overwrite=args.overwrite, tasks=args.tasks, limit=args.limit, corpora=args.corpora,
                     kl_windows=args.kl_windows, generations=args.generations, report=not args.no_report)
    es = res["eval_settings"]
    print(f"\n{res['model']}: perplexity on {es['corpus']} {es['split']}; {es['tokens_scored']} tokens in "
          f"{es['windows']} windows of {es['seq_len']} (stride {es['stride']}, BOS {es['bos']})")
    st = res.get("settings") or {}
    if st.get("tasks"):
        print(f"tasks (acc_norm; lambada: acc): {', '.join(st['tasks'])}; "
              f"{'first ' + str(st['limit']) + ' documents each' if st.get('limit') else 'every document'}")
    for r in res["runs"][1:]:
        c = r.get("calibration") or {}
        if r.get("calibration_tokens") == 0:
            print(f"  {r['name']}: data-free (no calibration data used)")
            continue
        src = " ".join(str(v) for v in (c.get("corpus"), c.get("split")) if v)
        print(f"  {r['name']}: calibration {c.get('samples')} x {c.get('seq_len')} tokens from {src}"
              + (f", seed {c['seed']}" if c.get("seed") is not None else ""))
    print()
    rows = runner.summary_rows(res)
    cols = ["scheme", "bits/weight", "ppl", "gap to float", "KL", "top-1 agree"] + list(st.get("tasks") or []) + \
        ["quantize s"]
    print(format_table(rows, cols))
    print(f"\nresults: {args.output}/results.json")
    if res.get("report"):
        print(f"report:  {res['report']['html']}\n         {res['report']['markdown']}")
    return 0
