"""Zero-shot accuracy of saved checkpoints against the float model, document by document.

    python -P bench/zeroshot_paired.py smollm2-135m runs/x/w4a16-recon --tasks sciq,arc_easy,piqa --limit 0

Scores the float model (first argument: a bundled name or a float folder) and each checkpoint on the same
documents (``quantkit.eval.tasks``), prints each task's accuracies and the paired difference (checkpoint minus
float, in points, ± the paired standard error) and writes them as JSON (``--json``). Unlike ``quantkit run``
it quantizes nothing: it reads checkpoints already saved.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import quantkit
from quantkit.eval.tasks import evaluate_tasks, paired_difference


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("float_model")
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--tasks", default="sciq,arc_easy,piqa")
    ap.add_argument("--limit", type=int, default=0, help="documents per task (0 = all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    limit = args.limit or None
    rows = {}
    for path in [args.float_model] + args.checkpoints:
        qm = quantkit.load_any(path)
        t0 = time.time()
        rows[path] = evaluate_tasks(qm.model, qm.tokenizer, args.tasks, limit=limit, bos_token_id=qm.bos_token_id,
                                    device="cpu", progress=False)
        print(f"{path}: scored in {time.time() - t0:.0f} s", flush=True)
        del qm
    f = rows[args.float_model]
    print("\n| checkpoint | task | n | acc | Δacc (paired) | acc_norm | Δacc_norm (paired) |\n|---|---|---|---|---|---|---|")
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "machine": platform.processor(),
           "threads": torch.get_num_threads(), "float": args.float_model, "rows": []}
    for path, res in rows.items():
        for t, m in res.items():
            row = {"checkpoint": path, "task": t, "n": m["n"], "acc": m["acc"], "acc_norm": m["acc_norm"],
                   "acc_stderr": m["acc_stderr"], "acc_norm_stderr": m["acc_norm_stderr"]}
            cells = []
            for k in ("correct", "correct_norm"):
                if path == args.float_model:
                    cells.append("—")
                    continue
                d, se = paired_difference(f[t][k], m[k])
                row[f"d_{k}"], row[f"d_{k}_se"] = d, se
                cells.append(f"{100 * d:+.1f} ± {100 * se:.1f}")
            print(f"| {path} | {t} | {m['n']} | {m['acc']:.3f} ± {m['acc_stderr']:.3f} | {cells[0]} | "
                  f"{m['acc_norm']:.3f} ± {m['acc_norm_stderr']:.3f} | {cells[1]} |")
            out["rows"].append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
