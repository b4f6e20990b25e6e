"""Parts of the ``recon`` block plugin (:mod:`quantkit.transforms.recon`) that are not about the weight
grid: the block's norm parameters as learnables, and the seeded calibration-batch sampler."""

from __future__ import annotations

from typing import Any

import torch


class _Norms:
    """The block's 1-D float parameters (norm weights, biases) as learnables of the same loop: each step
    moves an element by ``lr_t · norm_step · max(|p0|, 1e-3 · mean |p0|)`` against its gradient's sign,
    so a norm weight changes by the same relative amount as a clipping factor."""

    def __init__(self, params: list[torch.nn.Parameter], norm_step: float):
        self.ps = params
        self.start = [p.detach().clone() for p in params]
        self.k = {id(p): norm_step * p0.abs().clamp_min(1e-3 * float(p0.abs().mean()) + 1e-12).float()
                  for p, p0 in zip(params, self.start)}

    def params(self) -> list[torch.Tensor]:
        return self.ps

    def step_scale(self, p: torch.Tensor) -> torch.Tensor:
        return self.k[id(p)]

    def clamp_(self, clip_range: tuple[float, float], offset_bound: float = 0.5) -> None:
        pass

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.ps]

    def load(self, st: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.ps, st):
                p.copy_(s)

    def write(self) -> None:
        pass

    def restore(self) -> None:
        self.load(self.start)


def _norm_params(block: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The block's 1-D floating parameters (norm weights, biases; quantized weights are buffers)."""
    return [p for p in block.parameters() if p.dim() == 1 and p.is_floating_point()]


def _batch_dependent(obj: Any, b: int) -> bool:
    if isinstance(obj, torch.Tensor):
        return b > 1 and obj.dim() > 0 and obj.shape[0] == b
    if isinstance(obj, (tuple, list)):
        return any(_batch_dependent(o, b) for o in obj)
    if isinstance(obj, dict):
        return any(_batch_dependent(o, b) for o in obj.values())
    return False


def _take(obj: Any, idx: torch.Tensor, b: int) -> Any:
    """Rows ``idx`` of every tensor whose first axis is the batch axis (size ``b``)."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, idx.to(obj.device)) if obj.dim() > 0 and obj.shape[0] == b else obj
    if isinstance(obj, tuple):
        return tuple(_take(o, idx, b) for o in obj)
    if isinstance(obj, list):
        return [_take(o, idx, b) for o in obj]
    if isinstance(obj, dict):
        return {k: _take(v, idx, b) for k, v in obj.items()}
    return obj


class _Sampler:
    """``batch_size`` calibration sequences per step, drawn with a seeded generator. Sequences of
    different batches are mixed unless the block's keyword arguments hold per-sequence tensors
    (then a step draws from one batch)."""

    def __init__(self, inputs, kwargs, targets, batch_size: int, seed: int):
        self.inputs, self.kwargs, self.targets = inputs, kwargs, targets
        self.rows = [h.shape[0] for h in inputs]
        self.per_batch = any(_batch_dependent(kw, b) for kw, b in zip(kwargs, self.rows))
        self.bs = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.index = [(j, r) for j, b in enumerate(self.rows) for r in range(b)]

    def draw(self, device):
        if self.per_batch:
            j = int(torch.randint(len(self.inputs), (1,), generator=self.gen))
            b = self.rows[j]
            idx = torch.randperm(b, generator=self.gen)[:min(self.bs, b)].sort().values
            return (self.inputs[j].index_select(0, idx.to(self.inputs[j].device)).to(device),
                    _take(self.kwargs[j], idx, b),
                    self.targets[j].index_select(0, idx.to(self.targets[j].device)).to(device))
        n = len(self.index)
        picks = torch.randperm(n, generator=self.gen)[:min(self.bs, n)].sort().values.tolist()
        h = torch.cat([self.inputs[j][r:r + 1] for j, r in (self.index[i] for i in picks)]).to(device)
        f = torch.cat([self.targets[j][r:r + 1] for j, r in (self.index[i] for i in picks)]).to(device)
        return h, self.kwargs[0], f
