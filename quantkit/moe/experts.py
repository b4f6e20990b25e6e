"""Mixture-of-experts containers: found by pattern, replaced by per-expert linears.

transformers 5 stores a MoE block's experts as fused 3-D parameters in one ``...Experts`` module
(``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]; gpt-oss transposed, interleaved gate/up and
with biases). Such a container is recognised by its shape, never by its class: a module holding 3-D
parameters named ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` with the same leading dimension E.
The layout flags transformers' ``use_experts_implementation`` sets (``is_transposed``, ``is_concatenated``,
``has_bias``, ``has_gate``) are read when present, otherwise inferred from the shapes.

:func:`unfuse_experts` replaces each container with an :class:`Experts` module whose children
``{i}.gate_proj / up_proj / down_proj`` are ordinary ``nn.Linear`` (so every expert matrix is a layer
of its own for calibration, the solvers and every checkpoint layout, with the names vLLM reads), and
whose forward is the original's (the eager loop over hit experts; the original module's own
``_apply_gate`` and ``act_fn``). On real weights the result is checked against the original forward
on random routing; a container whose forward takes the tokens already laid out per expert (Llama 4's:
``forward(hidden_states [E*T, H])``) runs :mod:`quantkit.moe.dense`'s forward instead; any other forward
that the per-expert form does not reproduce is refused with an error.

On GPU, quantized experts (int4 / 4-bit lut QuantLinears) run through ``quantkit.moe.fused``: two grouped
W4A16 launches per layer, no host sync; everything else runs :meth:`Experts.forward_loop` (docs/MOE.md).

Routers stay float: linears next to an expert container with E or 1 outputs (``gate``,
``shared_expert_gate``) are flagged ``_quantkit_router`` and are not quantization targets.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import QuantkitError
from ..models.discovery import ROUTER_FLAG
from .dense import dense_forward, random_expert_major_input, takes_expert_major_input


class ExpertMLP(nn.Module):
    """One expert: gate_proj (absent for ungated experts), up_proj, down_proj."""

    def __init__(self, hidden: int, inter: int, gated: bool, bias: bool, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype, "bias": bias}
        if gated:
            self.gate_proj = nn.Linear(hidden, inter, **kw)
        self.up_proj = nn.Linear(hidden, inter, **kw)
        self.down_proj = nn.Linear(inter, hidden, **kw)


class Experts(nn.Module):
    """E experts as ``{i}.gate_proj/up_proj/down_proj`` linears (float or QuantLinear), with the
    forward of the fused container it replaces: ``forward(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``.

    Calibration (``quantkit.pipeline``) sets ``calibrate_all``: every token then runs through every
    expert (the statistics see all tokens) while the output still uses the real routing; and
    ``count`` (a tensor [E]) receives the number of tokens the router sent to each expert."""

    def __init__(self, host: nn.Module, num_experts: int, hidden: int, inter: int, gated: bool, bias: bool,
                 concatenated: bool, device=None, dtype=None):
        super().__init__()
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.gated, self.concatenated, self.has_bias = gated, concatenated, bias
        for i in range(num_experts):
            self.add_module(str(i), ExpertMLP(hidden, inter, gated, bias, device, dtype))
        # the original container, without its weights: its act_fn / _apply_gate (gpt-oss: alpha, limit)
        object.__setattr__(self, "_host", host)
        self.source_class = type(host).__name__
        self.calibrate_all = False
        self.count: torch.Tensor | None = None
        # the host's forward takes [E*T, H] expert-major rows (Llama 4): quantkit.moe.dense
        self.expert_major = takes_expert_major_input(host)

    def expert(self, i: int) -> ExpertMLP:
        return self._modules[str(i)]

    def _act(self, e: ExpertMLP, x: torch.Tensor) -> torch.Tensor:
        up = e.up_proj(x)
        if not self.gated:
            return self._host.act_fn(up)
        gate = e.gate_proj(x)
        gu = torch.cat([gate, up], -1) if self.concatenated else torch.stack([gate, up], -1).flatten(-2)
        fn = getattr(type(self._host), "_apply_gate", None)
        if fn is None:
            return self._host.act_fn(gate) * up
        return fn(self._host, gu)

    def run_expert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        e = self.expert(i)
        return e.down_proj(self._act(e, x))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        """On GPU with int4/lut4 QuantLinear experts: the fused path (``quantkit.moe.fused``: two grouped
        W4A16 launches, no host sync); otherwise, and while calibrating, :meth:`forward_loop`. A container
        whose original forward takes expert-major rows (Llama 4) runs ``quantkit.moe.dense``."""
        if self.expert_major:
            return dense_forward(self, hidden_states)
        from . import fused

        if fused.usable(self, hidden_states, top_k_index):
            run = fused.stacked_for(self, hidden_states.device)
            if run is not None:
                return run(hidden_states, top_k_index, top_k_weights)
        return self.forward_loop(hidden_states, top_k_index, top_k_weights)

    def forward_loop(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                     ) -> torch.Tensor:
        """One call per hit expert (each QuantLinear's own kernel, or float linears). The (slot, token)
        pairs are sorted by expert once and the per-expert counts read with one host sync; each expert
        sees its tokens in the order ``torch.where(top_k_index.t() == i)`` gives (slot-major), so the
        output is bit-identical to the former loop of one ``torch.where`` and one sync per expert."""
        out = torch.zeros_like(hidden_states)
        E = self.num_experts
        T = top_k_index.shape[0]
        with torch.no_grad():
            flat = top_k_index.t().reshape(-1)  # slot-major: pair j*T + t is token t's slot j
            if self.count is not None:  # (out-of-range ids clamp as the router counts always did)
                self.count += torch.bincount(flat.clamp(0, E), minlength=E + 1)[:E].to(self.count.device)
            key = torch.where((flat >= 0) & (flat < E), flat, E)
            order = torch.argsort(key, stable=True)
            counts = torch.bincount(key, minlength=E + 1)[:E].tolist()  # the one host sync
            toks, poss = order % T, order // T
        start = 0
        for i in range(E):
            n = counts[i]
            if self.calibrate_all:  # MoE: statistics from every token, output from the routed ones
                y_all = self.run_expert(i, hidden_states)
            if n == 0:
                continue
            tok, pos = toks[start:start + n], poss[start:start + n]
            start += n
            y = y_all[tok] if self.calibrate_all else self.run_expert(i, hidden_states[tok])
            y = y * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_quantkit_fused", None)  # the fused path's stacked copy (quantkit.moe.fused)
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden}, intermediate={self.inter}, "
                f"gated={self.gated}, bias={self.has_bias}, from={self.source_class}"
                + (", expert_major" if self.expert_major else ""))


def _fused_layout(mod: nn.Module) -> dict | None:
    """The layout of a fused expert container, or None if ``mod`` is not one."""
    p = mod._parameters
    up_name = "gate_up_proj" if "gate_up_proj" in p else "up_proj" if "up_proj" in p else None
    if up_name is None or "down_proj" not in p:
        return None
    up, down = p[up_name], p["down_proj"]
    if up is None or down is None or up.dim() != 3 or down.dim() != 3 or up.shape[0] != down.shape[0]:
        return None
    gated = bool(getattr(mod, "has_gate", up_name == "gate_up_proj"))
    mult = 2 if gated else 1
    E = up.shape[0]
    if hasattr(mod, "is_transposed"):
        transposed = bool(mod.is_transposed)
    else:  # [E, mult*I, H] + [E, H, I], or transposed [E, H, mult*I] + [E, I, H]
        plain = up.shape[1] == mult * down.shape[2] and up.shape[2] == down.shape[1]
        trans = up.shape[2] == mult * down.shape[1] and up.shape[1] == down.shape[2]
        if plain == trans:
            return None
        transposed = trans
    H, inter = (up.shape[1], down.shape[1]) if transposed else (up.shape[2], down.shape[2])
    if (up.shape[2] if transposed else up.shape[1]) != mult * inter:
        return None
    bias = getattr(mod, "has_bias", f"{up_name}_bias" in p)
    if getattr(mod, "has_post_expert_norm", False):
        raise QuantkitError(f"{type(mod).__name__}: experts with a post-expert norm are not supported yet")
    return {"up": up_name, "E": E, "H": H, "I": inter, "gated": gated, "transposed": transposed,
            "concatenated": bool(getattr(mod, "is_concatenated", True)), "bias": bool(bias)}


def _split(w: torch.Tensor, lay: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
    """[mult*I, ...] rows of one expert's gate_up (already [out, in]) -> (gate, up)."""
    if not lay["gated"]:
        return None, w
    if lay["concatenated"]:
        return w[: lay["I"]], w[lay["I"]:]
    return w[0::2], w[1::2]


def _set(lin: nn.Linear, w: torch.Tensor, b: torch.Tensor | None) -> None:
    lin.weight = nn.Parameter(w.detach().contiguous(), requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b.detach().contiguous(), requires_grad=False)


def _build(mod: nn.Module, lay: dict) -> Experts:
    up_w, down_w = mod._parameters[lay["up"]], mod._parameters["down_proj"]
    meta = up_w.device.type == "meta"
    ex = Experts(mod, lay["E"], lay["H"], lay["I"], lay["gated"], lay["bias"], lay["concatenated"],
                 device="meta" if meta else None, dtype=up_w.dtype)
    if meta:
        return ex
    up_b = mod._parameters.get(f"{lay['up']}_bias") if lay["bias"] else None
    down_b = mod._parameters.get("down_proj_bias") if lay["bias"] else None
    for i in range(lay["E"]):
        e = ex.expert(i)
        wu = up_w[i].t() if lay["transposed"] else up_w[i]
        wd = down_w[i].t() if lay["transposed"] else down_w[i]
        g, u = _split(wu, lay)
        gb, ub = _split(up_b[i], lay) if up_b is not None else (None, None)
        if g is not None:
            _set(e.gate_proj, g, gb)
        _set(e.up_proj, u, ub)
        _set(e.down_proj, wd, down_b[i] if down_b is not None else None)
    return ex


@torch.no_grad()
def _verify(name: str, orig: nn.Module, ex: Experts) -> None:
    """The per-expert module computes what the fused one did, on random tokens and routing."""
    g = torch.Generator().manual_seed(0)
    p = next(orig.parameters())
    T, k = 12, min(2, ex.num_experts)
    x = torch.randn(T, ex.hidden, generator=g).to(p.device, p.dtype)
    idx = torch.stack([torch.randperm(ex.num_experts, generator=g)[:k] for _ in range(T)]).to(p.device)
    wts = torch.rand(T, k, generator=g).to(p.device, p.dtype)
    args = (x, idx, wts)
    if ex.expert_major:
        args = (random_expert_major_input(ex.num_experts, ex.hidden, T, g).to(p.device, p.dtype),)
    try:
        want = orig(*args)
    except Exception as e:  # noqa: BLE001 - a container with another forward signature
        raise QuantkitError(f"{name} ({type(orig).__name__}): expert container with an unsupported forward "
                            f"({type(e).__name__}: {str(e)[:120]}); add `{name}` to the recipe's ignore (it stays "
                            f"float) or open an issue for this layout") from None
    got = ex(*args)
    tol = 1e-4 if p.dtype == torch.float32 else 3e-2
    err = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)
    if not torch.isfinite(err) or err > tol:
        raise QuantkitError(f"{name} ({type(orig).__name__}): the per-expert form of this expert container does not "
                            f"reproduce its forward (relative error {float(err):.2e}); its layout is not supported: "
                            f"add `{name}` to the recipe's ignore (it stays float) or open an issue")


def flag_routers(model: nn.Module) -> list[str]:
    """Flag the modules beside each expert container whose weight has E or 1 rows (transformers 5's
    ``...TopKRouter``, an ``nn.Linear`` gate, Qwen2-MoE's ``shared_expert_gate``) as routers: kept float."""
    out = []
    for pname, parent in model.named_modules():
        ex = [c for c in parent.children() if isinstance(c, Experts)]
        if not ex:
            continue
        for cname, c in parent.named_children():
            w = c._parameters.get("weight")
            if not isinstance(c, Experts) and w is not None and w.dim() == 2 and w.shape[0] in (ex[0].num_experts, 1):
                setattr(c, ROUTER_FLAG, True)
                out.append(f"{pname}.{cname}" if pname else cname)
    return out


def unfuse_experts(model: nn.Module, verify: bool = True, skip=None) -> list[str]:
    """Replace every fused expert container in ``model`` by an :class:`Experts` module (in place);
    returns the names of the replaced containers. ``skip(name)`` true leaves a container fused (a
    recipe's ``ignore``: it stays float). Meta-device models (checkpoint skeletons) get meta linears.
    Idempotent."""
    found = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Experts) or (skip is not None and skip(name)):
            continue
        lay = _fused_layout(mod)
        if lay is None:
            continue
        ex = _build(mod, lay)
        if verify and not any(t.device.type == "meta" for t in mod.parameters()):
            _verify(name, mod, ex)
        for pn in list(mod._parameters):  # the host keeps act_fn / _apply_gate, not the fused weights
            del mod._parameters[pn]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ex)
        found.append(name)
    flag_routers(model)
    return found


