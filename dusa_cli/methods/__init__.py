"""TTA methods: one file each, found by name through a small registry.

The engine and the config schema only ever call `get_method`; a new method is a new file that
decorates its class with `@register_method` and is imported below.
"""

from __future__ import annotations

from typing import TypeVar

from dusa_cli.errors import did_you_mean
from dusa_cli.methods.base import StepOutput, TTAMethod

_REGISTRY: dict[str, type[TTAMethod]] = {}
M = TypeVar("M", bound=type[TTAMethod])


def register_method(cls: M) -> M:
    registered = _REGISTRY.get(cls.name)
    if registered is not None and (registered.__module__, registered.__qualname__) != (cls.__module__, cls.__qualname__):  # a module re-run (reload) is no clash
        raise ValueError(f"method name '{cls.name}' is taken by {registered.__module__}.{registered.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[TTAMethod]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method '{name}'{did_you_mean(name, _REGISTRY)} (available: {', '.join(available_methods())})")
    return _REGISTRY[name]


from dusa_cli.methods import cotta, dusa, dusa_seg, dusa_u, eata, norm, rotta, sar, source, tent  # noqa: E402,F401  (register the methods)

__all__ = ["StepOutput", "TTAMethod", "available_methods", "get_method", "register_method"]
