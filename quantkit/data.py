"""Real text from installed packages: calibration and evaluation splits that never overlap.

``enwiki``: the English Wikipedia excerpt shipped inside ``gensim==4.4.0`` (its test data).
Articles are cleaned of wiki markup (by regular expressions; a handful of nested links inside image
captions survive — under 10 of 1.35 M characters) and split by article index: even-numbered articles are the
calibration split, odd-numbered ones the evaluation split, so no article (and no window) is in both.
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

from .errors import ModelSourceError

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
    body = seq_len - (1 if bos_token_id is not None else 0)
    if toks.numel() <= body:
        raise ModelSourceError(f"calibration split has {toks.numel()} tokens, fewer than seq_len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, toks.numel() - body, (n_samples,), generator=g)
    rows = torch.stack([toks[s:s + body] for s in starts.tolist()])
    if bos_token_id is not None:
        rows = torch.cat([torch.full((n_samples, 1), bos_token_id, dtype=rows.dtype), rows], dim=1)
    return rows
