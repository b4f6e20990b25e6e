"""End-to-end tuning of the quantization step sizes after the block pass (recipe key ``finetune``).

EfficientQAT's second stage ("E2E-QP", Chen et al. 2024; read for the method, own code): once every
block is quantized and its integer codes are fixed, only the quantization parameters are trained, end
to end through the whole model, so that the quantized model's output matches the float model's on the
calibration text. Here that is every group scale of every weight-only quantized linear (and, with
``tables: true``, the value tables of learned-LUT formats such as any4; with ``norms: true``, the weights
of the normalization layers: norm tweaking done end to end instead of block by block); the codes, the
integer zero points of asymmetric grids, embeddings and lm_head stay as they are.

* The float side is captured **before** the blocks are quantized (:func:`capture_float`): the input of
  the output head (the float model's final hidden state after its final norm) for every calibration
  token, stored once (tokens x hidden, float32 on the host). Each step pushes it through the float head
  (the module that held the float weight before quantization) to get the float logits.
* Loss ``kl``: KL(float next-token distribution || quantized one), mean over tokens; ``ce``: plain
  next-token cross-entropy on the calibration text (needs no float side).
* Each scale is trained as ``s = s0 * (1 + d)`` (``d`` starts at 0), so ``lr`` is a relative step;
  Adam (default) or signed SGD. Batches are drawn in a seeded order, epoch by epoch.
* The loss on the evaluation sequences (``holdout`` sequences kept out of training, or with ``holdout: 0``
  all of them) is measured at the start and after every ``eval_every`` steps (0: every epoch) with the
  scales rounded to their storage dtype (what the checkpoint will hold); the best iterate is kept, and
  the start if none beats it, so the stage never leaves the model worse on that loss.
* The kept scales are written back into the layers' ``scales`` buffers (``lut`` for tables) in the
  format's dtype, so ``save`` stores them and a reload computes the same logits.

A streamed model (``load='stream'``: its blocks are read from disk and released) cannot run whole, so
the stage raises an error naming the option (``api.quantize`` checks it before any calibration).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import QuantkitError
from ..formats.base import WeightFormat, group_index
from ..formats.packing import unpack_codes
from .base import Switch


class FinetuneConfig(BaseModel):
    """Recipe key ``finetune``: ``{type: e2e, epochs: 2, lr: 1e-3, ...}``."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["e2e"] = "e2e"
    epochs: int = Field(2, ge=1, le=10000)  # passes over the training sequences
    batch_size: int = Field(4, ge=1)  # sequences per step
    lr: float = Field(1e-3, gt=0, le=1.0)  # relative step of each scale (Adam's lr, or the signed step)
    optimizer: Literal["adam", "sign"] = "adam"
    loss: Literal["kl", "ce"] = "kl"
    holdout: int = Field(0, ge=0)  # calibration sequences kept out of training to choose the iterate; 0: all
    eval_every: int = Field(0, ge=0)  # steps between evaluations of the kept-iterate loss; 0: each epoch
    tables: bool = False  # learned-LUT formats (any4): train the table values too
    norms: bool = False  # also train the weights of the normalization layers (norm tweaking, end to end)
    norms_lr: float | None = Field(None, gt=0, le=1.0)  # their Adam step (absolute); None: lr
    autocast: Switch = "auto"  # bf16 autocast of the forward: auto = on CUDA only
    seed: int | None = None  # batch order; None: the recipe's calibration seed


@dataclass
class FloatTarget:
    """What the float model produced on the calibration text, captured before quantization."""
    hidden: torch.Tensor | None  # [N, L, H] float32 on the host: the output head's input (None for loss ce)
    head: nn.Module | None  # the float output head (kept even if the model's own head is later replaced)
    softcap: float | None  # final logit soft-capping of the model (Gemma 2), applied to the float logits too


def output_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise QuantkitError("finetune: the model has no output head (get_output_embeddings() is None); end-to-end "
                            "tuning needs a causal LM")
    return head


def _softcap(model: nn.Module) -> float | None:
    cfg = getattr(model, "config", None)
    cap = getattr(getattr(cfg, "get_text_config", lambda: cfg)(), "final_logit_softcapping", None) if cfg else None
    return float(cap) if cap else None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def capture_float(model: nn.Module, ids: torch.Tensor, cfg: FinetuneConfig, device, batch_size: int = 4
                  ) -> FloatTarget:
    """Run the float model over the calibration ids once and keep the output head's inputs."""
    head = output_head(model)
    softcap = _softcap(model)
    if cfg.loss == "ce":
        return FloatTarget(None, head, softcap)
    home = _model_device(model)
    device = torch.device(device)
    model.to(device)
    kept: list[torch.Tensor] = []

    def hook(_mod, args):
        kept.append(args[0].detach().float().cpu())

    h = head.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for b in ids.split(batch_size):
            model(input_ids=b.to(device), use_cache=False)
    finally:
        h.remove()
        model.train(was_training)
        model.to(home)
    return FloatTarget(torch.cat(kept), head, softcap)


