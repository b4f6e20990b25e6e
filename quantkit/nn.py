"""The quantized linear layer.

It holds the packed tensors of its format as buffers (exactly what the checkpoint stores) and
computes from them: on GPU through a Triton kernel from ``quantkit.kernels`` when one exists for
the format, otherwise (and always on CPU) through the format's plain-PyTorch ``linear``.
Transforms that rotate or scale the input/output (QuIP, smoothing) add their run-time steps
around the matmul; their tensors are buffers too.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, QuantkitError
from .formats.base import WeightFormat, format_from_spec, packed_bits_per_weight
from .registry import get as _get

# torch.compile: under tracing, a QuantLinear is one opaque operator, ``quantkit::qlinear`` (its
# Triton launch, transforms and bias run inside it as in eager mode), so a whole model compiles
# without graph breaks (fullgraph=True) and CUDA graphs (mode="reduce-overhead") capture the
# kernels. Eager calls do not go through the operator (its dispatch would add host time).
_LAYERS: dict[int, weakref.ref] = {}
_HANDLES = itertools.count(1)

# Bumped whenever a QuantLinear is made or its buffers, bias or dense weight are replaced or moved:
# caches built from QuantLinear tensors (quantkit.moe.fused's stacked experts) compare it to rebuild.
_GENERATION = [0]
_WATCHED = frozenset({"bias", "dense_weight"})


def generation() -> int:
    return _GENERATION[0]


def bump_generation() -> None:
    _GENERATION[0] += 1


@torch.library.custom_op("quantkit::qlinear", mutates_args=())
def _qlinear_op(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    layer = _LAYERS[handle]()
    if layer is None:
        raise RuntimeError(f"quantkit::qlinear: layer {handle} no longer exists")
    with torch.no_grad():  # the operator's gradient is its registered autograd formula, not this
        return layer._forward_eager(x)


@_qlinear_op.register_fake
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _qlinear_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.handle = inputs[1]


@torch.library.custom_op("quantkit::qlinear_grad", mutates_args=())
def _qlinear_grad_op(grad: torch.Tensor, x: torch.Tensor, handle: int) -> torch.Tensor:
    """d(layer(x))/dx applied to grad, through the layer's plain-PyTorch path (transforms included);
    an operator too, so that tracing a backward does not trace into the layer."""
    layer = _LAYERS[handle]()
    if layer is None:
        raise RuntimeError(f"quantkit::qlinear_grad: layer {handle} no longer exists")
    # (an operator's implementation runs below autograd: torch.func's vjp, not torch.autograd)
    _, vjp = torch.func.vjp(lambda t: layer._forward_eager(t, differentiable=True), x)
    (gx,) = vjp(grad)
    return gx


@_qlinear_grad_op.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, handle: int) -> torch.Tensor:
    return torch.empty_like(x)


def _qlinear_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.quantkit.qlinear_grad(grad, x, ctx.handle), None, None


_qlinear_op.register_autograd(_qlinear_backward, setup_context=_qlinear_setup)


class _WithGrad(torch.autograd.Function):
    """The layer's kernel forward (no autograd history of its own) with the gradient with respect to x
    of its plain-PyTorch path: adapters trained on a quantized model keep the kernel's speed."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        ctx.save_for_backward(x)
        return layer._forward_eager(x)  # grad mode is off in here: the kernel path

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(ctx.layer._forward_eager(xr, differentiable=True), xr, grad)
        return gx, None


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, spec: dict[str, Any],
                 packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.fmt: WeightFormat = format_from_spec(spec["format"], where="quantization_config.format")
        self.fmt.check_shape((out_features, in_features))
        self._keys = sorted(packed)
        for k, t in packed.items():
            self.register_buffer(k.replace(".", "__"), t)
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.bias = None
        # run-time steps of transforms, e.g. [{"type": "hadamard", ...}]
        self._pre, self._post = [], []
        for tspec in spec.get("transforms", []):
            pre, post = _get("transform", tspec["type"]).runtime(tspec, self)
            if pre is not None:
                self._pre.append(pre)
            if post is not None:
                self._post.insert(0, post)
        self._kernel = None
        self._kernel_device = None
        self._plain = not self._pre and not self._post
        self._register()
        # the pipeline sets this to the dequantized weight (== unpack(packed), exactly) while the
        # block is being calibrated, so recomputing block outputs skips per-call unpacking
        self.dense_weight: torch.Tensor | None = None
        # validate now: a checkpoint whose tensors do not fit the spec fails at load, not at forward
        with torch.no_grad():
            if all(t.device.type != "meta" for t in packed.values()):
                self.fmt.unpack(self.packed, self.shape)
        bump_generation()

    def __setattr__(self, name, value):
        if name in _WATCHED or name in self.__dict__.get("_buffers", ()):
            bump_generation()
            if name != "dense_weight" and "_kernel_device" in self.__dict__:
                self._kernel, self._kernel_device = None, None  # built on the replaced tensors
        super().__setattr__(name, value)

    def _load_from_state_dict(self, *args, **kwargs):
        bump_generation()
        self._kernel, self._kernel_device = None, None
        return super()._load_from_state_dict(*args, **kwargs)

    def _register(self) -> None:
        """A handle of its own for the ``quantkit::qlinear`` operator, dropped with the layer."""
        self._handle = next(_HANDLES)
        _LAYERS[self._handle] = weakref.ref(self)
        weakref.finalize(self, _LAYERS.pop, self._handle, None)

    def __setstate__(self, state):
        # copy.deepcopy / unpickling: the copy gets its own handle (not the original's)
        super().__setstate__(state)
        self._register()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def packed(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k.replace(".", "__")) for k in self._keys}

    def bits_per_weight(self) -> float:
        return packed_bits_per_weight(self.packed, self.shape)

    def dequantized_weight(self) -> torch.Tensor:
        return self.fmt.unpack(self.packed, self.shape)

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half() replace the buffers: a kernel built on the old ones is dropped
        # (it would compute from, and keep alive, a stale copy)
        self._kernel, self._kernel_device = None, None
        bump_generation()
        return super()._apply(fn, *args, **kwargs)

    def _get_kernel(self, device: torch.device):
        if self._kernel_device != device:
            from . import kernels  # local import: kernels are optional (Triton)

            self._kernel = kernels.find_kernel(self.fmt, self.packed, self.shape, device)
            self._kernel_device = device
        return self._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and self.dense_weight is None:
            return torch.ops.quantkit.qlinear(x, self._handle, self.out_features)
        return self._forward_eager(x)

    def _forward_eager(self, x: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """differentiable: the plain-PyTorch path even where a kernel serves (the gradient's path)."""
        if not differentiable and x.requires_grad and torch.is_grad_enabled() and self.dense_weight is None \
                and ((self._kernel is not None and x.device == self._kernel_device)
                     or (x.is_cuda and self._get_kernel(x.device) is not None)):
            # the Triton kernels have no backward: kernel forward, plain-PyTorch gradient
            return _WithGrad.apply(x, self)
        # decode fast path: a GPU kernel already built for this device, nothing around the matmul
        kernel = self._kernel
        if kernel is not None and self._plain and self.bias is None and self.dense_weight is None \
                and x.device == self._kernel_device and not differentiable:
            return kernel(x)
        for f in self._pre:
            x = f(x)
        kernel = self._get_kernel(x.device) if x.is_cuda and self.dense_weight is None and not differentiable \
            else None
        if self.dense_weight is not None:
            y = torch.nn.functional.linear(x, self.dense_weight.to(x.dtype))
        elif kernel is not None:
            y = kernel(x)
        else:
            y = self.fmt.linear(x, self.packed, self.shape)
        for f in self._post:
            y = f(y)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.fmt.describe()}, bias={self.bias is not None}")


