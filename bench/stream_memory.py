"""Peak CPU memory of quantizing a checkpoint streamed (quantkit.stream) against loading it whole.

Writes a random Llama-shaped checkpoint (bf16, one shard per decoder block + one for the rest, with
model.safetensors.index.json; written block by block, so writing it needs no more than a block of
memory), then quantizes it in a fresh subprocess per run: RTN (data-free, every block) and GPTQ
(calibrated; ``--blocks N`` limits the GPTQ work to the first N blocks, the others still run their
float forward), each ``--load stream`` (written out block by block too) and ``--load whole``. The
peak RSS of each child is its own ``VmHWM`` (/proc/self/status, read by the child at its end): not
``ru_maxrss`` from ``os.wait4``, which on Linux also holds the *parent's* high-water mark (a child started by
vfork + exec inherits it: this parent writes the checkpoint and peaks at several GiB). Prints a Markdown table; ``--json``
writes the rows. The checkpoint is deleted at the end unless ``--keep``.

    nice -n 10 python bench/stream_memory.py --shape 3b --dir /work/tmp/stream-bench
    python bench/stream_memory.py --smoke          # a tiny shape, seconds (what the tests run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

# bench/kernel_bench.py would shadow the PyPI ``kernels`` that transformers imports: drop this folder from the path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

SHAPES = {  # Llama-3.2 shapes (tied embeddings), and a tiny one
    "3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
GIB = 1 << 30


def write_checkpoint(d: str, shape: dict, dtype=torch.bfloat16, seed: int = 0, gen_device: str = "cpu") -> dict:
    """A random Llama checkpoint in ``d``, one shard per block (+ one for the rest), written block by
    block (peak memory: one block). Returns {params, bytes, blocks}."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=4096, **shape)
    cfg.dtype = dtype
    with init_empty_weights():
        skel = LlamaForCausalLM(cfg)
    sd = skel.state_dict()
    n = cfg.num_hidden_layers
    groups: list[list[str]] = [[] for _ in range(n + 1)]
    for k in sd:
        if k.startswith("model.layers."):
            groups[int(k.split(".")[2])].append(k)
        elif not (cfg.tie_word_embeddings and k == "lm_head.weight"):
            groups[n].append(k)
    os.makedirs(d, exist_ok=True)
    g = torch.Generator(device=gen_device).manual_seed(seed)
    wmap, total, params = {}, 0, 0
    for i, keys in enumerate(groups):
        fn = f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors"
        tensors = {}
        for k in keys:
            shp = tuple(sd[k].shape)
            t = torch.ones(shp, dtype=dtype) if len(shp) == 1 else (
                torch.randn(shp, generator=g, device=gen_device) * 0.02).to(dtype).cpu()
            tensors[k] = t
            wmap[k] = fn
            total += t.numel() * t.element_size()
            params += t.numel()
        save_file(tensors, os.path.join(d, fn), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f)
    cfg.save_pretrained(d)
    return {"params": params, "bytes": total, "blocks": n}


def recipe_for(kind: str, blocks: int | None) -> dict:
    fmt = {"type": "int", "bits": 4, "group_size": 128, "sym": True}
    r = ({"quantizer": "rtn", "format": fmt} if kind == "rtn" else
         {"quantizer": {"type": "gptq", "act_order": True, "static_groups": True}, "format": fmt})
    r["ignore"] = ["lm_head"]
    if blocks is not None:
        r["targets"] = [f"re:model\\.layers\\.({'|'.join(str(i) for i in range(blocks))})\\..*"]
    return r


def child(args) -> None:
    import quantkit

    torch.manual_seed(0)
    with open(os.path.join(args.ckpt, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    ids = torch.randint(0, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    t = time.time()
    qm = quantkit.quantize(args.ckpt, recipe_for(args.kind, args.blocks), calibration=ids, device=args.device,
                           load=args.load, dtype=getattr(torch, args.dtype), save_to=args.out, overwrite=True,
                           progress=False, batch_size=args.batch_size)
    gpu = {}
    if args.device.startswith("cuda"):
        gpu = {"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
               "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2)}
    print(json.dumps({**gpu, "vmhwm_gib": own_peak_gib(), "seconds": round(time.time() - t, 1), "quantized_layers": len(qm.report.layers),
                      "loaded": qm.meta["load"]["load"], "why_not_streamed": qm.meta["load"].get("why_not_streamed"),
                      "streamed_save": qm.streamed_to is not None}))


def own_peak_gib() -> float | None:
    """This process's own peak RSS (``VmHWM``, its address space only), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return round(kib / (1 << 20), 3)


def run_measured(args, kind: str, load: str, blocks: int | None, out: str) -> dict:
    """One child; its own peak RSS (VmHWM; ru_maxrss from os.wait4, which includes the parent's high-water
    mark inherited at vfork, kept beside it as ``ru_maxrss_gib``)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--ckpt", args.dir, "--kind", kind, "--load", load,
           "--out", out, "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--dtype", args.dtype,
           "--device", args.device, "--batch-size", str(args.batch_size)]
    if blocks is not None:
        cmd += ["--blocks", str(blocks)]
    t = time.time()
    log = out + ".log"
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, text=True)
        sampler = _Sampler(p.pid)
        _, status, ru = os.wait4(p.pid, 0)
        sampler.stop()
    p.returncode = os.waitstatus_to_exitcode(status)
    text = open(log).read()
    if p.returncode != 0:
        raise SystemExit(f"child {kind}/{load} failed ({p.returncode}):\n{text[-3000:]}")
    res = json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])
    ru_gib = round(ru.ru_maxrss * 1024 / GIB, 2)
    res.update(wall_s=round(time.time() - t, 1), ru_maxrss_gib=ru_gib,
               peak_rss_gib=res["vmhwm_gib"] if res.get("vmhwm_gib") is not None else ru_gib, **sampler.result())
    return res