class _Layer:
    """One quantized linear whose scales (and optionally table) are trained."""

    def __init__(self, name: str, m, tables: bool):
        from ..formats.lut import LutFormat

        self.name, self.m = name, m
        packed = m.packed
        rows, cols = m.shape
        self.key_s = "scales" if "scales" in packed else None
        self.lut = isinstance(m.fmt, LutFormat)
        self.s_dtype = packed["scales"].dtype if self.key_s else None
        self.train_table = tables and self.lut and m.fmt.learned
        with torch.no_grad():
            w0 = m.dequantized_weight().float()
            if self.key_s:
                self.s0 = packed["scales"].float()
                self.gi = group_index(m.fmt.cfg, cols, packed.get("g_idx"), w0.device)
            if self.train_table:
                self.codes = unpack_codes(packed["qweight"], m.fmt.cfg.bits, cols).long()
                self.t0 = packed["lut"].float()
                self.t_dtype = packed["lut"].dtype
                self.base = None
            elif self.key_s:
                se = self.s0[:, self.gi]
                base = torch.where(se != 0, w0 / torch.where(se != 0, se, torch.ones_like(se)), torch.zeros_like(w0))
                # int grids: base is the integer (code - zero) exactly; tables: the table value of each weight
                self.base = base if self.lut else torch.round(base)
        # contiguous groups of one size (no act-order g_idx): scale by a view [rows, groups, size], whose
        # gradient is a sum, instead of an index whose gradient is a scatter (much slower on CPU)
        # (a shorter last group, as 576 columns in groups of 128, is scaled apart)
        self.gsize = None
        if self.key_s:
            g = getattr(m.fmt.cfg, "group_size", None) or cols
            if torch.equal(self.gi, torch.arange(cols, device=self.gi.device) // g):
                self.gsize = g
        self.d_s = nn.Parameter(torch.zeros_like(self.s0)) if self.key_s else None
        self.d_t = nn.Parameter(torch.zeros_like(self.t0)) if self.train_table else None

    def params(self) -> list[nn.Parameter]:
        return [p for p in (self.d_s, self.d_t) if p is not None]

    def scales(self, rounded: bool) -> torch.Tensor:
        s = self.s0 * (1 + self.d_s)
        if rounded:
            s = s.clamp(-65504.0, 65504.0).to(self.s_dtype).float() if self.s_dtype == torch.float16 \
                else s.to(self.s_dtype).float()
        return s

    def table(self, rounded: bool) -> torch.Tensor:
        t = self.t0 + self.d_t
        return t.clamp(-65504.0, 65504.0).to(self.t_dtype).float() if rounded else t

    def weight(self, rounded: bool) -> torch.Tensor:
        if self.train_table:
            t = self.table(rounded)
            w = t[0][self.codes] if t.shape[0] == 1 else t.gather(1, self.codes)
        else:
            w = self.base
        if not self.key_s:
            return w
        s = self.scales(rounded)
        if self.gsize is None:
            return w * s[:, self.gi]
        rows, cols = w.shape
        nf = cols // self.gsize
        out = (w[:, :nf * self.gsize].reshape(rows, nf, self.gsize) * s[:, :nf].unsqueeze(-1)).reshape(rows, -1)
        if nf * self.gsize < cols:
            out = torch.cat([out, w[:, nf * self.gsize:] * s[:, nf:nf + 1]], dim=1)
        return out

    def project(self) -> None:
        """Keep each scale's sign (a full-range symmetric grid's may be negative) and magnitude sane."""
        with torch.no_grad():
            if self.d_s is not None:
                self.d_s.clamp_(-0.9, 9.0)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params()]

    def restore(self, snap: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params(), snap, strict=True):
                p.copy_(v)

    def write_back(self) -> None:
        """Store the current iterate in the layer's buffers, in the format's dtypes."""
        with torch.no_grad():
            if self.key_s:
                self.m.scales = self.scales(True).to(self.s_dtype).contiguous()
            if self.train_table:
                self.m.lut = self.table(True).to(self.t_dtype).contiguous()


