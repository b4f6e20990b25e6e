"""A quantized KV cache for transformers' generation and forward passes.

Structure follows transformers' ``cache_utils`` (``Cache`` holding one layer object per decoder
layer; ``QuantizedLayer``'s residual window, as in KIVI), but with quantkit's own group-wise RTN
(``quant.py``), per-layer key/value bit widths from an *allocation* dict, and an append-only
quantized store (a group is quantized once, never re-quantized).

Per layer, tokens live in two places:

* the **residual window**: the most recent tokens in full precision. It holds between ``R`` and
  ``R + G − 1`` tokens (``R`` = ``residual``, ``G`` = ``key_group_size``): as soon as it holds at
  least ``R + G`` tokens, its oldest whole groups of ``G`` tokens are quantized and moved out;
* the **quantized store**: bit-packed codes plus float16 scales and minima (keys per channel in
  groups of ``G`` tokens, values per token in groups of ``value_group_size`` channels).

``update`` returns the dequantized store, then the residual window, then the new tokens in full
precision: the tokens of the current forward call are always read in full precision by that
call (as in a real prefill), and read back from the quantized store by every later call.

A key or value bit width of 16 (or None) keeps that side in full precision.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..errors import QuantkitError
from .quant import SCALE_DTYPES, dequantize_keys, dequantize_values, quantize_keys, quantize_values
from .spec import normalize_allocation

FLOAT_BITS = 16


def _is_float(bits) -> bool:
    return bits is None or int(bits) >= FLOAT_BITS


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    parts = [p for p in parts if p is not None and p.numel() > 0] or parts[-1:]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


class QuantKVLayer(DynamicLayer):
    """One decoder layer's cache: quantized store + full-precision residual window."""

    is_croppable = False

    def __init__(self, key_bits: int | None = 4, value_bits: int | None = 4, key_group_size: int = 32,
                 value_group_size: int = 32, residual: int = 32, scale_dtype: str = "float16"):
        super().__init__()
        for name, b in (("key_bits", key_bits), ("value_bits", value_bits)):
            if not _is_float(b) and not 1 <= int(b) <= 8:
                raise QuantkitError(f"kv cache: {name}={b} is not supported; use 1..8 (or 16 for full precision)")
        if key_group_size < 1 or value_group_size < 1 or residual < 0:
            raise QuantkitError(f"kv cache: key_group_size={key_group_size}, value_group_size={value_group_size} "
                                f"must be >= 1 and residual={residual} >= 0")
        self.key_bits = None if _is_float(key_bits) else int(key_bits)
        self.value_bits = None if _is_float(value_bits) else int(value_bits)
        self.key_group_size, self.value_group_size, self.residual = key_group_size, value_group_size, residual
        self.scale_dtype = SCALE_DTYPES[scale_dtype]
        self.cumulative_length = 0
        self._kq = self._vq = None  # (codes, scale, min) or None
        self.head_dim = None

    def __repr__(self):
        kb = self.key_bits or FLOAT_BITS
        vb = self.value_bits or FLOAT_BITS
        return f"QuantKVLayer(k{kb}v{vb}, G={self.key_group_size}, g={self.value_group_size}, R={self.residual})"

    # ---- state -----------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        # a value group never spans heads: a group larger than head_dim means one group per head
        self.value_group_size = min(self.value_group_size, self.head_dim)
        if self.value_bits is not None and self.head_dim % self.value_group_size:
            raise QuantkitError(f"kv cache: value_group_size={self.value_group_size} does not divide the model's "
                                f"head_dim={self.head_dim}; pick a divisor of {self.head_dim}")
        self.keys = key_states.new_zeros(*key_states.shape[:2], 0, key_states.shape[-1])
        vs = value_states if value_states is not None else key_states
        self.values = vs.new_zeros(*vs.shape[:2], 0, vs.shape[-1])
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def quantized_length(self, side: str = "key") -> int:
        q = self._kq if side == "key" else self._vq
        return 0 if q is None else q[0].shape[-2]

    def _dequant(self, side: str) -> torch.Tensor | None:
        if side == "key":
            if self._kq is None:
                return None
            c, s, m = self._kq
            return dequantize_keys(c, s, m, self.key_bits, self.key_group_size, self.head_dim, self.dtype)
        if self._vq is None:
            return None
        c, s, m = self._vq
        return dequantize_values(c, s, m, self.value_bits, self.value_group_size, self.head_dim, self.dtype)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cached sequence as the attention reads it (store dequantized + residual window)."""
        return _cat([self._dequant("key"), self.keys]), _cat([self._dequant("value"), self.values])

    def _flush(self, side: str) -> None:
        buf = self.keys if side == "key" else self.values
        bits = self.key_bits if side == "key" else self.value_bits
        if bits is None:
            return
        G = self.key_group_size
        n = buf.shape[-2]
        if n - self.residual < G:
            return
        n_out = ((n - self.residual) // G) * G
        old, keep = buf[..., :n_out, :], buf[..., n_out:, :].contiguous()
        if side == "key":
            new = quantize_keys(old, bits, G, self.scale_dtype)
            self._kq = new if self._kq is None else tuple(torch.cat([a, b], dim=-2) for a, b in zip(self._kq, new))
            self.keys = keep
        else:
            new = quantize_values(old, bits, self.value_group_size, self.scale_dtype)
            self._vq = new if self._vq is None else tuple(torch.cat([a, b], dim=-2) for a, b in zip(self._vq, new))
            self.values = keep

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys_out = _cat([self._dequant("key"), self.keys, key_states])
        values_out = _cat([self._dequant("value"), self.values, value_states])
        self.keys = _cat([self.keys, key_states])
        self.values = _cat([self.values, value_states])
        self._flush("key")
        self._flush("value")
        return keys_out, values_out

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def reset(self) -> None:
        self.keys = self.values = None
        self._kq = self._vq = None
        self.is_initialized = False
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise QuantkitError("the quantized KV cache cannot be cropped (assisted/speculative decoding is not "
                            "supported with it); use a float cache for that")

    # ---- batch manipulation (beam search, contrastive search): batch is dim 0 everywhere ---
    def _map(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self._kq is not None:
            self._kq = tuple(fn(t) for t in self._kq)
        if self._vq is not None:
            self._vq = tuple(fn(t) for t in self._vq)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    # ---- memory ------------------------------------------------------------------------------
    def nbytes(self, fp_bytes: int | None = None) -> dict[str, int]:
        """Bytes held now: codes, scales, minima ("zeros") and the full-precision residual window.
        ``fp_bytes`` counts full-precision elements at that width (e.g. 2 for a 16-bit deployment)
        instead of the dtype they have here."""
        out = {"codes": 0, "scales": 0, "zeros": 0, "residual": 0}
        if not self.is_initialized:
            return out
        for q in (self._kq, self._vq):
            if q is not None:
                out["codes"] += q[0].numel() * q[0].element_size()
                out["scales"] += q[1].numel() * q[1].element_size()
                out["zeros"] += q[2].numel() * q[2].element_size()
        for t in (self.keys, self.values):
            out["residual"] += t.numel() * (fp_bytes or t.element_size())
        return out


class QuantKVCache(Cache):
    """A transformers ``Cache`` whose full-attention layers are ``QuantKVLayer`` with per-layer bits.

    Layers of other types (sliding window, linear attention, shared KV) keep transformers' own
    float layer classes. Build it with :func:`make_cache` (or directly from a model config and an
    allocation dict, see ``quantkit.kv.spec``)."""

    def __init__(self, config, allocation: dict[str, Any] | str):

        alloc = normalize_allocation(allocation)
        text_cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        base = DynamicCache(config=text_cfg).layers
        n = len(base) or int(text_cfg.num_hidden_layers)
        per = alloc.get("layers")
        if per is not None and len(per) != n:
            raise QuantkitError(f"kv allocation has {len(per)} layers but the model has {n} decoder layers; it was "
                                f"made for another model: rebuild it with quantkit.kv.allocate(model, ...)")
        layers = []
        for i in range(n):
            b = base[i] if i < len(base) else DynamicLayer()
            if type(b) is DynamicLayer:
                kb = per[i]["key_bits"] if per is not None else alloc["key_bits"]
                vb = per[i]["value_bits"] if per is not None else alloc["value_bits"]
                b = QuantKVLayer(kb, vb, alloc["key_group_size"], alloc["value_group_size"], alloc["residual"],
                                 alloc.get("scale_dtype", "float16"))
            layers.append(b)
        super().__init__(layers=layers)
        self.allocation = alloc

    def nbytes(self, fp_bytes: int | None = None) -> dict[str, int]:
        tot = {"codes": 0, "scales": 0, "zeros": 0, "residual": 0}
        for layer in self.layers:
            if isinstance(layer, QuantKVLayer):
                for k, v in layer.nbytes(fp_bytes).items():
                    tot[k] += v
            elif getattr(layer, "is_initialized", False) and layer.keys is not None:
                tot["residual"] += sum(t.numel() * (fp_bytes or t.element_size()) for t in (layer.keys, layer.values))
        tot["total"] = sum(tot.values())
        return tot


def make_cache(model_or_config, allocation: dict[str, Any] | str) -> QuantKVCache:
    """A fresh quantized cache for one generation / one forward sequence."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return QuantKVCache(cfg, allocation)