def load_fused(ex: Experts, fused: dict[str, torch.Tensor], where: str) -> None:
    """Fill ``ex`` (split on the meta device) from its container's fused tensors as the checkpoint stores
    them (``{"gate_up_proj": [E, ...], "down_proj": ..., biases}``): streamed loading."""
    host = ex._host
    for k, t in fused.items():
        host._parameters[k] = nn.Parameter(t, requires_grad=False)
    try:
        lay = _fused_layout(host)
        if lay is None or lay["E"] != ex.num_experts or lay["H"] != ex.hidden or lay["I"] != ex.inter:
            raise QuantkitError(f"{where}: the stored expert tensors {sorted(fused)} do not have the layout of "
                                f"{ex.num_experts} experts of {ex.hidden} x {ex.inter}; the checkpoint does not "
                                "match its config.json")
        built = _build(host, lay)
    finally:
        for k in fused:
            host._parameters.pop(k, None)
    ex.load_state_dict(built.state_dict(), strict=True, assign=True)


def is_fused_container(mod: nn.Module) -> bool:
    """Whether ``mod`` holds E experts as fused 3-D parameters (before :func:`unfuse_experts`)."""
    try:
        return _fused_layout(mod) is not None
    except QuantkitError:  # a layout we refuse is still a fused container
        return True


def expert_containers(model: nn.Module) -> dict[str, Experts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Experts)}


def prepare(model: nn.Module, ignore: list[str]) -> list[str]:
    """Before quantizing: split every expert container the recipe's ``ignore`` does not name."""
    from ..recipe import matches

    return unfuse_experts(model, skip=lambda n: matches(ignore, n))
