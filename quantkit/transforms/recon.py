"""Block-output reconstruction: learned rounding offsets and clipping, as a block plugin.

After a decoder block's linears are quantized (by RTN or GPTQ, into an affine ``int`` grid), every
weight gets a rounding offset ``v`` in [-0.5, 0.5] and every group two clipping factors ``a``
(on the grid's low end) and ``b`` (its high end; one factor for symmetric grids), in
``clip_range``. They are trained together so that the quantized block's output matches the float
block's output on the calibration inputs (mean squared error over the whole block, every linear at
once), by signed gradient descent as in SignRound (Cheng et al., 2023, "Optimize Weight Rounding
via Signed Gradient Descent for the Quantization of LLMs"; written here from the paper):

    lo = a · lo0,  hi = b · hi0          (lo0 = -z0·s0, hi0 = (maxq - z0)·s0: the quantizer's grid)
    s = (hi - lo) / maxq,  z = round(-lo / s)        (symmetric: s = a · s0, z = z0)
    q = clamp(round(w / s + v0 + v) + z, 0, maxq),   ŵ = (q - z) · s

The block's inputs are the quantized model's hidden states (the quantized blocks before it). Its
target (``target``) is either the float block's output on those same inputs (``block``: each block
matches its own float version) or the float model's own hidden state after the block (``model``:
the calibration text run through the float blocks only, carried by the pipeline as a second
activation stream, so the block also learns to undo the error of the quantized blocks before it, as
SignRound does; one more float forward per block and a second copy of the activations).

``v0`` puts the start on the quantizer's codes (``init: quantizer``; for RTN it is the rounding
itself, for GPTQ its error-compensated choices) or on plain rounding (``init: rtn``, v0 = 0). It is an
integer per weight with ``offsets: value`` (the quantizer's code minus plain rounding's): every weight
keeps the fractional part of w / s and an offset v in [-1/2, 1/2] can move it to either neighbouring
code, as in SignRound. With ``offsets: code`` (the default, kept so older recipes stay as measured) v0
puts every weight on its code's centre, where |v| <= 1/2 never changes the code: only the clipping is
learned. Measured (docs/QUALITY.md): RTN start + ``value`` matches auto-round; GPTQ start + ``value``
was worse than GPTQ start + ``code``; GPTQ first with ``init: rtn`` + ``value`` (training from plain
rounding, GPTQ's codes one more candidate at the end) was best at W4 (the int recon recipes use it).
Rounding passes gradients straight through; each step moves every parameter by ``lr_t · sign(grad)``
with ``lr_t`` decaying linearly from ``lr`` (default ``1 / iters``) to 0, on ``batch_size``
calibration sequences drawn from a generator seeded by ``seed`` and the block's name (deterministic).
The iterate of lowest batch loss is kept (as SignRound), and at the end the start, that iterate and the
last one are compared on all calibration sequences, exactly as stored (scales rounded to the format's
scale dtype): the best of the three is written, so the block never gets worse on its calibration data.
``loss: token`` measures that block error per token (each token's relative squared error, averaged),
``loss: channel`` with every hidden channel weighted by 1 / its mean square in the targets, ``loss:
norm`` after RMS-normalising each token of output and target (the next RMSNorm's view), instead of over
all elements at once, where a few tokens or channels with huge values (Gemma-3's residual stream holds
81-86 % of its energy in one channel) would otherwise decide it. ``patience`` stops early when the
smoothed loss has not improved for that many steps. ``autocast`` runs the block's forward under bf16
autocast: ``auto`` on CUDA only, ``on`` on any device (CPUs with bf16 instructions gain from it),
``off`` never. Quantize-dequantize runs as one autograd function (``_FakeQuant``: straight-through
rounding, the gradients of the small-op chain written out), and the final comparison skips a candidate
equal to one already evaluated.

Weights rotated by a transform (QuIP) are handled in the rotated space: the float weight is mapped
through the layer's run-time steps (``pre``/``post``, linear maps), so the grid that is learned is
the one stored. The result is written back through the format's own ``pack`` into the layer's
buffers: every layout saves it as it saves the quantizer's result.

Lookup-table formats (any4/any3/any2, NF4, FP4) keep the quantizer's codes (GPTQ's error-compensated
choices); their tables (learned tables: the row's 2^b values; fixed tables stay fixed) and group
scales are trained by the same loop (``_LutLayer``). Layers of other formats (FP8, W8A8) are left
as the quantizer made them (``recon_skipped``).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..errors import NumericalError
from ..formats.base import WeightFormat, column_groups, group_index
from ..formats.packing import unpack_codes
from ..registry import register
from ._recon_parts import _channel_weights, _err_terms, _norm_params, _Norms, _Sampler
from ._recon_train import train as _train_loop
from .base import BlockPlugin, PluginConfig, Switch

_FORMAT_KEYS = ("qweight", "scales", "zeros", "g_idx")
_KEPT = {"quantizer": 0.0, "rtn": 1.0, "best": 2.0, "last": 3.0}  # recon_kept in the block report


class ReconConfig(PluginConfig):
    iters: int = Field(200, ge=0, description="signed-gradient steps per block (0: no training)")
    lr: float | None = Field(None, gt=0, description="start learning rate; default 1 / iters")
    batch_size: int = Field(8, ge=1, description="calibration sequences per step")
    init: Literal["quantizer", "rtn"] = "quantizer"
    learn_clip: bool = True
    clip_range: tuple[float, float] = (0.5, 1.0)
    patience: int | None = Field(None, ge=1, description="early stop: steps without a smoothed-loss gain")
    seed: int = 0
    autocast: Switch = "auto"
    target: Literal["model", "block"] = "block"
    # "value": offsets act around w / s (a weight can move to either neighbouring code, SignRound's form);
    # "code": around the start code's centre (|v| <= 1/2 keeps every code: only clipping moves them)
    offsets: Literal["value", "code"] = "code"
    # the block's other float parameters (norm weights, biases: 1-D) trained in the same loop, each step
    # moving an element by lr_t * norm_step * |its start value| (norm tweaking as one more learnable)
    learn_norms: bool = False
    norm_step: float = Field(1.0, gt=0, description="norm/bias step relative to lr and the element's size")
    # how far a rounding offset may go: 0.5 (SignRound's [-1/2, 1/2]: one neighbouring code) or more (a weight
    # may move several codes, as when the weights themselves are trained: EfficientQAT's Block-AP)
    offset_bound: float = Field(0.5, gt=0, le=4.0, description="|v| <= offset_bound (codes)")
    # "sign": signed gradient descent (SignRound); "adam": Adam moments on the same per-parameter step sizes
    optimizer: Literal["sign", "adam"] = "sign"
    # the block error trained and used to choose the kept iterate: "global" = sum of squared errors over
    # sum of squared targets (every element weighs by its size, so huge tokens or channels dominate it);
    # "token" = each token's relative squared error, averaged; "channel" = every hidden channel weighted
    # by 1 / its mean square in the targets (Gemma-3-270M's residual stream holds 81-86 % of its energy
    # in one channel: its global error is mostly that channel's); "norm" = each token's error after RMS
    # normalisation of output and target (the next RMSNorm's view), averaged
    # "capped" = the global error with each channel's weight capped at an average channel's (a massive
    # channel counts as an average one; the rest as in "global")
    loss: Literal["global", "token", "channel", "norm", "capped"] = "global"
    # "auto"/"on" (the same): on CUDA the training step is captured once as a CUDA graph and replayed
    # (signed optimizer, same-shaped batches; early stop then checked every 16 steps); "off": eager steps
    cuda_graph: Switch = "auto"

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.clip_range
        if not 0 < lo <= hi:
            raise ValueError(f"clip_range must be two factors 0 < low <= high, got {list(self.clip_range)}")
        return self


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _expand(t: torch.Tensor, gi: torch.Tensor, gs: int | None) -> torch.Tensor:
    """Per-group values [R, G] to per-column [R, C] (``gs``: contiguous groups of that size)."""
    if gs is not None:
        return t.repeat_interleave(gs, dim=1)
    return t[:, gi]


def _reduce(t: torch.Tensor, gi: torch.Tensor, gs: int | None, groups: int) -> torch.Tensor:
    """The adjoint of ``_expand``: per-column [R, C] summed into their groups [R, G]."""
    if gs is not None:
        return t.view(t.shape[0], groups, gs).sum(2)
    return torch.zeros(t.shape[0], groups, dtype=t.dtype, device=t.device).index_add_(1, gi, t)


class _FakeQuant(torch.autograd.Function):
    """ŵ = (clamp(round(w / s + v0 + v) + z, 0, maxq) - z) · s with per-group s, z [R, G] expanded over
    the columns, in one node. Rounding passes gradients straight through; the clamp passes them where
    ``round(...) + z`` is inside [0, maxq] (ends included, as ``torch.clamp``). Gradients go to v, s
    and z (the same as the chain of small ops gives, without its intermediate tensors)."""

    @staticmethod
    def forward(ctx, w, v0, v, s, z, gi, gs, maxq):
        sc, zc = _expand(s, gi, gs), _expand(z, gi, gs)
        ws = w / sc
        u = torch.round(ws + v0 + v).add_(zc)
        mask = (u >= 0) & (u <= maxq)
        q = u.clamp_(0, maxq).sub_(zc)  # q - z
        out = q * sc
        ctx.save_for_backward(ws, q, sc, mask, gi)
        ctx.gs, ctx.groups = gs, s.shape[1]
        return out

    @staticmethod
    def backward(ctx, g):
        ws, q, sc, mask, gi = ctx.saved_tensors
        gs, groups = ctx.gs, ctx.groups
        gm = g * mask
        gv = gm * sc if ctx.needs_input_grad[2] else None
        gsc = gz = None
        if ctx.needs_input_grad[3]:
            gsc = _reduce(g * q - gm * ws, gi, gs, groups)  # d/ds of (q - z)·s, q through w / s
        if ctx.needs_input_grad[4]:
            gz = _reduce((gm - g) * sc, gi, gs, groups)
        return None, None, gv, gsc, gz, None, None, None


def _linear_map(fns: list[Callable], n: int, device) -> torch.Tensor | None:
    """The matrix M of a chain of linear run-time steps (x -> x M), or None when there is none."""
    if not fns:
        return None
    m = torch.eye(n, device=device, dtype=torch.float32)
    with torch.no_grad():
        for f in fns:
            m = f(m)
    return m.double()


class _Layer:
    """One quantized linear's learnable rounding: offsets [R, C], clipping factors [R, G]."""

    def __init__(self, name: str, ql, w_float: torch.Tensor, init: str, learn_clip: bool, offsets: str = "code"):
        fmt: WeightFormat = ql.fmt
        self.name, self.ql, self.fmt = name, ql, fmt
        self.maxq = fmt.affine_maxq()
        self.sym = bool(getattr(fmt.cfg, "sym", False))
        self.bits = int(fmt.cfg.bits)
        rows, cols = ql.shape
        packed = ql.packed
        dev = packed["qweight"].device
        self.w = self._rotated(ql, w_float.to(dev).float())
        self.gi = group_index(fmt.cfg, cols, packed.get("g_idx"), dev)
        self.groups = packed["scales"].shape[1]
        gs = cols // self.groups if self.groups and cols % self.groups == 0 else None
        contiguous = gs is not None and torch.equal(self.gi, torch.arange(cols, device=dev) // gs)
        self.gs = gs if contiguous else None
        self.g_idx = packed.get("g_idx")
        self.s0 = packed["scales"].float()
        self.sdt = packed["scales"].dtype
        if self.sym:
            self.z0 = torch.full_like(self.s0, float(1 << (self.bits - 1)))
        else:
            self.z0 = packed["zeros"].float()
        q0 = unpack_codes(packed["qweight"], self.bits, cols).float()
        if init == "quantizer":
            # the start is the quantizer's result either way; "value": an integer shift from plain rounding
            # (each weight keeps its fractional position, v can move it to a neighbouring code); "code":
            # every weight on its code's centre (|v| <= 1/2 leaves the code: only clipping moves it)
            ws0 = self.w / self.s0[:, self.gi]
            self.v0 = (q0 - self.z0[:, self.gi]) - (torch.round(ws0) if offsets == "value" else ws0)
        else:
            self.v0 = torch.zeros_like(self.w)
        self.v = torch.zeros_like(self.w, requires_grad=True)
        self.a = torch.ones_like(self.s0, requires_grad=learn_clip)
        self.b = torch.ones_like(self.s0, requires_grad=learn_clip and not self.sym)
        self.dense_dtype = ql.dense_weight.dtype if ql.dense_weight is not None else torch.float32
        self.start = {k: t.clone() for k, t in packed.items() if k in _FORMAT_KEYS}

    @staticmethod
    def _rotated(ql, w: torch.Tensor) -> torch.Tensor:
        """The float weight in the space the grid lives in: y = post(pre(x) Wrᵀ) = x Wᵀ gives
        Wr = Q⁻ᵀ W P⁻ᵀ with x P = pre(x), y Q = post(y)."""
        p = _linear_map(ql._pre, ql.in_features, w.device)
        q = _linear_map(ql._post, ql.out_features, w.device)
        if p is None and q is None:
            return w
        wr = w.double()
        if p is not None:
            wr = torch.linalg.solve(p, wr.t()).t()  # W P⁻ᵀ = (P⁻¹ Wᵀ)ᵀ
        if q is not None:
            wr = torch.linalg.solve(q.t(), wr)  # Q⁻ᵀ (W P⁻ᵀ)
        return wr.float()

    def params(self) -> list[torch.Tensor]:
        return [t for t in (self.v, self.a, self.b) if t.requires_grad]

    def clamp_(self, clip_range: tuple[float, float], offset_bound: float = 0.5) -> None:
        with torch.no_grad():
            self.v.clamp_(-offset_bound, offset_bound)
            self.a.clamp_(*clip_range)
            self.b.clamp_(*clip_range)

    def grid(self, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Group scales and zero points [R, G] for the current clipping factors (STE rounding)."""
        if self.sym:
            s = self.s0 * self.a
            if round_scale:
                s = s.to(self.sdt).float()
            return s, self.z0
        lo = -self.z0 * self.s0 * self.a
        hi = (self.maxq - self.z0) * self.s0 * self.b
        s = ((hi - lo) / self.maxq).clamp_min(1e-12)
        if round_scale:
            s = s.to(self.sdt).float()
            s = torch.where(torch.isfinite(s) & (s > 0), s, self.s0)
        z = torch.clamp(_round_ste(-lo / s), 0, self.maxq)
        return s, z

    def dequant(self) -> torch.Tensor:
        s, z = self.grid()
        return _FakeQuant.apply(self.w, self.v0, self.v, s, z, self.gi, self.gs, self.maxq)

    def dequant_reference(self) -> torch.Tensor:
        """The same quantize-dequantize as a chain of small ops (autograd through each): the test
        reference of ``_FakeQuant``."""
        s, z = self.grid()
        sc, zc = s[:, self.gi], z[:, self.gi]
        q = torch.clamp(_round_ste(self.w / sc + self.v0 + self.v) + zc, 0, self.maxq)
        return (q - zc) * sc

    def state(self) -> list[torch.Tensor]:
        return [self.v.detach().clone(), self.a.detach().clone(), self.b.detach().clone()]

    def load(self, st: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for t, s in zip((self.v, self.a, self.b), st):
                t.copy_(s)

    def write(self) -> None:
        """Pack the current offsets and clipping as stored (scales in their dtype) into the layer."""
        with torch.no_grad():
            s, z = self.grid(round_scale=True)
            sc, zc = s[:, self.gi], z[:, self.gi]
            q = torch.clamp(torch.round(self.w / sc + self.v0 + self.v) + zc, 0, self.maxq)
            groups = [{"scale": s[:, g:g + 1], "zero": z[:, g:g + 1]} for g in range(s.shape[1])]
            self._copy_in(self.fmt.pack(q.to(torch.int32), {}, groups, self.g_idx))

    def restore(self) -> None:
        self._copy_in(self.start)

    def _copy_in(self, packed: dict[str, torch.Tensor]) -> None:
        _copy_into(self.ql, self.name, packed, self.dense_dtype)

    def step_scale(self, p: torch.Tensor) -> float:
        return 1.0


class _LutLayer:
    """One lookup-table linear (any4/any3/any2, NF4, FP4): its codes stay as the quantizer chose them;
    what is trained is the row's table (learned tables only: 2^b values per row) and a factor on each
    group scale (formats with group scales), so ŵ = T[r, q] · s0 · a. A table value moves by at most
    ``lr_t`` times the row's mean table spacing per step (the same reach as a rounding offset on an
    affine grid: about half a step in all); its gradient is exact (no rounding in the loop)."""

    def __init__(self, name: str, ql, learn_clip: bool):
        fmt = ql.fmt
        self.name, self.ql, self.fmt = name, ql, fmt
        rows, cols = ql.shape
        packed = ql.packed
        dev = packed["qweight"].device
        self.codes = unpack_codes(packed["qweight"], int(fmt.cfg.bits), cols).long()
        self.w = self.codes  # device and shape of the layer (the trainer reads ``w.device``)
        lut = packed["lut"].float()
        self.t = lut.clone().requires_grad_(lut.shape[0] == rows and not fmt.lut_rows_fixed)  # per-row tables
        spacing = (lut.amax(1, keepdim=True) - lut.amin(1, keepdim=True)) / max(lut.shape[1] - 1, 1)
        self.t_scale = spacing.clamp_min(1e-8)
        self.has_scales = "scales" in packed
        if self.has_scales:
            self.s0 = packed["scales"].float()
            self.gs = cols // self.s0.shape[1] if cols % self.s0.shape[1] == 0 else None
            self.gi = column_groups(cols, fmt.cfg.group_size, dev)
            self.a = torch.ones_like(self.s0, requires_grad=learn_clip)
        else:
            self.a = torch.ones(1, device=dev)
        self.dense_dtype = ql.dense_weight.dtype if ql.dense_weight is not None else torch.float32
        self.start = {k: t.clone() for k, t in packed.items() if k in ("qweight", "scales", "lut")}

    def params(self) -> list[torch.Tensor]:
        return [t for t in (self.t, self.a) if t.requires_grad]

    def step_scale(self, p: torch.Tensor) -> torch.Tensor | float:
        return self.t_scale if p is self.t else 1.0

    def clamp_(self, clip_range: tuple[float, float], offset_bound: float = 0.5) -> None:
        with torch.no_grad():
            self.a.clamp_(*clip_range)

    def dequant(self) -> torch.Tensor:
        vals = self.t[0][self.codes] if self.t.shape[0] == 1 else self.t.gather(1, self.codes)
        if not self.has_scales:
            return vals
        return vals * _expand(self.s0 * self.a, self.gi, self.gs)

    def state(self) -> list[torch.Tensor]:
        return [self.t.detach().clone(), self.a.detach().clone()]

    def load(self, st: list[torch.Tensor]) -> None:
        with torch.no_grad():
            self.t.copy_(st[0])
            self.a.copy_(st[1])

    def write(self) -> None:
        """Pack the codes with the current table and scales, as stored (fp16)."""
        with torch.no_grad():
            packed = {"qweight": self.start["qweight"], "lut": self.t.detach().to(torch.float16).contiguous()}
            if self.has_scales:
                s = (self.s0 * self.a).to(torch.float16)
                packed["scales"] = torch.where(s != 0, s, self.start["scales"]).contiguous()
            _copy_into(self.ql, self.name, packed, self.dense_dtype)

    def restore(self) -> None:
        _copy_into(self.ql, self.name, self.start, self.dense_dtype)


def _copy_into(ql, name: str, packed: dict[str, torch.Tensor], dense_dtype) -> None:
    with torch.no_grad():
        for k, t in packed.items():
            buf = getattr(ql, k.replace(".", "__"))
            if buf.shape != t.shape or buf.dtype != t.dtype:
                raise NumericalError(f"{name}: recon packed {k} as {tuple(t.shape)} {t.dtype}, "
                                     f"the layer holds {tuple(buf.shape)} {buf.dtype}")
            buf.copy_(t)
        ql.dense_weight = ql.dequantized_weight().to(dense_dtype)


def _is_lut(ql) -> bool:
    fmt = getattr(ql, "fmt", None)
    return (fmt is not None and getattr(fmt.cfg, "type", None) == "lut" and "qweight" in ql.packed
            and "lut" in ql.packed and type(fmt).linear is WeightFormat.linear)


def _same_state(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    return a is b or all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))


def _is_affine(ql) -> bool:
    fmt = getattr(ql, "fmt", None)
    return (fmt is not None and fmt.affine_maxq() is not None and type(fmt).linear is WeightFormat.linear
            and "qweight" in ql.packed and "scales" in ql.packed)


@register("block_plugin", "recon")
class Recon(BlockPlugin):
    Config = ReconConfig
    cfg: ReconConfig

    def __init__(self, cfg: ReconConfig):
        super().__init__(cfg)
        self._float: dict[str, torch.Tensor] = {}
        self._prefix = ""
        self._cw: torch.Tensor | None = None

    @property
    def uses_float_stream(self) -> bool:
        return self.cfg.target == "model"

    def before_solve(self, block: torch.nn.Module, weights: dict[str, torch.Tensor], prefix: str) -> None:
        """Keep the block's float weights [out, in] (by name inside the block) before the solver
        replaces its linears."""
        self._prefix = prefix
        self._float = {n[len(prefix):] if n.startswith(prefix) else n: w.detach().float().clone()
                       for n, w in weights.items()}

    @staticmethod
    def _block_error(block, inputs, kwargs, targets, forward, device, mode: str = "global",
                     cw: torch.Tensor | None = None) -> float:
        num = den = 0.0
        with torch.no_grad():
            for h, kw, f in zip(inputs, kwargs, targets):
                n, d = _err_terms(forward(block, h.to(device), kw), f.to(device), mode, cw)
                num, den = num + float(n), den + float(d)
        return num / max(den, 1e-30)

    def after_block(self, block: torch.nn.Module, inputs: list[torch.Tensor], kwargs: list[dict],
                    float_outputs: list[torch.Tensor], forward: Callable) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        floats, self._float = self._float, {}
        mods = dict(block.named_modules())
        layers, skipped = [], 0
        for n, w in floats.items():
            ql = mods.get(n)
            if ql is None or not hasattr(ql, "packed"):
                skipped += 1
            elif _is_affine(ql):
                layers.append(_Layer(n, ql, w, cfg.init, cfg.learn_clip, cfg.offsets))
            elif _is_lut(ql):
                layers.append(_LutLayer(n, ql, cfg.learn_clip))
            else:
                skipped += 1
        del floats
        if not layers or not inputs:
            return {"recon_layers": 0.0, "recon_skipped": float(skipped)}
        device = layers[0].w.device
        flags = {id(p): p.requires_grad for p in block.parameters()}
        for p in block.parameters():
            p.requires_grad_(False)
        norms = _norm_params(block) if cfg.learn_norms else []
        for p in norms:
            p.requires_grad_(True)
        train = layers + ([_Norms(norms, cfg.norm_step)] if norms else [])
        self._cw = (_channel_weights(float_outputs, device, capped=cfg.loss == "capped")
                    if cfg.loss in ("channel", "capped") else None)
        err = lambda: self._block_error(block, inputs, kwargs, float_outputs, forward, device,  # noqa: E731
                                        cfg.loss, self._cw)
        try:
            before = err()  # the quantizer's result, as the pipeline built it
            init_state = [L.state() for L in train]
            if cfg.init == "rtn":
                self._set(train, init_state)
            seed = (cfg.seed * 1_000_003 + zlib.crc32(self._prefix.encode())) % (2 ** 63)
            sampler = _Sampler(inputs, kwargs, float_outputs, cfg.batch_size, seed)
            best_state, last_state, steps, best_loss, graphed = _train_loop(
                cfg, block, train, sampler, forward, device, self._cw, self._prefix)
            chosen, chosen_err, pick = "quantizer", before, None
            # the start of training is the quantizer's result (init: quantizer) or plain rounding (rtn)
            seen = [init_state] if cfg.init == "quantizer" else []
            cands = [("rtn", init_state if cfg.init == "rtn" else None), ("best", best_state), ("last", last_state)]
            for tag, st in cands:
                if st is None or any(_same_state(st, o) for o in seen):
                    continue  # already evaluated: its error is known (best kept at step 0, say)
                seen.append(st)
                self._set(train, st)
                e = err()
                if e < chosen_err:
                    chosen, chosen_err, pick = tag, e, st
            if pick is None:
                for L in train:
                    L.restore()
            else:
                self._set(train, pick)
        finally:
            for L in layers:
                L.ql.dense_weight = L.ql.dequantized_weight().to(L.dense_dtype)
            for p in block.parameters():
                p.requires_grad_(flags.get(id(p), False))
        return {"recon_err_before": before, "recon_err_after": chosen_err, "recon_steps": float(steps),
                "recon_best_batch_loss": best_loss, "recon_kept": _KEPT[chosen],
                "recon_layers": float(len(layers)), "recon_skipped": float(skipped),
                "recon_graph": float(graphed), "recon_s": time.perf_counter() - t0}

    @staticmethod
    def _set(layers: list[_Layer], state: list[list[torch.Tensor]] | None) -> None:
        for i, L in enumerate(layers):
            if state is not None:
                L.load(state[i])
            L.write()


__all__ = ["Recon", "ReconConfig"]
