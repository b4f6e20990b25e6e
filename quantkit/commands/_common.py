"""Helpers shared by the CLI sub-commands."""

from __future__ import annotations


def _int_at_least(lo: int, what: str, hi: int | None = None):
    def parse(s: str) -> int:
        import argparse

        try:
            if s.strip() != s:
                raise ValueError
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lo or (hi is not None and v >= hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _int_at_least(1, "a positive integer")
count_int = _int_at_least(0, "an integer >= 0")
seed_int = _int_at_least(0, "an integer seed >= 0 and < 2**63", hi=2 ** 63)


def add_model_args(p) -> None:
    p.add_argument("--allow-missing", action="append", metavar="PATTERN", default=None,
                   help="accept float model tensors matching PATTERN (glob on the tensor name, repeatable) that are "
                        "missing from, or unexpected in, the model folder; without it any such tensor is an error")


def add_calibration_args(p) -> None:
    g = p.add_argument_group("calibration (override the recipe)")
    g.add_argument("--samples", type=positive_int, help="number of calibration sequences")
    g.add_argument("--seq-len", type=positive_int, help="tokens per calibration sequence (at least the recipe's "
                                                        "minimum, at most the model's positions)")
    g.add_argument("--seed", type=seed_int, help="seed for drawing calibration windows")
    g.add_argument("--batch-size", type=positive_int, help="calibration sequences per forward")
    g.add_argument("--calibration-data", metavar="FILE", default=None,
                   help="calibrate on your own text instead of the bundled corpus: a .txt file, a .jsonl file (one "
                        "JSON object per line), a .json list, or a .safetensors file with input_ids [N, L]; "
                        "windows are drawn from it with --seed")
    g.add_argument("--calibration-field", metavar="KEY", default=None,
                   help="the text's key in the objects of a .jsonl/.json file (default text)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels: the same seed gives the same codes run to run on the same GPU "
                        "(about 30%% slower on an H100; the CPU path is deterministic without it)")
    add_model_args(p)


def add_eval_args(p) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-seq-len", type=positive_int, default=512, help="tokens per perplexity window (default 512)")
    g.add_argument("--stride", type=positive_int, default=None,
                   help="window stride (default: = seq len, disjoint windows)")
    g.add_argument("--windows", type=count_int, default=40, help="number of windows scored (default 40; 0 = all)")
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