class _Sampler:
    """Reads the child's /proc/<pid>/status every ``period`` s: its highest ``VmRSS`` seen, with the
    ``RssAnon``/``RssFile`` of that sample, and the highest ``RssAnon`` (a sampler misses short peaks: the
    child's own ``VmHWM`` stays the figure)."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, pid: int, period: float = 0.1):
        import threading

        self.path, self.period, self.best, self.anon_max, self.n = f"/proc/{pid}/status", period, None, 0, 0
        self._done = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                got = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.split(":")[0] in self.FIELDS}
        except (OSError, ValueError, IndexError):
            return None
        return got if len(got) == len(self.FIELDS) else None

    def _run(self) -> None:
        while not self._done.wait(self.period):
            s = self._read()
            if s is None:
                continue
            self.n += 1
            self.anon_max = max(self.anon_max, s["RssAnon"])
            if self.best is None or s["VmRSS"] > self.best["VmRSS"]:
                self.best = s

    def stop(self) -> None:
        self._done.set()
        self._t.join()

    def result(self) -> dict:
        if self.best is None:
            return {}
        g = lambda kib: round(kib / (1 << 20), 3)  # noqa: E731
        return {"sampled_vmrss_max_gib": g(self.best["VmRSS"]), "sampled_rss_anon_at_max_gib": g(self.best["RssAnon"]),
                "sampled_rss_file_at_max_gib": g(self.best["RssFile"]), "sampled_rss_anon_max_gib": g(self.anon_max),
                "samples": self.n}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    ap.add_argument("--dir", default=None, help="where the checkpoint is written (default /work/tmp/stream-<shape>)")
    ap.add_argument("--blocks", type=int, default=None, help="GPTQ quantizes only the first N blocks (default 2)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kinds", default="rtn,gptq")
    ap.add_argument("--loads", default="stream,whole")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--reuse", action="store_true",
                    help="use the checkpoint already in --dir (written by an earlier --keep run) instead of writing it")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU, a few seconds")
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--load", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if args.smoke:
        args.shape, args.dtype = "tiny", "float32"
    args.dir = args.dir or os.path.join("/work/tmp" if os.path.isdir("/work") else "/tmp", f"stream-{args.shape}")
    t = time.time()
    if args.reuse and os.path.exists(os.path.join(args.dir, "model.safetensors.index.json")):
        info = _existing_info(args.dir)
    else:
        info = write_checkpoint(args.dir, SHAPES[args.shape], getattr(torch, args.dtype),
                                gen_device="cuda" if args.device.startswith("cuda") else "cpu")
    block_bytes = (info["bytes"] - _rest_bytes(args.dir)) / info["blocks"]
    print(f"checkpoint {args.dir}: {info['params'] / 1e9:.2f} B params, {info['bytes'] / GIB:.2f} GiB on disk, "
          f"{info['blocks']} blocks of {block_bytes / GIB:.3f} GiB, rest {_rest_bytes(args.dir) / GIB:.2f} GiB; "
          f"written in {time.time() - t:.0f} s", flush=True)
    rows = []
    try:
        for kind in args.kinds.split(","):
            for load in args.loads.split(","):
                blocks = (args.blocks or 2) if kind == "gptq" else None
                out = os.path.join(os.path.dirname(args.dir), f"{os.path.basename(args.dir)}-q-{kind}-{load}")
                r = run_measured(args, kind, load, blocks, out)
                r.update(kind=kind, load=load, blocks=blocks or info["blocks"])
                rows.append(r)
                print(json.dumps(r), flush=True)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        if not (args.keep or args.reuse):
            shutil.rmtree(args.dir, ignore_errors=True)
    print(f"\n{args.shape}: {info['params'] / 1e9:.2f} B params, {info['bytes'] / GIB:.2f} GiB ({args.dtype}); one "
          f"block {block_bytes / GIB:.3f} GiB; calibration {args.samples} x {args.seq_len} tokens\n")
    gpu = any("peak_gpu_gib" in r for r in rows)
    print("| recipe | load | blocks quantized | quantize s | wall s | peak RSS GiB |" + (" peak GPU GiB |" if gpu else ""))
    print("|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    for r in rows:
        print(f"| {r['kind']} | {r['load']} (done: {r['loaded']}{', save streamed' if r['streamed_save'] else ''}) | "
              f"{r['blocks']} | {r['seconds']} | {r['wall_s']} | {r['peak_rss_gib']} |"
              + (f" {r.get('peak_gpu_gib')} |" if gpu else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "checkpoint": info, "block_bytes": block_bytes, "rows": rows}, f, indent=1)


def _existing_info(d: str) -> dict:
    """{params, bytes, blocks} of a checkpoint written earlier by :func:`write_checkpoint`."""
    from safetensors import safe_open

    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        idx = json.load(f)
    with open(os.path.join(d, "config.json")) as f:
        blocks = json.load(f)["num_hidden_layers"]
    params = 0
    for fn in sorted(set(idx["weight_map"].values())):
        with safe_open(os.path.join(d, fn), "pt") as sf:
            for k in sf.keys():
                n = 1
                for s in sf.get_slice(k).get_shape():
                    n *= s
                params += n
    return {"params": params, "bytes": idx["metadata"]["total_size"], "blocks": blocks}


def _rest_bytes(d: str) -> int:
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        wm = json.load(f)["weight_map"]
    rest = {fn for k, fn in wm.items() if not k.startswith("model.layers.")}
    return sum(os.path.getsize(os.path.join(d, fn)) for fn in rest)


if __name__ == "__main__":
    main()
