"""Merge kernel_sweep.py results into a tuned table, by the project's rule: a measured config
replaces the shipped one ("tuned" in the sweep) only where it beat it by at least --gain (5 %) in
*every* run given (same device; runs of one call or one warm machine), and it is the candidate
with the best worst-run speedup. Prints what changed and why; writes the table atomically.

    python bench/tuned_merge.py kernels/src/tuned_h100_80gb_hbm3.json RUN1/sweep.json RUN2/sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def picks(runs: list[dict], gain: float) -> tuple[dict, dict, list[str]]:
    """{tuned key: config} of the winners, {key: config} of the shipped configs that were kept, and one
    line per key decided."""
    by_key: dict[str, list[dict]] = {}
    for run in runs:
        for row in run["rows"]:
            for kind, key in row.get("keys", {}).items():
                by_key.setdefault(key, []).append(row.get(kind) or {})
    out, kept, log = {}, {}, []
    for key, results in sorted(by_key.items()):
        if len(results) < len(runs) or any("tuned" not in r for r in results):
            log.append(f"{key}: skipped (not in every run, or the shipped config failed)")
            continue
        names = set.intersection(*(set(r) for r in results)) - {"tuned"}
        best, best_min = None, 0.0
        for n in sorted(names):
            if any(r[n]["cfg"] != results[0][n]["cfg"] for r in results):
                continue
            worst = min(r["tuned"]["us"] / r[n]["us"] for r in results)
            if worst > best_min:
                best, best_min = n, worst
        if best is not None and best_min >= 1.0 + gain:
            out[key] = results[0][best]["cfg"]
            log.append(f"{key}: {best} x{best_min:.2f} over shipped in every run")
        else:
            log.append(f"{key}: shipped kept (best {best} x{best_min:.2f})")
            if all(r["tuned"].get("cfg") == results[0]["tuned"].get("cfg") for r in results) \
                    and results[0]["tuned"].get("cfg") is not None:
                kept[key] = results[0]["tuned"]["cfg"]
    return out, kept, log


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--gain", type=float, default=0.05)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    runs = [json.loads(Path(p).read_text()) for p in a.runs]
    devs = {r["info"]["device"] for r in runs}
    if len(devs) != 1:
        sys.exit(f"tuned_merge: runs from different devices {sorted(devs)}: merge one device's runs at a time")
    new, kept, log = picks(runs, a.gain)
    print("\n".join(log))
    p = Path(a.table)
    t = json.loads(p.read_text()) if p.exists() else {}
    # a kept config the table had no entry for was the default: written down, so that the measured choice
    # stands (a missing bucket would otherwise take a neighbour bucket's config at run time)
    recorded = {k: c for k, c in kept.items() if k not in t}
    t.update(recorded)
    t.update(new)
    if not a.dry_run:
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(t, indent=0, sort_keys=True) + "\n")
        os.replace(tmp, p)
    print(f"{len(new)} configs {'would be ' if a.dry_run else ''}merged into {p} ({devs.pop()}); "
          f"{len(recorded)} kept defaults recorded for buckets that had no entry")
    return 0


if __name__ == "__main__":
    sys.exit(main())
