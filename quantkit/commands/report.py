"""quantkit report RUN [RUN ...] [-o OUT]: render the report from saved results JSON alone."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="write report.md and report.html from one or more runs' results.json",
                       description="Render the Markdown and self-contained HTML report (table of every checkpoint, "
                                   "bits/weight vs perplexity plot with the Pareto front, per-layer errors, "
                                   "generations, versions) from saved results JSON; nothing is recomputed.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder (holding results.json) or a results JSON file")
    p.add_argument("-o", "--output", default=None,
                   help="folder for report.md / report.html (default: the first RUN folder)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from ..eval.report import load_results, write_report

    results, sources = [], []
    from ..checks import check_results

    for r in args.runs:
        res = load_results(r)
        check_results(res, r)
        results.append(res)
        sources.append(os.path.join(r, "results.json") if os.path.isdir(r) else r)
    first = args.runs[0]
    out = args.output or (first if os.path.isdir(first) else os.path.dirname(os.path.abspath(first)))
    paths = write_report(results, out, sources=sources)
    print(f"wrote {paths['markdown']}\nwrote {paths['html']}")
    return 0