def cache_kwarg(model) -> str:
    """The keyword the model's forward takes the cache under (``cache`` in transformers >= 5.2x,
    ``past_key_values`` before)."""
    fwd = model.forward
    params = inspect.signature(fwd).parameters
    return "cache" if "cache" in params else "past_key_values"


def attach(model, allocation: dict[str, Any] | str):
    """Make ``model.generate`` and ``model(...)`` use a fresh quantized cache whenever the caller
    passes no cache (instance-level wrappers; :func:`detach` removes them). Returns the model."""

    alloc = normalize_allocation(allocation)
    detach(model)
    name = cache_kwarg(model)
    names = {"cache", "past_key_values"}
    orig_generate, orig_forward = model.generate, model.forward

    @functools.wraps(orig_generate)
    def generate(*args, **kwargs):
        if not (names & {k for k, v in kwargs.items() if v is not None}) and kwargs.get("use_cache", True):
            kwargs[name] = make_cache(model, alloc)
        return orig_generate(*args, **kwargs)

    @functools.wraps(orig_forward)
    def forward(*args, **kwargs):
        use = kwargs.get("use_cache")
        use = getattr(model.config, "use_cache", False) if use is None else use
        if not (names & {k for k, v in kwargs.items() if v is not None}) and use:
            kwargs[name] = make_cache(model, alloc)
        return orig_forward(*args, **kwargs)

    model.generate, model.forward = generate, forward
    model._quantkit_kv = {"allocation": alloc, "generate": orig_generate, "forward": orig_forward}
    return model


def detach(model):
    """Undo :func:`attach`."""
    st = model.__dict__.pop("_quantkit_kv", None)
    if st is not None:
        model.__dict__.pop("generate", None)
        model.__dict__.pop("forward", None)
    return model


def attached_allocation(model) -> dict[str, Any] | None:
    st = model.__dict__.get("_quantkit_kv")
    return None if st is None else st["allocation"]
