"""Plugin registries.

A format, quantizer, transform, block plugin or checkpoint layout is one file that decorates
its class with ``@register(kind, name)``. The package folders are scanned once, on first lookup,
so adding a plugin means adding a file and touching no other.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from .errors import QuantkitError, RecipeError, pydantic_message

# kind -> package whose submodules hold the plugins of that kind
_PACKAGES = {
    "format": "quantkit.formats",
    "quantizer": "quantkit.quantizers",
    "transform": "quantkit.transforms",
    "block_plugin": "quantkit.transforms",
    "layout": "quantkit.checkpoint",
}
_REGISTRY: dict[str, dict[str, Any]] = {k: {} for k in _PACKAGES}
_SCANNED: set[str] = set()


def register(kind: str, name: str) -> Callable[[Any], Any]:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown plugin kind {kind!r}")

    def deco(obj: Any) -> Any:
        prev = _REGISTRY[kind].get(name)
        if prev is not None and prev is not obj and prev.__qualname__ != obj.__qualname__:
            raise ValueError(f"{kind} {name!r} registered twice ({prev} and {obj})")
        _REGISTRY[kind][name] = obj
        obj.registry_name = name
        return obj

    return deco


def _scan(kind: str) -> None:
    pkg_name = _PACKAGES[kind]
    if pkg_name in _SCANNED:
        return
    _SCANNED.add(pkg_name)
    pkg = importlib.import_module(pkg_name)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{pkg_name}.{info.name}")


def get(kind: str, name: str) -> Any:
    _scan(kind)
    if not isinstance(name, str):
        raise QuantkitError(f"a {kind} type must be a name (a string), got {name!r}")
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY[kind])) or "(none)"
        raise QuantkitError(f"unknown {kind} {name!r}; known {kind}s: {known}") from None


def names(kind: str) -> list[str]:
    _scan(kind)
    return sorted(_REGISTRY[kind])


def from_spec(kind: str, spec: Any, where: str, *, example: str, names: bool = True) -> Any:
    """Build the ``kind`` plugin a recipe or checkpoint spec describes: ``{"type": NAME, **options}``
    (or, with ``names``, just ``"NAME"``), its options validated by the class's pydantic ``Config``.
    Every error names ``where`` (file and key); ``example`` is a type to show in the message."""
    if names and isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or "type" not in spec:
        raise RecipeError(f"{where}: expected {'a name or ' if names else ''}a mapping with a 'type' key "
                          f"(e.g. type: {example}), got {spec!r}")
    cls = get(kind, spec["type"])
    # a Config with its own ``type`` field (formats) validates the whole spec, the others their options
    options = spec if "type" in cls.Config.model_fields else {k: v for k, v in spec.items() if k != "type"}
    try:
        cfg = cls.Config(**options)
    except ValidationError as e:
        raise RecipeError(pydantic_message(e, where)) from None
    return cls(cfg)