def make_quantlinear(shape: tuple[int, int], spec: dict[str, Any], packed: dict[str, torch.Tensor],
                     bias: torch.Tensor | None = None, *, dense_weight: torch.Tensor | None = None,
                     checkpoint: str | None = None, name: str = "") -> QuantLinear:
    """The one place a :class:`QuantLinear` is made from packed tensors: a solve's result
    (quantkit.solve, both solvers), a resumed block (quantkit.resume) and every checkpoint layout.

    ``shape`` is [out, in]; ``dense_weight`` the dequantized weight a solve already holds (the pipeline
    uses it while the block is calibrated). With ``checkpoint`` (the folder read) a tensor that does not
    fit ``spec`` raises a CheckpointError naming the folder and the layer ``name``."""
    try:
        ql = QuantLinear(shape[1], shape[0], spec, {k: v.contiguous() for k, v in packed.items()}, bias)
    except QuantkitError as e:
        if checkpoint is None:
            raise
        raise CheckpointError(f"{checkpoint}: layer {name!r}: {e}") from None
    ql.dense_weight = dense_weight
    return ql


@contextlib.contextmanager
def cached_dequant(model: nn.Module) -> Iterator[int]:
    """While open, each weight-only quantized linear on CPU computes from one unpacked copy of its
    weight instead of unpacking it at every forward (evaluation speed on CPU); yields how many.

    On CPU a weight-only format's forward is ``F.linear(x, unpack(packed))``: this holds ``unpack(packed)``
    as the layer's ``dense_weight`` (the state the pipeline uses while calibrating), so the outputs are
    exactly the same. Layers whose format quantizes activations (its own ``linear``), layers on GPU
    (Triton kernels) and layers already holding a dense weight are left alone. Memory: one float copy."""
    held = []
    try:
        with torch.no_grad():
            for m in model.modules():
                if not isinstance(m, QuantLinear) or m.dense_weight is not None:
                    continue
                if type(m.fmt).linear is not WeightFormat.linear:
                    continue
                if any(t.device.type != "cpu" for t in m.packed.values()):
                    continue
                m.dense_weight = m.dequantized_weight()
                held.append(m)
        yield len(held)
    finally:
        for m in held:
            m.dense_weight = None
