"""Method registry: a method name maps to its frozen config class and its quantize function.

The pipeline, checkpoints and the CLI look methods up here and never branch on a method name.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

METHODS: dict[str, "Method"] = {}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    config: type
    quantize: Callable  # (W [out, in], cfg, *, hessian=None, key=None) -> QuantizedWeight
    needs_hessian: bool = False
    # quantize also takes ``parts=(rows, ...)`` for fused weights (q/k/v, gate/up) and treats them
    # as parts; other methods quantize a fused weight as one matrix
    takes_parts: bool = False


def register_method(name: str, config: type, *, needs_hessian: bool = False, takes_parts: bool = False):
    """Decorator for a method's ``quantize(W, cfg, *, hessian=None, key=None)``."""

    def wrap(fn):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = Method(name, config, fn, needs_hessian, takes_parts)
        config.method = name
        return fn

    return wrap


def method_of(cfg: Any) -> Method:
    for method in METHODS.values():
        if type(cfg) is method.config:
            return method
    raise TypeError(f"{type(cfg).__name__} is not a registered quantization config; "
                    f"known methods: {sorted(METHODS)}")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return {"method": method_of(cfg).name, **dataclasses.asdict(cfg)}


def config_from_dict(d: dict[str, Any]) -> Any:
    d = dict(d)
    name = d.pop("method", None)
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}; known: {sorted(METHODS)}")
    fields = {f.name for f in dataclasses.fields(METHODS[name].config)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"method {name!r} has no options {sorted(unknown)}; options: {sorted(fields)}")
    return METHODS[name].config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
