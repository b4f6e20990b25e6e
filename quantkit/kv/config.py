"""``kv_cache:`` recipe section, validated (``Recipe.kv_cache`` is a free dict; this checks it)::

    kv_cache: {budget_bits: 3, policy: adaptive}          # measured per-layer allocation
    kv_cache: {budget_bits: 2.5, policy: norm}            # the norm rule (keys usually get more)
    kv_cache: {bits: k4v2}                                # fixed key/value bits, every layer
    kv_cache: {budget_bits: 3, policy: adaptive, residual: 64, key_group_size: 32,
               value_group_size: 32, min_bits: 2, max_bits: 8, metric: attn,
               calibration: {samples: 8, seq_len: 512, seed: 0}}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import RecipeError, pydantic_message


class KVCalibration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(8, ge=1)
    seq_len: int = Field(512, ge=8)
    seed: int = 0


class KVConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budget_bits: float | None = Field(None, ge=1, le=8, description="mean code bits per cached K/V element")
    policy: Literal["adaptive", "sensitivity", "norm", "uniform"] = "adaptive"
    bits: str | None = Field(None, description="fixed bits for every layer, e.g. k4v2 (instead of a budget)")
    key_group_size: int = Field(32, ge=1, description="tokens per key group (keys are quantized per channel)")
    value_group_size: int = Field(32, ge=1, description="channels per value group (values are quantized per token)")
    residual: int = Field(32, ge=0, description="most recent tokens kept in full precision")
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    min_bits: int = Field(2, ge=1, le=8)
    max_bits: int = Field(8, ge=1, le=8)
    choices: list[int] | None = None
    norm: Literal["frobenius", "spectral"] = "frobenius"
    metric: Literal["attn", "kl"] = "attn"
    calibration: KVCalibration = Field(default_factory=KVCalibration)

    @field_validator("bits")
    @classmethod
    def _spec(cls, v):
        if v is None:
            return v
        from ..errors import QuantkitError
        from .spec import parse_spec

        try:
            parse_spec(v)
        except QuantkitError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("choices")
    @classmethod
    def _choices(cls, v):
        if v is not None and (not v or any(not 1 <= b <= 8 for b in v)):
            raise ValueError("choices must be a non-empty list of bit widths in 1..8")
        return v

    @model_validator(mode="after")
    def _one_of(self):
        if (self.budget_bits is None) == (self.bits is None):
            raise ValueError("give exactly one of budget_bits (with a policy) or bits (e.g. k4v2)")
        if self.min_bits > self.max_bits:
            raise ValueError(f"min_bits {self.min_bits} > max_bits {self.max_bits}")
        if self.budget_bits is not None and self.budget_bits < self.min_bits:
            raise ValueError(f"budget_bits {self.budget_bits} is below min_bits {self.min_bits}")
        return self

    @classmethod
    def from_recipe(cls, data: dict[str, Any] | None, where: str = "<recipe>") -> KVConfig | None:
        """Validate a recipe's ``kv_cache`` section; errors name the file and the key."""
        if data is None:
            return None
        if isinstance(data, str):  # kv_cache: k4v2
            data = {"bits": data}
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: kv_cache must be a mapping such as {{budget_bits: 3, policy: adaptive}}, "
                              f"got {type(data).__name__}")
        try:
            return cls(**data)
        except ValidationError as e:
            raise RecipeError(pydantic_message(e, f"{where}: kv_cache")) from None

    def build(self, model_or_qm, tokenizer=None, calibration=None, progress: bool = False) -> dict[str, Any]:
        """The allocation dict for this model (runs the calibration pass for measured policies)."""
        from .allocation import allocate
        from .spec import normalize_allocation, parse_spec

        geometry = {"key_group_size": self.key_group_size, "value_group_size": self.value_group_size,
                    "residual": self.residual, "scale_dtype": self.scale_dtype}
        if self.bits is not None:
            a = parse_spec(self.bits)
            return normalize_allocation({**a, **geometry})
        c = self.calibration
        return allocate(model_or_qm, self.budget_bits, self.policy, tokenizer=tokenizer, calibration=calibration,
                        samples=c.samples, seq_len=c.seq_len, seed=c.seed, choices=self.choices,
                        min_bits=self.min_bits, max_bits=self.max_bits, norm=self.norm, metric=self.metric,
                        progress=progress, **geometry)
