"""Streaming under torchrun: every rank reads its own copy of each block (``--dist-read all``) against rank 0
reading it and broadcasting it (``--dist-read rank0``), issue 17 item 5.

Writes a random Llama-shaped checkpoint (bf16, one shard per decoder block + one for the rest, with
model.safetensors.index.json; bench/stream_memory.py's writer) to ``--dir`` (default /tmp), then for each
recipe (RTN on every block, data-free; GPTQ on the first ``--blocks`` blocks, calibrated) and each read
mode runs ``python -m torch.distributed.run --nproc-per-node 2`` (gloo on CPU) of this file's worker,
which calls ``quantkit.quantize(..., save_to=OUT, dist_read=MODE)`` streamed, twice:

* **cold**: the checkpoint's pages are dropped from the OS page cache first (``posix_fadvise
  DONTNEED`` on every shard after ``sync``; no root needed, nothing else evicted) and the resident
  fraction is checked with ``mincore``; the launch is a fresh process tree either way;
* **warm**: the same run again at once (the shards are in the page cache; the fraction is recorded).

Per run: wall time of the launch (parent's clock: torchrun, imports, the quantize), the quantize call's
seconds (rank 0), each rank's seconds inside StreamSource reads (read + broadcast with rank0), each
rank's peak RSS (its own ``VmHWM``), the load average before and after, and a hash of the output
tensors (the two modes must write identical tensors). The checkpoint and the outputs are deleted at the
end unless ``--keep``. Prints a Markdown table; ``--json`` writes everything.

    nice -n -5 python bench/stream_dist.py --json docs/perf/stream-dist-2026-12-06.json
    python bench/stream_dist.py --smoke          # a tiny shape, seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

# bench/kernel_bench.py would shadow the PyPI ``kernels`` that transformers imports: drop this folder from the path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402

GIB = 1 << 30


def _stream_memory():
    import importlib.util

    spec = importlib.util.spec_from_file_location("stream_memory", os.path.join(_HERE, "stream_memory.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- the worker (one rank) -----------------------------------------------------------------------------
def worker(args) -> None:
    import torch.distributed as dist

    import quantkit
    from quantkit import stream

    sm = _stream_memory()
    read_s = [0.0]
    orig = stream.StreamSource._read

    def timed(self, *a, **kw):
        t = time.perf_counter()
        try:
            return orig(self, *a, **kw)
        finally:
            read_s[0] += time.perf_counter() - t
    stream.StreamSource._read = timed
    with open(os.path.join(args.ckpt, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    ids = torch.randint(0, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    t = time.time()
    qm = quantkit.quantize(args.ckpt, sm.recipe_for(args.kind, args.blocks if args.kind == "gptq" else None), calibration=ids, device="cpu",
                           dtype=getattr(torch, args.dtype), save_to=args.out, overwrite=True, progress=False,
                           batch_size=args.batch_size, dist_read=args.mode)
    seconds = time.time() - t
    mine = {"rank": dist.get_rank(), "quantize_s": round(seconds, 2), "read_s": round(read_s[0], 2),
            "vmhwm_gib": sm.own_peak_gib(), "load": qm.meta["load"], "layers": len(qm.report.layers)}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(every), flush=True)


# ---- page cache ----------------------------------------------------------------------------------------
def _shards(d: str) -> list[str]:
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))


def resident_fraction(d: str) -> float:
    """Fraction of the checkpoint's pages in the OS page cache (mincore over an mmap of each shard)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    have = total = 0
    for fp in _shards(d):
        size = os.path.getsize(fp)
        if not size:
            continue
        fd = os.open(fp, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {fp}")
            n = (size + page - 1) // page
            vec = (ctypes.c_ubyte * n)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {fp}")
            have += sum(b & 1 for b in vec)
            total += n
            libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return have / max(total, 1)


def drop_cache(d: str) -> None:
    """Evict the checkpoint's shards (only them) from the page cache."""
    os.sync()
    for fp in _shards(d):
        fd = os.open(fp, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- the parent --------------------------------------------------------------------------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outputs_hash(out: str) -> str:
    """Hash of every output tensor (name, dtype, shape, bytes), in name order: the files' own bytes differ
    from run to run (safetensors writes its ``__metadata__`` keys in hash-map order)."""
    from safetensors import safe_open

    h = hashlib.sha256()
    for fp in _shards(out):
        with safe_open(fp, framework="pt") as f:
            for k in sorted(f.keys()):
                t = f.get_tensor(k).contiguous()
                h.update(f"{k}:{t.dtype}:{list(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def run_one(args, kind: str, mode: str, cache: str, out: str) -> dict:
    if cache == "cold":
        drop_cache(args.dir)
    resident = resident_fraction(args.dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks), "--master-port",
           str(_port()), os.path.abspath(__file__), "--worker", "--ckpt", args.dir, "--kind", kind, "--mode", mode,
           "--out", out, "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--dtype", args.dtype,
           "--batch-size", str(args.batch_size), "--blocks", str(args.blocks)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    load_before = os.getloadavg()
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t
    if p.returncode != 0:
        raise SystemExit(f"{kind}/{mode}/{cache} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    ranks = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    return {"kind": kind, "mode": mode, "cache": cache, "resident_before": round(resident, 3),
            "wall_s": round(wall, 1), "quantize_s": ranks[0]["quantize_s"],
            "read_s": [r["read_s"] for r in ranks], "peak_rss_gib": [r["vmhwm_gib"] for r in ranks],
            "max_peak_rss_gib": max(r["vmhwm_gib"] for r in ranks), "load_meta": ranks[0]["load"],
            "layers": ranks[0]["layers"], "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()], "output_sha256_16": _outputs_hash(out)}


def main(argv: list[str] | None = None) -> None:
    sm = _stream_memory()
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(sm.SHAPES), default="1b")
    ap.add_argument("--dir", default=None, help="where the checkpoint is written (default /tmp/stream-dist-<shape>)")
    ap.add_argument("--blocks", type=int, default=2, help="GPTQ quantizes only the first N blocks (default 2)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each rank (default 1)")
    ap.add_argument("--kinds", default="rtn,gptq")
    ap.add_argument("--first", choices=("all", "rank0"), default="all",
                    help="the mode the first recipe runs first (the next recipe starts with the other one)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, a few seconds")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.smoke:
        args.shape, args.dtype, args.samples, args.seq_len = "tiny", "float32", 4, 32
    args.dir = args.dir or f"/tmp/stream-dist-{args.shape}"
    t = time.time()
    info = sm.write_checkpoint(args.dir, sm.SHAPES[args.shape], getattr(torch, args.dtype))
    rest = sm._rest_bytes(args.dir)
    block_bytes = (info["bytes"] - rest) / info["blocks"]
    head = {"shape": args.shape, "checkpoint": info, "block_bytes": block_bytes, "rest_bytes": rest,
            "shards": len(_shards(args.dir)), "write_s": round(time.time() - t, 1), "ranks": args.ranks,
            "threads_per_rank": args.threads, "samples": args.samples, "seq_len": args.seq_len,
            "batch_size": args.batch_size, "dtype": args.dtype, "gptq_blocks": args.blocks,
            "nice": os.nice(0), "cpus": os.cpu_count(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "torch": torch.__version__, "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(head), flush=True)
    rows = []
    try:
        for i, kind in enumerate(args.kinds.split(",")):
            modes = ("all", "rank0") if (i % 2 == 0) == (args.first == "all") else ("rank0", "all")  # drift cancels
            for mode in modes:
                for cache in ("cold", "warm"):
                    out = f"{args.dir}-q-{kind}-{mode}-{cache}"
                    r = run_one(args, kind, mode, cache, out)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                    if not args.keep:
                        shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    head["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\n{args.shape}: {info['params'] / 1e9:.2f} B params, {info['bytes'] / GIB:.2f} GiB ({args.dtype}) in "
          f"{head['shards']} shards; block {block_bytes / GIB:.3f} GiB, rest {rest / GIB:.2f} GiB; "
          f"{args.ranks} gloo ranks x {args.threads} thread(s); calibration {args.samples} x {args.seq_len}\n")
    print("| recipe | dist-read | page cache (resident before) | wall s | quantize s | read s (rank 0 / 1) | "
          "peak RSS GiB (rank 0 / 1) | output hash |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['mode']} | {r['cache']} ({r['resident_before']:.0%}) | {r['wall_s']} | "
              f"{r['quantize_s']} | {' / '.join(map(str, r['read_s']))} | "
              f"{' / '.join(map(str, r['peak_rss_gib']))} | {r['output_sha256_16']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
