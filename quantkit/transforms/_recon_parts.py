"""Parts of the ``recon`` block plugin (:mod:`quantkit.transforms.recon`) that are not about the weight
grid: the block's norm parameters as learnables, the seeded calibration-batch sampler, and the
block-error terms of each ``loss``."""

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

    def fixed_shape(self) -> bool:
        """Whether every draw has the same shapes (a CUDA graph of the step can replay them all)."""
        if not self.per_batch:
            return True
        return len({(min(self.bs, b), tuple(h.shape[1:])) for b, h in zip(self.rows, self.inputs)}) == 1

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


def _err_terms(out: torch.Tensor, ref: torch.Tensor, mode: str = "global", cw: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(numerator, denominator) of the block error of ``out`` against ``ref`` [..., hidden], in fp32.
    global: squared error and squared target summed over every element; token: each token's relative
    squared error summed, and the token count; channel: both sums with each hidden channel weighted by
    ``cw`` (1 / the channel's mean square in the targets: every channel counts alike); norm: each token's
    squared error after RMS normalisation of both (what the next block's RMSNorm passes on: an error that
    only rescales a token, e.g. along a channel that dominates its RMS, is not counted), summed, and the
    token count."""
    if mode == "norm":
        o, r = out.float(), ref.float()
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True).clamp_min(1e-30))
        r = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True).clamp_min(1e-30))
        e = (o - r).pow(2).mean(-1)  # the next RMSNorm's view: the error of each token's direction
        return e.sum(), torch.full((), float(e.numel()), device=e.device)  # no host copy: capturable
    d2 = (out.float() - ref.float()).pow(2)
    r2 = ref.float().pow(2)
    if mode == "token":
        ratio = d2.sum(-1) / r2.sum(-1).clamp_min(1e-30)
        return ratio.sum(), torch.full((), float(ratio.numel()), device=ratio.device)
    if mode in ("channel", "capped"):
        return (d2 * cw).sum(), (r2 * cw).sum()
    return d2.sum(), r2.sum()


def _channel_weights(targets: list[torch.Tensor], device, capped: bool = False) -> torch.Tensor:
    """1 / each hidden channel's mean square over the calibration targets (``loss: channel``); with
    ``capped`` 1 / max(that, the mean over channels) (``loss: capped``: the global error, except that no
    channel weighs more than an average one: a massive channel is scaled down, the others keep their size)."""
    acc, n = None, 0
    for f in targets:
        f = f.to(device).float()
        s = f.pow(2).reshape(-1, f.shape[-1]).sum(0)
        acc, n = (s if acc is None else acc + s), n + f[..., 0].numel()
    ms = acc / max(n, 1)
    if capped:
        return 1.0 / ms.clamp_min(ms.mean() + 1e-30)
    return 1.0 / ms.clamp_min(ms.max() * 1e-8 + 1e-30)
