"""Where a streamed GPTQ run's peak CPU memory (RSS) goes, step by step, on a checkpoint written by
bench/stream_memory.py (``--keep``).

    nice -n 10 python -P bench/gptq_memory_trace.py /work/tmp/stream-3b [--blocks 1]

Runs ``quantkit.quantize(..., load="stream")`` with GPTQ (the recipe of bench/stream_memory.py) in this
process, with a thread that samples ``VmRSS`` (/proc/self/status) every ~2 ms. The pipeline's and GPTQ's
steps are wrapped so each sample is charged to the innermost step running; prints, per step (in order
of first entry), the RSS on entry and the highest RSS seen inside it (with that sample's ``RssAnon``), the
process's VmHWM at the end, and the highest sample's ``RssAnon``/``RssFile`` with the steps it fell in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

GIB = 1 << 30


class _Stop(Exception):
    pass


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith(field):
                return int(ln.split()[1]) * 1024
    return 0


def rss_parts() -> tuple[int, int, int]:
    """(VmRSS, RssAnon, RssFile) in bytes, from one read of /proc/self/status."""
    got = {}
    with open("/proc/self/status") as f:
        for ln in f:
            k = ln.split(":", 1)[0]
            if k in ("VmRSS", "RssAnon", "RssFile"):
                got[k] = int(ln.split()[1]) * 1024
    return got.get("VmRSS", 0), got.get("RssAnon", 0), got.get("RssFile", 0)


class Tracer:
    def __init__(self, period: float = 0.002):
        self.stack: list[str] = ["(outside)"]
        self.peak: dict[str, int] = {}
        self.entry: dict[str, int] = {}
        self.order: list[str] = []
        self.top = (0, 0, 0)  # (VmRSS, RssAnon, RssFile) of the highest sample
        self.top_stack: list[str] = []  # the steps running at that sample
        self.anon_at: dict[str, int] = {}  # RssAnon of each step's highest sample
        self.period = period
        self.stop = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _charge(self, parts: tuple[int, int, int]) -> None:
        rss = parts[0]
        with self.lock:
            for lab in self.stack:  # an outer step's peak includes its inner steps'
                if rss > self.peak.get(lab, 0):
                    self.peak[lab] = rss
                    self.anon_at[lab] = parts[1]
            if rss > self.top[0]:
                self.top, self.top_stack = parts, list(self.stack)

    def _run(self) -> None:
        while not self.stop:
            self._charge(rss_parts())
            time.sleep(self.period)

    def wrap(self, owner, attr: str, label: str | None = None, per_call=None) -> None:
        fn = getattr(owner, attr)
        tracer = self

        def wrapped(*a, **k):
            lab = label or attr
            if per_call is not None:
                lab = f"{lab}[{per_call(*a, **k)}]"
            parts = rss_parts()
            with tracer.lock:
                if lab not in tracer.entry:
                    tracer.entry[lab] = parts[0]
                    tracer.order.append(lab)
                tracer.stack.append(lab)
            tracer._charge(parts)
            try:
                return fn(*a, **k)
            finally:
                tracer._charge(rss_parts())
                with tracer.lock:
                    tracer.stack.pop()

        setattr(owner, attr, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--blocks", type=int, default=1, help="GPTQ on the first N blocks (default 1)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default=None)
    ap.add_argument("--stop-after", type=int, default=None,
                    help="abort the run once this block is propagated (its figures are complete; saves the float "
                         "forwards of the other blocks)")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from stream_memory import recipe_for
    sys.path.pop(0)

    import quantkit
    from quantkit import pipeline, solve
    from quantkit.quantizers import base as qbase
    from quantkit.quantizers import gptq

    tr = Tracer()
    seen: dict[str, int] = {}

    def blockname(block, *a, **k):
        return block.index

    def linname(name, *a, **k):
        return name.split("layers.", 1)[-1]

    def nth(label):
        def f(*a, **k):
            seen[label] = seen.get(label, 0) + 1
            return seen[label]
        return f

    tr.wrap(pipeline, "calibrate", per_call=blockname)
    tr.wrap(pipeline, "propagate", per_call=blockname)
    if args.stop_after is not None:
        inner = pipeline.propagate

        def propagate_then_stop(block, *a, **k):
            res = inner(block, *a, **k)
            if block.index >= args.stop_after:
                raise _Stop
            return res
        pipeline.propagate = propagate_then_stop
    tr.wrap(solve.LocalSolver, "solve", "solver.solve", per_call=lambda self, block, *a, **k: block.index)
    tr.wrap(solve, "solve_linear", per_call=linname)
    tr.wrap(gptq.GPTQ, "_factor", "gptq._factor", per_call=nth("factor"))
    tr.wrap(gptq, "inverse_hessian_factor", per_call=nth("ihf"))
    tr.wrap(gptq, "_inverse_factor", "gptq._inverse_factor", per_call=nth("inv"))
    from quantkit import stream
    tr.wrap(pipeline, "capture")
    tr.wrap(stream.StreamSource, "restore_rest", "StreamSource.restore_rest")
    tr.wrap(stream.StreamWriter, "finish", "StreamWriter.finish")
    tr.wrap(qbase, "output_error_terms", per_call=nth("oe"))
    # GPTQ's own steps: what is left of gptq.quantize outside these is its rounding loop and bookkeeping
    tr.wrap(gptq.GPTQ, "quantize", "gptq.quantize", per_call=nth("gq"))
    tr.wrap(gptq, "_scaled_hessian", "gptq._scaled_hessian", per_call=nth("sh"))
    tr.wrap(gptq._HessianSpill, "back", "spill.back", per_call=nth("back"))
    from quantkit.formats import int as qint
    tr.wrap(qint.IntFormat, "pack", "IntFormat.pack", per_call=nth("pack"))
    # after each linear's solve: its QuantLinear is built (which unpacks the packed weight once to validate
    # it), its statistics released and freed heap memory trimmed
    tr.wrap(solve, "make_quantlinear", "make_quantlinear", per_call=nth("mql"))
    tr.wrap(qint.IntFormat, "unpack", "IntFormat.unpack", per_call=nth("unpack"))
    tr.wrap(solve, "release_freed_memory", "release_freed_memory", per_call=nth("trim"))

    torch.manual_seed(0)
    with open(os.path.join(args.ckpt, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    ids = torch.randint(0, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    out = args.out or args.ckpt.rstrip("/") + "-trace-out"
    t = time.time()
    try:
        quantkit.quantize(args.ckpt, recipe_for("gptq", args.blocks), calibration=ids, device="cpu", load="stream",
                          dtype=torch.bfloat16, save_to=out, overwrite=True, progress=False, batch_size=4)
    except _Stop:
        print(f"stopped after block {args.stop_after}")
    tr.stop = True
    tr.thread.join()
    print(f"quantize {time.time() - t:.1f} s; VmHWM {status('VmHWM:') / GIB:.3f} GiB; "
          f"VmRSS now {status('VmRSS:') / GIB:.3f} GiB")
    print(f"highest sample: VmRSS {tr.top[0] / GIB:.3f} GiB (RssAnon {tr.top[1] / GIB:.3f}, RssFile "
          f"{tr.top[2] / GIB:.3f}) in {' > '.join(tr.top_stack)}")
    print("| step | RSS on first entry GiB | peak inside GiB | RssAnon at that peak GiB | peak - entry MiB |")
    print("|---|---|---|---|---|")
    for lab in tr.order:
        e, p = tr.entry[lab], tr.peak.get(lab, 0)
        print(f"| {lab} | {e / GIB:.3f} | {p / GIB:.3f} | {tr.anon_at.get(lab, 0) / GIB:.3f} | {(p - e) / (1 << 20):.0f} |")


if __name__ == "__main__":
    main()
