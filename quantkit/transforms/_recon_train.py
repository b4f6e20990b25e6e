"""The training loop of the ``recon`` block plugin (:mod:`quantkit.transforms.recon`).

One step (``_Loop.step``) runs without a host synchronisation: the dequantization of every trained
layer, the block's forward under autocast, the loss, its gradients, the keep-the-best bookkeeping (the
best batch loss and a copy of the parameters it was measured at, selected on the device with
``torch.where``) and the signed update with a learning rate held in a device tensor. The host reads the
recorded losses to stop on a non-finite loss and for ``patience``: every step on the CPU and in eager
mode, every ``_CHECK_EVERY`` steps when the step runs as a CUDA graph.

CUDA graph (``cuda_graph: auto``, on CUDA with the signed optimizer and same-shaped calibration batches):
the first ``_WARM`` steps run eagerly on a side stream, then one step is captured and replayed for the
rest, with each drawn batch copied into the captured input buffers. A step of a small model is a few
hundred kernel launches of microseconds each (SmolLM2-135M: ~7 ms per step on an H100, mostly launch
overhead); replayed, the launches cost one call. The replayed step does what the eager one does, so the
results are the same up to the early-stop granularity; a block whose step cannot be captured (an op that
synchronises, a CPU tensor created inside) falls back to eager steps with a warning."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from ..capture import tree_map_tensors
from ..errors import NumericalError
from ._recon_parts import _err_terms, _Norms, _Sampler

log = logging.getLogger(__name__)

_WARM = 2  # eager steps before the capture (lazy initialisations stay out of the graph)
_CHECK_EVERY = 16  # graph mode: steps between two reads of the losses


class _Adam:
    """Adam's direction m̂ / (sqrt(v̂) + eps) per parameter (fp32 moments), scaled by the caller like the sign:
    about ±1 per element in steady state, smaller where the gradient's sign flips from step to step."""

    def __init__(self, n: int, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-12):
        self.m: list[torch.Tensor | None] = [None] * n
        self.v: list[torch.Tensor | None] = [None] * n
        self.b1, self.b2, self.eps = b1, b2, eps

    def direction(self, i: int, g: torch.Tensor, t: int) -> torch.Tensor:
        g = g.float()
        if self.m[i] is None:
            self.m[i], self.v[i] = torch.zeros_like(g), torch.zeros_like(g)
        self.m[i].mul_(self.b1).add_(g, alpha=1 - self.b1)
        self.v[i].mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        mh = self.m[i] / (1 - self.b1 ** t)
        vh = self.v[i] / (1 - self.b2 ** t)
        return mh.div_(vh.sqrt_().add_(self.eps))


def _tree_copy_(dst: Any, src: Any) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src):
            _tree_copy_(d, s)
    elif isinstance(dst, dict):
        for k, d in dst.items():
            _tree_copy_(d, src[k])


class _Loop:
    """The state of one block's training: parameters, their step sizes, the best-so-far copy."""

    def __init__(self, cfg, block, layers: list, forward: Callable, device, cw):
        self.cfg, self.block, self.layers, self.forward, self.cw = cfg, block, layers, forward, cw
        self.device = device
        self.quant = [L for L in layers if not isinstance(L, _Norms)]
        self.params = [p for L in layers for p in L.params()]
        self.steps_of = [L.step_scale(p) for L in layers for p in L.params()]
        self.amp = cfg.autocast == "on" or (cfg.autocast == "auto" and device.type == "cuda")
        self.adam = _Adam(len(self.params)) if cfg.optimizer == "adam" else None
        self.lr = torch.zeros((), device=device)
        self.best_loss = torch.full((), math.inf, device=device)
        self.best = [L.state() for L in layers]

    def step(self, h: torch.Tensor, kw: dict, f: torch.Tensor, t: int) -> torch.Tensor:
        """One training step at the current parameters (no host synchronisation); its batch loss.
        ``t``: the step's number from 1 (Adam's bias correction)."""
        cfg = self.cfg
        with torch.enable_grad():
            for L in self.quant:
                L.ql.dense_weight = L.dequant()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
                out = self.forward(self.block, h, kw)
            num, den = _err_terms(out, f, cfg.loss, self.cw)
            loss = num / den.clamp_min(1e-30)
            grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            loss = loss.detach()
            better = loss < self.best_loss  # the parameters this loss was measured at, before the update
            torch.where(better, loss, self.best_loss, out=self.best_loss)
            for bs, L in zip(self.best, self.layers):
                for b, c in zip(bs, L.state()):
                    torch.where(better, c, b, out=b)
            for i, (p, g, k) in enumerate(zip(self.params, grads, self.steps_of)):
                d = torch.sign(g) if self.adam is None else self.adam.direction(i, g, t)
                p.sub_(d.mul_(k).mul_(self.lr).to(p.dtype))
        for L in self.layers:
            L.clamp_(cfg.clip_range, cfg.offset_bound)
        return loss


