"""Plugin registries.

A format, quantizer, transform, block plugin or checkpoint layout is one file that decorates
its class with ``@register(kind, name)``. The package folders are scanned once, on first lookup,
so adding a plugin means adding a file and touching no other.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from .errors import QuantkitError

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
