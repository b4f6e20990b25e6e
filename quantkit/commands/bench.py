"""quantkit bench {kernels,decode,sass} [options]: the benchmarks in bench/ (see docs/PERFORMANCE.md)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from ..errors import QuantkitError

_SCRIPTS = {"kernels": "kernel_bench.py", "decode": "decode.py", "sass": "sass_count.py"}


def register(sub) -> None:
    p = sub.add_parser("bench", help="GPU benchmarks: Triton kernels vs cuBLAS bf16, end-to-end decode",
                       description="Runs bench/kernel_bench.py or bench/decode.py from the source tree; options after "
                                   "the benchmark name go to the script (try: quantkit bench kernels --help).")
    p.add_argument("which", choices=sorted(_SCRIPTS), help="kernels: per-layer kernel table; decode: tokens/s "
                   "(both GPU); sass: a kernel's loop instructions for sm_90, compiled without a GPU")
    p.add_argument("args", nargs=argparse.REMAINDER, help="options passed to the script")
    p.set_defaults(func=run)


def _load(which: str):
    path = Path(__file__).resolve().parents[2] / "bench" / _SCRIPTS[which]
    if not path.exists():
        raise QuantkitError(f"bench {which}: {path} not found; the benchmarks live in the source tree's bench/ "
                            f"folder (run from a git checkout installed with pip install -e)")
    spec = importlib.util.spec_from_file_location(f"quantkit_bench_{which}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(args) -> int:
    return int(_load(args.which).main(args.args) or 0)
