"""Per-linear input statistics of one decoder block (XᵀX, Σx², max|x|), gathered with forward hooks
while the float block runs on the calibration batches (quantkit.pipeline's step 2). Linears that
share an input share one accumulator; a linear's statistics can be released once no later linear of
the block reads them."""

from __future__ import annotations

import torch
from torch import nn

from .errors import NumericalError, QuantkitError
from .quantizers.base import LayerStats, all_finite

_LOWP_GRAM: dict[torch.device, bool] = {}


def _gram_low_precision(h: torch.Tensor, x: torch.Tensor) -> bool:
    """h += xᵀx straight from bf16/fp16 x on CUDA (tensor-core products are exact, sums float32),
    without a float32 copy of x. False where unavailable: the caller takes the float32 path.
    The first use on a device checks the result against the float32 path once."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and h.dtype == torch.float32):
        return False
    ok = _LOWP_GRAM.get(x.device)
    if ok is None:
        try:
            g = torch.Generator(device=x.device).manual_seed(0)
            a = torch.randn(512, 96, device=x.device, generator=g).to(x.dtype)
            h0 = torch.randn(96, 96, device=x.device, generator=g)
            want = h0 + a.double().t() @ a.double()
            got = h0.clone()
            torch.addmm(got, a.t(), a, out_dtype=torch.float32, out=got)
            ok = bool(torch.allclose(got.double(), want, rtol=1e-5, atol=1e-3))
        except (RuntimeError, TypeError):
            ok = False
        _LOWP_GRAM[x.device] = ok
    if not ok:
        return False
    torch.addmm(h, x.t(), x, out_dtype=torch.float32, out=h)
    return True


class _StatsCollector:
    """Forward hooks that accumulate input statistics; linears fed the same tensor share them."""

    def __init__(self, linears: dict[str, nn.Module], need_hessian: set[str],
                 accumulate: torch.dtype = torch.float32):
        self.acc = accumulate  # float64: per-batch float32 partials add exactly, in any order
        self.stats: dict[str, LayerStats] = {}
        self.alias: dict[str, str] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []  # strong refs: no address reuse in a batch
        self._handles = []
        self._need_h = need_hessian
        self._released: set[str] = set()  # owners whose statistics release() dropped
        for name, mod in linears.items():
            self._handles.append(mod.register_forward_hook(self._make_hook(name)))

    def new_batch(self):
        self._seen.clear()

    def _make_hook(self, name: str):
        def hook(_mod, args, _out):
            x = args[0]
            for t, owner in self._seen:
                if t is x:
                    if owner != name:
                        self.alias[name] = owner
                    return
            self._seen.append((x, name))
            self._add(name, x)
        return hook

    def _add(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        s = self.stats.get(name)
        if s is None:
            n = x.shape[1]
            h = torch.zeros(n, n, device=x.device, dtype=self.acc) if name in self._need_h else None
            s = LayerStats(0, h, None if h is not None else torch.zeros(n, device=x.device, dtype=self.acc),
                           torch.zeros(n, device=x.device))
            self.stats[name] = s
        s.nsamples += x.shape[0]
        if s.hessian is not None:
            if not _gram_low_precision(s.hessian, x):
                xf = x.float()
                # bf16/fp16 values are exact in TF32 (≤ 10 mantissa bits): tensor cores, fp32 sums
                prev = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = prev or (x.is_cuda and x.dtype != torch.float32)
                try:
                    if s.hessian.dtype == torch.float32:
                        s.hessian.addmm_(xf.t(), xf)  # Σx² is its diagonal
                    else:
                        s.hessian += xf.t() @ xf  # this batch's float32 sum, added exactly in float64
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = prev
        else:
            s.act_sqsum += x.float().pow(2).sum(0)
        torch.maximum(s.act_absmax, x.abs().amax(0).float(), out=s.act_absmax)  # NaN propagates to here

    def finish(self) -> None:
        self._seen.clear()  # the last batch's inputs: not kept through the solve
        for name, s in self.stats.items():
            if s.hessian is not None and s.hessian.dtype != torch.float32:
                s.hessian = s.hessian.float()
            if s.act_sqsum is not None and s.act_sqsum.dtype != torch.float32:
                s.act_sqsum = s.act_sqsum.float()
            if s.hessian is not None:
                s.act_sqsum = torch.diagonal(s.hessian).clone()
            if name in self.alias.values():
                s.cache = {}  # several layers read these statistics: let them share derived results
            if not torch.isfinite(s.act_absmax).all() or (s.hessian is not None and not all_finite(s.hessian)):
                raise NumericalError(f"calibration activations entering {name} hold NaN/inf; check the model "
                                     f"weights and the calibration data")

    def release(self, name: str, later) -> None:
        """``name`` is solved: drop the statistics it read (its Hessian, GPTQ's shared factor) unless a
        name in ``later`` reads them too (q/k/v, gate/up share one owner). A later ``get`` of a released
        owner is an error, not empty statistics."""
        owner = self.alias.get(name, name)
        if owner in self.stats and all(self.alias.get(m, m) != owner for m in later):
            del self.stats[owner]
            self._released.add(owner)

    def get(self, name: str) -> LayerStats:
        owner = self.alias.get(name, name)
        if owner in self._released:
            raise QuantkitError(f"internal: the statistics of {owner} were released before {name} was solved")
        s = self.stats.get(owner)
        if s is None:
            return LayerStats()
        if name in self._need_h and s.hessian is None:
            raise QuantkitError(f"internal: {name} needs a Hessian its input owner {owner} did not gather")
        return s

    def remove(self):
        for h in self._handles:
            h.remove()
