"""Recipes: which quantizer, format and transforms apply to which layers.

A recipe is YAML (a file path or a built-in name from ``recipes/``)::

    name: w4a16-gptq-g128
    quantizer: {type: gptq, damp: 0.01, act_order: true}
    format: {type: int, bits: 4, group_size: 128, sym: false}
    ignore: [lm_head]            # patterns never quantized (lm_head by default)
    targets: ["*"]               # patterns quantized (default: every linear in the decoder blocks)
    rules:                       # mixed precision: first matching rule wins over the defaults
      - match: ["*.down_proj"]
        format: {type: int, bits: 8, group_size: null, sym: true}
    transforms: []               # weight transforms wrapping the quantizer (QuIP, smoothing, ...)
    block_plugins: []            # per-block steps after quantization (norm tweaking, ...)
    finetune: {type: e2e, epochs: 2, lr: 1e-3}   # optional: step sizes trained end to end afterwards
    calibration: {samples: 128, seq_len: 512, seed: 0, corpus: enwiki}

Patterns are globs on the full module name (``model.layers.3.self_attn.q_proj``) or, prefixed
``re:``, regular expressions; a bare name without ``*`` or ``.`` matches the last name component.
Every error names the file and the key.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import RecipeError, pydantic_message
from .formats.base import WeightFormat, format_from_spec
from .quantizers.base import Quantizer, quantizer_from_spec
from .transforms.e2e import FinetuneConfig


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=8)
    seed: int = Field(0, ge=0, lt=2 ** 63)
    corpus: str = "enwiki"
    # the user's own text (or token ids) from a local file instead of the corpus: .txt, .jsonl, .json or
    # .safetensors (quantkit.data.read_calibration_file); field: the text's key in .jsonl/.json objects
    path: str | None = None
    field: str = Field("text", min_length=1)
    batch_size: int = Field(8, ge=1)
    # dtype of the XᵀX / Σx² sums: float64 adds each batch's float32 partial sum exactly, so the
    # statistics do not depend on how batches are split across ranks (bit-equal distributed runs)
    accumulate: Literal["float32", "float64"] = "float32"


class MoEConfig(BaseModel):
    """Mixture-of-experts calibration (quantkit.moe; docs/MOE.md)."""
    model_config = ConfigDict(extra="forbid")
    # every token through every expert while gathering statistics (the block's output keeps the real routing)
    calibrate_all_experts: bool = True
    # an expert matrix whose statistics come from fewer tokens is rounded by the fallback instead
    min_tokens: int = Field(16, ge=0)
    fallback: Literal["rtn-mse"] = "rtn-mse"  # RTN; an int format's range by MSE search (clip: mse)


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    match: list[str]
    quantizer: dict[str, Any] | str | None = None
    format: dict[str, Any] | None = None
    transforms: list[dict[str, Any]] | None = None
    skip: bool = False  # keep matching layers in float

    @field_validator("match", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "custom"
    description: str = ""
    quantizer: dict[str, Any] | str = "rtn"
    format: dict[str, Any] = Field(default_factory=lambda: {"type": "int", "bits": 4, "group_size": 128})
    targets: list[str] = Field(default_factory=lambda: ["*"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    rules: list[Rule] = Field(default_factory=list)
    transforms: list[dict[str, Any]] = Field(default_factory=list)
    block_plugins: list[dict[str, Any]] = Field(default_factory=list)
    # after the block pass: the group scales of every quantized linear trained end to end against the
    # float model's logits (quantkit.transforms.e2e; needs the whole model in memory)
    finetune: FinetuneConfig | None = None
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    kv_cache: dict[str, Any] | None = None
    moe: MoEConfig = Field(default_factory=MoEConfig)
    # large decoder-block tensors that no rule quantizes and no ignore names: a warning instead of an error
    allow_unquantized: bool = False
    source: str = Field("<memory>", exclude=True)

    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    # ---- resolution ------------------------------------------------------------------------
    def validate_plugins(self) -> None:
        """Build every quantizer/format/transform once so that a bad key fails before any work."""
        formats = [("format", self.format)] + [(f"rules[{i}].format", r.format) for i, r in enumerate(self.rules)]
        for where, f in formats:
            g = f.get("group_size") if isinstance(f, dict) else None
            if isinstance(g, bool) or (isinstance(g, int) and g < 1):
                raise RecipeError(f"{self.source}: {where}.group_size: must be a positive number of input columns, or "
                                  f"null for one group per output row (got {g!r})")
        self.scheme_for("__validate__")
        for i, r in enumerate(self.rules):
            if r.format is not None:
                format_from_spec(r.format, where=f"{self.source}: rules[{i}].format")
            if r.quantizer is not None:
                quantizer_from_spec(r.quantizer, where=f"{self.source}: rules[{i}].quantizer")
            for j, t in enumerate(r.transforms or []):
                _transform(t, f"{self.source}: rules[{i}].transforms[{j}]")
        for j, t in enumerate(self.transforms):
            _transform(t, f"{self.source}: transforms[{j}]")
        for j, p in enumerate(self.block_plugins):
            _block_plugin(p, f"{self.source}: block_plugins[{j}]")
        if self.kv_cache is not None:
            from .kv import KVConfig

            KVConfig.from_recipe(self.kv_cache, self.source)  # raises RecipeError naming kv_cache.<key>

    def scheme_for(self, name: str) -> Scheme | None:
        """The scheme for a linear layer, or None if it stays in float."""
        if name != "__validate__":
            if matches(self.ignore, name) or not matches(self.targets, name):
                return None
        q, f, t = self.quantizer, self.format, self.transforms
        where = f"{self.source}: "
        for i, r in enumerate(self.rules):
            if name != "__validate__" and matches(r.match, name):
                if r.skip:
                    return None
                q = r.quantizer if r.quantizer is not None else q
                f = r.format if r.format is not None else f
                t = r.transforms if r.transforms is not None else t
                where = f"{self.source}: rules[{i}]."
                break
        return Scheme(
            quantizer_from_spec(q, where=f"{where}quantizer"),
            format_from_spec(f, where=f"{where}format"),
            [_transform(x, f"{where}transforms[{j}]") for j, x in enumerate(t)],
        )


class Scheme:
    def __init__(self, quantizer: Quantizer, fmt: WeightFormat, transforms: list):
        self.quantizer, self.fmt, self.transforms = quantizer, fmt, transforms

    def spec(self) -> dict[str, Any]:
        return {"quantizer": self.quantizer.spec(), "format": self.fmt.spec()}

    @property
    def needs_calibration(self) -> bool:
        return (self.quantizer.needs_calibration or self.fmt.needs_calibration
                or any(t.needs_calibration for t in self.transforms))

    @property
    def needs_hessian(self) -> bool:
        return self.quantizer.needs_hessian or any(getattr(t, "needs_hessian", False) for t in self.transforms)


def _transform(spec: dict[str, Any], where: str):
    from .transforms.base import transform_from_spec

    return transform_from_spec(spec, where)


def _block_plugin(spec: dict[str, Any], where: str):
    from .transforms.base import block_plugin_from_spec

    return block_plugin_from_spec(spec, where)


def matches(patterns: list[str], name: str) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif "*" in p or "?" in p or "." in p or "[" in p:
            if fnmatch.fnmatchcase(name, p):
                return True
        elif name.rsplit(".", 1)[-1] == p:
            return True
    return False


def builtin_recipes() -> dict[str, str]:
    """Built-in recipe names -> file paths (the YAML files in ``recipes/``)."""
    return {p.stem: str(p) for p in sorted(_builtin_recipe_dir().glob("*.yaml"))}


def _builtin_recipe_dir() -> Path:
    """The YAML folder: ``quantkit/recipes`` in an installed wheel, else ``recipes/`` of the source tree
    (a checkout or an editable install). It is a data folder, not a package: a root
    ``recipes/__init__.py`` would shadow PyPI's ``recipes`` for anything run from the checkout."""
    here = Path(__file__).resolve().parent
    if (here / "recipes").is_dir():
        return here / "recipes"
    if (here.parent / "pyproject.toml").is_file() and (here.parent / "recipes").is_dir():
        return here.parent / "recipes"
    raise RecipeError(f"the built-in recipes are missing (looked in {here.parent / 'recipes'} and "
                      f"{here / 'recipes'}); reinstall quantkit")


def load_recipe(name_or_path: str | dict | Recipe) -> Recipe:
    """Load a recipe from a built-in name, a YAML path, a dict or a Recipe; validate everything."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if isinstance(name_or_path, dict):
        data, source = dict(name_or_path), "<dict>"
    else:
        builtins = builtin_recipes()
        if name_or_path in builtins:
            path = builtins[name_or_path]
        elif os.path.isdir(name_or_path):
            raise RecipeError(f"recipe {name_or_path!r} is a folder; pass a recipe YAML file or a built-in name")
        elif os.path.exists(name_or_path):
            path = name_or_path
        else:
            raise RecipeError(
                f"recipe {name_or_path!r} is neither a file nor a built-in recipe; built-in: "
                f"{', '.join(sorted(builtins))}")
        source = path
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"{path}: cannot read the recipe ({e})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe must be a YAML mapping (key: value), got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise RecipeError(f"{source}: key {bad[0]!r} is not a name; recipe keys are names such as quantizer, format, "
                          f"ignore, calibration")
    try:
        r = Recipe(**data)
    except ValidationError as e:
        raise RecipeError(pydantic_message(e, source)) from None
    r.source = source
    r.validate_plugins()
    return r
