"""Real text from installed packages: calibration and evaluation splits that never overlap.

``enwiki``: the English Wikipedia excerpt shipped inside ``gensim==4.4.0`` (its test data).
Articles are cleaned of wiki markup (by regular expressions; a handful of nested links inside image
captions survive — under 10 of 1.35 M characters) and split by article index: even-numbered articles are the
calibration split, odd-numbered ones the evaluation split, so no article (and no window) is in both.

A user's own calibration text comes from a local file (:func:`read_calibration_file`: .txt, .jsonl,
.json, or .safetensors token ids; never a pickle); text is drawn from as the bundled corpus is
(:func:`sample_windows`: random windows with the seed, BOS first where the model has one).
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import torch

from .errors import DataError, ModelSourceError

CORPORA = {
    "enwiki": {
        "package": "gensim",
        "version": "4.4.0",
        "path": "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "install": "pip install --no-deps gensim==4.4.0",
    },
}
SPLITS = ("calibration", "evaluation")


def package_file(package: str, relpath: str, install: str) -> str:
    """Path of a file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"package '{package}' is not installed; install it with: {install}")
    for root in spec.submodule_search_locations:
        p = os.path.join(root, relpath)
        if os.path.exists(p):
            return p
    raise ModelSourceError(f"package '{package}' is installed but lacks {relpath}; reinstall it with: {install}")


_MARKUP = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>", re.S), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[[^\]|]*\|([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://[^\s\]]+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://[^\]]*\]"), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"&nbsp;"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


def _strip_templates(s: str) -> str:
    """Remove {{templates}}, nested ones included (innermost first)."""
    while True:
        s, n = _TEMPLATE.subn("", s)
        if not n:
            return s


def clean_wikitext(s: str) -> str:
    s = _strip_templates(s)
    for pat, rep in _MARKUP:
        s = pat.sub(rep, s)
    return s.strip()


@functools.lru_cache(maxsize=4)
def articles(corpus: str = "enwiki") -> tuple[str, ...]:
    """All usable articles of the corpus, in file order, cleaned."""
    if corpus not in CORPORA:
        raise ModelSourceError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
    c = CORPORA[corpus]
    path = package_file(c["package"], c["path"], c["install"])
    out = []
    with bz2.open(path, "rb") as f:
        for _, el in ET.iterparse(f):
            if el.tag.endswith("}page"):
                ns = el.find("{*}ns")
                text = el.find("{*}revision/{*}text")
                if ns is not None and ns.text == "0" and text is not None and text.text:
                    raw = text.text
                    if not raw.lstrip().upper().startswith("#REDIRECT"):
                        body = clean_wikitext(raw)
                        title = el.findtext("{*}title") or ""
                        if len(body) > 200:
                            out.append(f"{title}\n\n{body}")
                el.clear()
    return tuple(out)


def split_text(corpus: str = "enwiki", split: str = "evaluation") -> str:
    """The text of one split: even-numbered articles calibrate, odd-numbered ones evaluate."""
    # (evaluation-only corpora such as lambada are quantkit.eval.corpora's: evaluation_split)
    if split not in SPLITS:
        raise ModelSourceError(f"unknown split {split!r}; use one of {SPLITS}")
    arts = articles(corpus)
    start = 0 if split == "calibration" else 1
    return "\n\n".join(arts[start::2])


@dataclass
class TokenSplit:
    corpus: str
    split: str
    ids: torch.Tensor  # 1-D int64
    text_sha256: str


def tokenize_split(tokenizer, corpus: str = "enwiki", split: str = "evaluation") -> TokenSplit:
    text = split_text(corpus, split)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return TokenSplit(corpus, split, ids, hashlib.sha256(text.encode()).hexdigest()[:16])