def _graph_wanted(cfg, device, sampler: _Sampler) -> bool:
    return (cfg.cuda_graph != "off" and device.type == "cuda" and cfg.optimizer == "sign"
            and cfg.iters > _WARM + 1 and sampler.fixed_shape())


def train(cfg, block, layers: list, sampler: _Sampler, forward: Callable, device, cw, name: str):
    """Run ``cfg.iters`` steps (fewer on early stop). Returns (best state or None, last state or None,
    steps run, best batch loss, whether the steps ran as a CUDA graph)."""
    loop = _Loop(cfg, block, layers, forward, device, cw)
    lr0 = cfg.lr if cfg.lr is not None else 1.0 / max(cfg.iters, 1)
    use_graph = _graph_wanted(cfg, device, sampler)
    losses = torch.zeros(max(cfg.iters, 1), device=device)
    graph = static = g_loss = side = None
    ema, best_ema, since, steps, checked = None, math.inf, 0, 0, 0

    def check(upto: int) -> bool:
        """Read the losses of steps [checked, upto): raise on a non-finite one; True to stop (patience)."""
        nonlocal ema, best_ema, since, checked
        for j, lv in enumerate(losses[checked:upto].tolist(), start=checked):
            if not math.isfinite(lv):
                raise NumericalError(f"block {name!r}: recon loss is {lv} at step {j}; lower lr")
            if cfg.patience is not None:
                ema = lv if ema is None else 0.9 * ema + 0.1 * lv
                if ema < best_ema * (1 - 1e-3):
                    best_ema, since = ema, 0
                else:
                    since += 1
                    if since >= cfg.patience:
                        checked = upto
                        return True
        checked = upto
        return False

    try:
        for it in range(cfg.iters):
            h, kw, f = sampler.draw(device)
            loop.lr.fill_(lr0 * (1.0 - it / cfg.iters))
            if use_graph and it == _WARM:
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.empty_cache()  # the warm-up's blocks (side stream) would sit beside the graph's pool
                static = (h.clone(), tree_map_tensors(torch.clone, kw) if sampler.per_batch else kw, f.clone())
                try:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                        g_loss = loop.step(*static, it + 1)
                except Exception as ex:  # an op the capture refuses: eager steps from here
                    log.warning("recon %s: the training step could not be captured as a CUDA graph (%s); "
                                "eager steps instead", name, str(ex).splitlines()[0][:200] if str(ex) else ex)
                    graph = static = None
                    use_graph = False
            if graph is not None:
                static[0].copy_(h)
                static[2].copy_(f)
                if sampler.per_batch:
                    _tree_copy_(static[1], kw)
                graph.replay()
                loss = g_loss
            elif use_graph:  # warm-up steps, on a side stream as the capture wants
                if side is None:
                    side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    loss = loop.step(h, kw, f, it + 1)
                torch.cuda.current_stream().wait_stream(side)
            else:
                loss = loop.step(h, kw, f, it + 1)
            losses[it].copy_(loss)
            steps += 1
            if (not use_graph or (it + 1) % _CHECK_EVERY == 0 or it + 1 == cfg.iters) and check(it + 1):
                break
        if checked < steps:
            check(steps)
    finally:
        for L in loop.quant:
            L.ql.dense_weight = None
        del graph, static, g_loss
    if not steps:
        return None, None, 0, math.inf, False
    last_state = [L.state() for L in layers]
    best_loss = float(loop.best_loss)
    best_state = loop.best if math.isfinite(best_loss) else None
    return best_state, last_state, steps, best_loss, use_graph