class _Norms:
    """The weights of the model's normalization layers, trained as ``w0 + d`` with ``d`` in float32 (a bf16
    weight could not take steps smaller than its own resolution); each step the modules see ``(w0 + d)`` in
    their dtype as a plain tensor, and :meth:`write_back` puts the kept values back into their Parameters."""

    def __init__(self, model: nn.Module, device):
        from .norm_tweak import find_norms

        self.mods = list(find_norms(model, ["Norm"]).values())
        self.orig = [m.weight for m in self.mods]
        self.w0 = [p.detach().float().to(device) for p in self.orig]
        self.d = [nn.Parameter(torch.zeros_like(w)) for w in self.w0]
        for m in self.mods:
            del m.weight  # a plain tensor attribute from here on (set each step), the Parameter kept in orig

    def params(self) -> list[nn.Parameter]:
        return self.d

    def set(self) -> None:
        for m, p, w0, d in zip(self.mods, self.orig, self.w0, self.d, strict=True):
            m.weight = (w0 + d).to(p.dtype)

    def snapshot(self) -> list[torch.Tensor]:
        return [d.detach().clone() for d in self.d]

    def restore(self, snap: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for d, v in zip(self.d, snap, strict=True):
                d.copy_(v)

    def write_back(self) -> None:
        """Put each module's Parameter back, holding ``w0 + d`` (the current iterate) in its dtype."""
        with torch.no_grad():
            for m, p, w0, d in zip(self.mods, self.orig, self.w0, self.d, strict=True):
                if "weight" in m.__dict__:
                    del m.__dict__["weight"]
                p.data = (w0 + d).to(device=p.device, dtype=p.dtype)
                m.weight = p


def trainable_layers(model: nn.Module, tables: bool) -> tuple[list[_Layer], list[str]]:
    """(layers whose scales are trained, names of quantized layers left alone and why)."""
    from ..nn import QuantLinear

    out, skipped = [], []
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        if type(m.fmt).linear is not WeightFormat.linear:
            skipped.append(f"{name} (activations quantized)")
            continue
        packed = m.packed
        if any(t.device.type == "meta" for t in packed.values()):
            raise QuantkitError(f"finetune: layer {name} is not in memory (streamed); finetune needs the whole "
                                f"model in memory: quantize with load='whole' (--load whole) or drop the recipe's "
                                f"finetune key")
        lay = _Layer(name, m, tables)
        if not lay.params():
            skipped.append(f"{name} (no group scales in {m.fmt.describe()})")
            continue
        out.append(lay)
    return out, skipped


def _kl(q_logits: torch.Tensor, p_logits: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of KL(p || q) (p: float model, q: quantized), in float32."""
    lp = torch.log_softmax(p_logits.float(), dim=-1)
    lq = torch.log_softmax(q_logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum()


def run_finetune(model: nn.Module, ids: torch.Tensor, target: FloatTarget, cfg: FinetuneConfig, device,
                 seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Train the step sizes of every weight-only quantized linear of ``model`` end to end; returns the record."""
    t0 = time.time()
    device = torch.device(device)
    n = ids.shape[0]
    if cfg.holdout >= n:
        raise QuantkitError(f"finetune.holdout: {cfg.holdout} held-out sequences leave none of the {n} calibration "
                            f"sequences to train on; use fewer (0: choose the iterate on all of them)")
    if cfg.loss == "kl" and (target.hidden is None or target.hidden.shape[:2] != ids.shape):
        raise QuantkitError("finetune: the float hidden states do not match the calibration ids (capture_float "
                            "must run on the same ids before quantization)")
    seed = cfg.seed if cfg.seed is not None else seed
    home = _model_device(model)
    model.to(device)
    head = target.head.to(device) if target.head is not None else None
    layers, skipped = trainable_layers(model, cfg.tables)
    if not layers:
        model.to(home)
        return {"type": cfg.type, "skipped": "no quantized linear with trainable scales", "layers_left": skipped}
    for lay in layers:  # the layers' tensors are on ``device`` now
        for k in ("s0", "gi", "base", "codes", "t0"):
            if getattr(lay, k, None) is not None:
                setattr(lay, k, getattr(lay, k).to(device))
        for p in lay.params():
            p.data = p.data.to(device)
    params = [p for lay in layers for p in lay.params()]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    norms = _Norms(model, device) if cfg.norms else None
    tuned = layers + ([norms] if norms is not None else [])  # everything snapshotted, kept and written back
    use_amp = cfg.autocast == "on" or (cfg.autocast == "auto" and device.type == "cuda")
    train_idx = torch.arange(cfg.holdout, n)
    eval_idx = torch.arange(0, cfg.holdout) if cfg.holdout else torch.arange(n)
    gen = torch.Generator().manual_seed(int(seed))
    groups = [{"params": params, "lr": cfg.lr}]
    if norms is not None:
        groups.append({"params": norms.params(), "lr": cfg.norms_lr or cfg.lr})
        params = params + norms.params()
    opt = torch.optim.Adam(groups) if cfg.optimizer == "adam" else None
    was_training = model.training
    model.eval()  # no dropout: the quantized model is compared as it will run

    def set_weights(rounded: bool) -> None:
        for lay in layers:
            lay.m.dense_weight = lay.weight(rounded)
        if norms is not None:
            norms.set()

    def batch_loss(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        x = ids[rows].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(input_ids=x, use_cache=False).logits
        if cfg.loss == "ce":
            tok = x[:, 1:].numel()
            return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(),
                                                     reduction="sum"), tok
        with torch.no_grad():
            hf = target.hidden[rows].to(device)
            pl = head(hf).float()
            if target.softcap:
                pl = torch.tanh(pl / target.softcap) * target.softcap
        return _kl(logits, pl), x.numel()

    @torch.no_grad()
    def evaluate() -> float:
        set_weights(True)
        tot, cnt = 0.0, 0
        for rows in eval_idx.split(cfg.batch_size):
            loss, k = batch_loss(rows)
            tot, cnt = tot + float(loss), cnt + k
        return tot / cnt

    history: list[dict[str, Any]] = []
    steps, finished = 0, False
    try:
        start = evaluate()
        best, best_at, best_snap = start, "start", [lay.snapshot() for lay in tuned]
        history.append({"step": 0, "eval_loss": start})
        train_losses: list[float] = []
        per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
        eval_every = cfg.eval_every or per_epoch
        for epoch in range(cfg.epochs):
            order = train_idx[torch.randperm(len(train_idx), generator=gen)]
            for rows in order.split(cfg.batch_size):
                set_weights(False)
                loss, k = batch_loss(rows)
                loss = loss / k
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                else:
                    for p in params:
                        p.grad = None
                loss.backward()
                if opt is not None:
                    opt.step()
                else:
                    with torch.no_grad():
                        for grp in groups:
                            for p in grp["params"]:
                                if p.grad is not None:
                                    p.sub_(grp["lr"] * p.grad.sign())
                for lay in layers:
                    lay.project()
                steps += 1
                train_losses.append(float(loss.detach()))
                last_of_run = epoch == cfg.epochs - 1 and steps == cfg.epochs * per_epoch
                if steps % eval_every == 0 or last_of_run:
                    ev = evaluate()
                    recent = train_losses[-eval_every:]
                    history.append({"step": steps, "epoch": epoch + 1, "eval_loss": ev,
                                    "train_loss_mean": sum(recent) / len(recent)})
                    if progress:
                        print(f"finetune: step {steps} epoch {epoch + 1} eval loss {ev:.5f} (start {start:.5f})",
                              flush=True)
                    if ev < best:
                        best, best_at, best_snap = ev, f"step {steps}", [lay.snapshot() for lay in tuned]
        end = history[-1]["eval_loss"]
        for lay, snap in zip(tuned, best_snap, strict=True):
            lay.restore(snap)
            lay.write_back()
        finished = True
    finally:
        for lay in layers:
            lay.m.dense_weight = None
        if norms is not None and not finished:  # interrupted: the norms go back to their start, as the scales do
            norms.restore([torch.zeros_like(d) for d in norms.d])
            norms.write_back()
        for p, rg in frozen:
            p.requires_grad_(rg)
        model.train(was_training)
        model.to(home)
    return {
        "type": cfg.type, "loss": cfg.loss, "optimizer": cfg.optimizer, "lr": cfg.lr, "epochs": cfg.epochs,
        "batch_size": cfg.batch_size, "steps": steps, "seed": int(seed), "autocast": use_amp,
        "eval_on": f"{cfg.holdout} held-out sequences" if cfg.holdout else f"all {n} calibration sequences",
        "loss_start": start, "loss_end": end, "loss_kept": best, "kept": best_at,
        "layers_trained": len(layers), "params_trained": sum(p.numel() for p in params),
        "norms_trained": len(norms.mods) if norms is not None else 0,
        "layers_left": skipped, "history": history, "seconds": round(time.time() - t0, 2),
    }
