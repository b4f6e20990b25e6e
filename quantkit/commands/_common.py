"""Helpers shared by the CLI sub-commands."""

from __future__ import annotations


def add_calibration_args(p) -> None:
    g = p.add_argument_group("calibration (override the recipe)")
    g.add_argument("--samples", type=int, help="number of calibration sequences")
    g.add_argument("--seq-len", type=int, help="tokens per calibration sequence")
    g.add_argument("--seed", type=int, help="seed for drawing calibration windows")
    g.add_argument("--batch-size", type=int, help="calibration sequences per forward")


def add_eval_args(p) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-seq-len", type=int, default=512, help="tokens per perplexity window (default 512)")
    g.add_argument("--stride", type=int, default=None, help="window stride (default: = seq len, disjoint windows)")
    g.add_argument("--windows", type=int, default=40, help="number of windows scored (default 40; 0 = all)")
    g.add_argument("--corpus", default="enwiki", help="evaluation corpus (default enwiki)")


def eval_kwargs(args) -> dict:
    return {"corpus": args.corpus, "seq_len": args.eval_seq_len, "stride": args.stride,
            "max_windows": args.windows or None}


def format_table(rows: list[dict], cols: list[str]) -> str:
    """A Markdown table (also readable in a terminal)."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}"
        return "" if v is None else str(v)
    data = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(d[i]) for d in data)) if data else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(d) for d in data]
    return "\n".join(out)