def calibration_batch(tokenizer, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
                      corpus: str = "enwiki", bos_token_id: int | None = None) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens drawn with ``seed`` from the calibration split.
    With ``bos_token_id`` each window starts with BOS (as the model sees text at inference)."""
    toks = tokenize_split(tokenizer, corpus, "calibration").ids
    return sample_windows(toks, n_samples, seq_len, seed, bos_token_id, f"the {corpus} calibration split")


def sample_windows(toks: torch.Tensor, n_samples: int, seq_len: int, seed: int, bos_token_id: int | None,
                   what: str) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens at random starts (a generator seeded by ``seed``) in the
    1-D token ids ``toks``, each led by ``bos_token_id`` when given. Windows may overlap when the text is
    short; ``what`` names the text in the error when it is shorter than one window."""
    body = seq_len - (1 if bos_token_id is not None else 0)
    if toks.numel() <= body:
        raise DataError(f"{what} has {toks.numel()} tokens, fewer than one calibration window of {seq_len}; "
                        f"give more text or a smaller --seq-len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, toks.numel() - body, (n_samples,), generator=g)
    rows = torch.stack([toks[s:s + body] for s in starts.tolist()])
    if bos_token_id is not None:
        rows = torch.cat([torch.full((n_samples, 1), bos_token_id, dtype=rows.dtype), rows], dim=1)
    return rows


# ---- a user's calibration file ---------------------------------------------------------------------
CALIBRATION_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".safetensors")


def read_calibration_file(path: str, field: str = "text") -> list[str] | torch.Tensor:
    """Calibration data from a local file, by its suffix (no pickle is ever loaded):

    * ``.txt`` / ``.md``: the file's text, one document;
    * ``.jsonl``: one JSON value per line, a string or an object whose ``field`` is the document's text;
    * ``.json``: a list of such values;
    * ``.safetensors``: a tensor ``input_ids`` of integer token ids [N, L], used as they are.

    Returns the documents (list of str) or the token ids. Every problem raises :class:`DataError`
    naming the file, the line or entry, and the fix."""
    import json

    if not os.path.isfile(path):
        raise DataError(f"calibration data {path!r}: no such file (give a .txt, .jsonl, .json or .safetensors file)")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in CALIBRATION_SUFFIXES:
        raise DataError(f"calibration data {path!r}: unknown file type {suffix or '(none)'!r}; use one of "
                        f"{', '.join(CALIBRATION_SUFFIXES)} (.jsonl: one JSON object per line with a "
                        f"{field!r} string)")
    if suffix == ".safetensors":
        return _read_id_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"calibration data {path!r}: not UTF-8 text ({e}); save it as UTF-8") from None
    if suffix in (".txt", ".md"):
        docs = [raw]
    elif suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                v = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"calibration data {path}, line {i}: not valid JSON ({e.msg}); a .jsonl file "
                                f"holds one JSON object per line") from None
            docs.append(_document(v, field, f"{path}, line {i}"))
    else:
        try:
            v = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"calibration data {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(v, list):
            raise DataError(f"calibration data {path}: a .json file must hold a list of strings or of objects "
                            f"with a {field!r} string, got {type(v).__name__}")
        docs = [_document(x, field, f"{path}, entry {i}") for i, x in enumerate(v)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"calibration data {path}: no text in it")
    return docs


def _document(v, field: str, where: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, dict):
        t = v.get(field)
        if isinstance(t, str):
            return t
        keys = ", ".join(map(str, list(v)[:8]))
        raise DataError(f"calibration data {where}: no {field!r} string in the object (its keys: {keys}); "
                        f"name the text's key with --calibration-field / calibration.field")
    raise DataError(f"calibration data {where}: expected a string or an object with a {field!r} string, "
                    f"got {type(v).__name__}")


def _read_id_file(path: str) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            if "input_ids" not in f.keys():
                raise DataError(f"calibration data {path}: no tensor named 'input_ids' (it has: "
                                f"{', '.join(list(f.keys())[:8]) or 'none'}); store the token ids [N, L] as input_ids")
            ids = f.get_tensor("input_ids")
    except SafetensorError as e:
        raise DataError(f"calibration data {path}: not a readable safetensors file ({e})") from None
    if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64) or ids.numel() == 0:
        raise DataError(f"calibration data {path}: input_ids must be integer token ids of shape [N, L], got "
                        f"{ids.dtype} {tuple(ids.shape)}")
    return ids.long()


def text_calibration_batch(tokenizer, docs: list[str], n_samples: int, seq_len: int, seed: int,
                           bos_token_id: int | None, what: str = "the calibration text") -> tuple[torch.Tensor, dict]:
    """Windows drawn from a user's documents as from the bundled corpus (joined by blank lines, tokenized
    once, random windows with the seed, BOS first); and what was used (documents, tokens, text hash)."""
    text = "\n\n".join(docs)
    toks = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    ids = sample_windows(toks, n_samples, seq_len, seed, bos_token_id, what)
    return ids, {"documents": len(docs), "tokens": int(toks.numel()),
                 "text_sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}
