"""Evaluation: perplexity, zero-shot tasks, fidelity to the float model, reports.

Reached through ``quantkit eval`` / ``quantkit report`` and :func:`quantkit.evaluate`.
"""

from .perplexity import perplexity

__all__ = ["perplexity"]
