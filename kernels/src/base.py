"""The protocol every layer kernel follows: key, config, plan per M bucket, call.

A layer kernel is built once per layer (repacking or viewing the checkpoint's tensors) and then
called per forward as ``kernel(x) -> x @ W^T``. The row count M of x picks a power-of-two bucket
(:func:`m_bucket`); per (bucket, dtype) the kernel makes one *plan* — a closure
``(x2d, out, M) -> None`` running one *config* (a dict: ``path`` and its tile sizes) — from the
tuned table (:func:`quantkit.kernels._launch.tuned`, keyed by :meth:`LayerKernel.key`) or the
kernel's own :meth:`~LayerKernel.default_config`. A subclass implements two methods:

* ``default_config(mb, dtype) -> dict``: the heuristic config when nothing is tuned;
* ``make_plan(cfg, dtype, mb) -> plan``: the closure for one config, valid for rows M <= mb;

and may override ``check_config`` (replace a config this layer cannot run), ``config`` (a tuned
lookup with its own fallbacks) and ``key_suffix``. The call path is shared: after a row count has
been seen once, a call is one dict lookup, one output allocation and the plan's launch.
"""

from __future__ import annotations

import torch

from . import _launch
from ._launch import m_bucket, tuned

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


class Plans(dict):
    """Plans per (M bucket, dtype); clearing them also forgets the per-shape call cache."""

    def __init__(self, calls: dict):
        super().__init__()
        self.calls = calls

    def clear(self):
        super().clear()
        self.calls.clear()


class LayerKernel:
    """``x -> x @ W^T`` for one layer of shape (N, K) = (out_features, in_features).

    ``fallback(x)`` computes the same in plain PyTorch (dtypes the kernels do not take);
    ``perm`` (act-order) is a column permutation applied to x before the kernel."""

    key_suffix = ""
    gemv_max_m = 4  # a GEMV config is never used above this bucket

    def __init__(self, shape, device: torch.device, tag: str, fallback, perm: torch.Tensor | None = None):
        self.N, self.K = shape
        self.device, self.tag, self.fallback, self.perm = device, tag, fallback, perm
        self._calls: dict = {}
        self.plans: dict = Plans(self._calls)

    # ---- configs -------------------------------------------------------------------------------
    def key(self, mb: int, dtype) -> str:
        """The tuned table's key of this layer's shape at bucket mb."""
        return f"{self.tag}{self.key_suffix}:{self.N}x{self.K}:{DTYPE_NAMES.get(dtype, 'fp16')}:m{mb}"

    def default_config(self, mb: int, dtype) -> dict:
        raise NotImplementedError

    def config(self, mb: int, dtype) -> dict:
        return tuned(self.device).get(self.key(mb, dtype)) or self.default_config(mb, dtype)

    def tuned_near(self, key_of, mb: int) -> dict | None:
        """The tuned config of bucket mb, or where the table has none (a bucket never swept on this GPU) and
        mb >= 64, the tile config of the next larger bucket, else of the next smaller one (used by the
        int/LUT kernels, where it was measured: on the H100, 2026-12-07, the 2048 bucket's configs ran
        M = 1024 at 0.92-1.05x bf16 against the default dequantize + cuBLAS's 0.66-0.79x). A sweep's
        decision to keep the default is written into the table (bench/tuned_merge.py), so it stands."""
        t = tuned(self.device)
        c = t.get(key_of(mb))
        if c is not None or mb < 64:
            return c
        for nb in (mb * 2, mb // 2):
            c = t.get(key_of(nb)) if 64 <= nb <= _launch.TOP_BUCKET else None
            if c is not None and c.get("path") != "gemv":
                return c
        return None

    def check_config(self, cfg: dict, mb: int, dtype) -> dict:
        """The config actually run for bucket mb (a subclass replaces what it cannot run)."""
        if cfg.get("path") == "gemv" and mb > self.gemv_max_m:
            return self.default_config(mb, dtype)
        return cfg

    # ---- plans ---------------------------------------------------------------------------------
    def make_plan(self, cfg: dict, dtype, mb: int):
        raise NotImplementedError

    def plan(self, M: int, dtype, cfg: dict | None = None):
        """Make (and keep) the plan of M's bucket: ``cfg`` if given, else the tuned or default one."""
        mb = m_bucket(M)
        if cfg is None:
            cfg = self.config(mb, dtype)
        p = self.make_plan(self.check_config(cfg, mb, dtype), dtype, mb)
        self.plans[(mb, dtype)] = p
        self._calls.clear()
        return p

    # ---- call ----------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # fast path: contiguous, 16-byte aligned x of a shape seen before -> one dict lookup, one
        # allocation, one launch (no reshape/view objects: the kernels only need the pointer and M)
        if self.perm is None and x.is_contiguous() and not x.data_ptr() & 15:
            hit = self._calls.get((x.shape, x.dtype))
            if hit is not None:
                p, M, oshape = hit
                out = x.new_empty(oshape)
                p(x, out, M)
                return out
        return self._call_slow(x)

    def _call_slow(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.K)
        dt = x2.dtype
        if dt not in DTYPE_NAMES:
            return self.fallback(x)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        elif not x2.is_contiguous() or x2.data_ptr() & 15:
            x2 = x2.contiguous() if not x2.is_contiguous() else x2.clone()
        M = x2.shape[0]
        if M == 0:
            return x.new_empty((*lead, self.N))
        mb = m_bucket(M)
        p = self.plans.get((mb, dt)) or self.plan(M, dt)
        if len(self._calls) < 4096:
            self._calls[(x.shape, dt)] = (p, M, (*lead, self.N))
        out = torch.empty((M, self.N), dtype=dt, device=x2.device)
        p(x2, out, M)
        return out.view(*lead, self.N)
