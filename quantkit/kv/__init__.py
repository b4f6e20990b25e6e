"""Quantized KV cache and per-layer bit allocation (issue: adaptive KV-cache quantization).

    from quantkit.kv import allocate, attach, make_cache, evaluate_with_kv
    alloc = allocate(qm, budget_bits=3, policy="adaptive")   # JSON-able dict
    attach(qm.model, alloc)                                  # generate()/forward use the quantized cache
    evaluate_with_kv(qm, None, alloc, seq_len=512, max_windows=20, chunk=64)
"""

from .allocation import allocate, allocate_from_norms, measure, measure_kl, solve_knapsack
from .cache import QuantKVCache, QuantKVLayer, attach, attached_allocation, detach, make_cache
from .config import KVConfig
from .evaluate import chunked_logits, evaluate_with_kv
from .spec import average_bits, kv_bytes_per_token, normalize_allocation, parse_spec, save_allocation

__all__ = [
    "KVConfig", "QuantKVCache", "QuantKVLayer", "allocate", "allocate_from_norms", "attach", "attached_allocation",
    "average_bits", "chunked_logits", "detach", "evaluate_with_kv", "kv_bytes_per_token", "make_cache", "measure",
    "measure_kl", "normalize_allocation", "parse_spec", "save_allocation", "solve_knapsack",
]
