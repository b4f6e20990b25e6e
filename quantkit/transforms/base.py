"""Interfaces for weight transforms and block plugins.

A **Transform** wraps the quantizer of one linear layer. ``before(ctx)`` may rewrite the weight
and its statistics (e.g. rotate W and H), record tensors to store (``ctx.add_tensor``) and the
run-time step the quantized layer must apply (``ctx.runtime.append(spec)``). At load time
``runtime(spec, layer)`` returns ``(pre, post)``: functions applied to the layer's input before
the matmul and to its output after it (before the bias). Registered as ``("transform", name)``.

A **BlockPlugin** runs after a decoder block's linears are quantized, with the block's inputs
and its float outputs on those inputs (e.g. norm tweaking, reconstruction); ``before_solve`` sees the
float weights before they are replaced. Registered as ``("block_plugin", name)``.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict

from ..quantizers.base import LayerStats
from ..registry import from_spec


class PluginConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _switch(v: Any) -> Any:
    # YAML 1.1 (PyYAML) reads a bare on/off/yes/no/true/false as a boolean: `autocast: off` arrives as False
    return ("on" if v else "off") if isinstance(v, bool) else v


# an auto/on/off option that also takes the booleans YAML makes of a bare on/off
Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_switch)]


@dataclass
class LayerContext:
    name: str
    weight: torch.Tensor  # float32 [out, in], on the compute device; transforms may replace it
    stats: LayerStats
    seed: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # extra tensors to store
    runtime: list[dict[str, Any]] = field(default_factory=list)  # run-time transform specs

    def add_tensor(self, key: str, t: torch.Tensor) -> None:
        self.tensors[key] = t


class Transform(ABC):
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    needs_hessian: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = True
    registry_name: ClassVar[str]

    def __init__(self, cfg: PluginConfig):
        self.cfg = cfg

    def spec(self) -> dict[str, Any]:
        return {"type": self.registry_name, **self.cfg.model_dump()}

    def before(self, ctx: LayerContext) -> None:
        """Rewrite ``ctx.weight`` / ``ctx.stats`` before the quantizer runs."""

    @classmethod
    def runtime(cls, spec: dict[str, Any], layer: torch.nn.Module
                ) -> tuple[Callable | None, Callable | None]:
        return None, None


class BlockPlugin(ABC):
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    registry_name: ClassVar[str]

    def __init__(self, cfg: PluginConfig):
        self.cfg = cfg

    def spec(self) -> dict[str, Any]:
        return {"type": self.registry_name, **self.cfg.model_dump()}

    @property
    def uses_float_stream(self) -> bool:
        """True: ``after_block`` gets, as ``float_outputs``, the *float model's* hidden states after this
        block (the calibration text run through the float blocks only), so that the quantized block may
        also undo the error of the quantized blocks before it. False (default): the float block's
        outputs on the same inputs as the quantized block. The pipeline carries the float stream (a
        second copy of the calibration activations) only when a plugin asks for it."""
        return False

    def before_solve(self, block: torch.nn.Module, weights: dict[str, torch.Tensor], prefix: str) -> None:
        """Called before the block's linears are quantized, with their float weights [out, in] by full
        name (``prefix`` is the block's); e.g. reconstruction keeps them. Default: nothing."""

    def after_block(self, block: torch.nn.Module, inputs: list[torch.Tensor], kwargs: list[dict],
                    float_outputs: list[torch.Tensor], forward: Callable) -> dict[str, float]:
        """Adjust the quantized ``block``; ``forward(block, hidden, kwargs)`` runs it. ``inputs`` are the
        quantized model's hidden states entering the block; ``float_outputs`` the targets (see
        :attr:`uses_float_stream`). Returns metrics."""
        return {}


def transform_from_spec(spec: dict[str, Any] | str, where: str = "transforms") -> Transform:
    return from_spec("transform", spec, where, example="quip")


def block_plugin_from_spec(spec: dict[str, Any] | str, where: str = "block_plugins") -> BlockPlugin:
    return from_spec("block_plugin", spec, where, example="norm_tweak")
