"""Build a Llama from a flat ``{name: array}`` dict, and read or replace its parameters by name.

Names are HF's without the ``model.`` prefix (``layers.0.self_attn.q_proj.weight``). The model is
built abstractly (``nnx.eval_shape``) and then filled, so no random weights are ever materialized.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
from flax import nnx

from jaxquant.model.config import LlamaConfig
from jaxquant.model.llama import Llama


def _variables(model: nnx.Module) -> Iterator[tuple[str, nnx.Variable]]:
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        yield ".".join(str(p) for p in path), var


def param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    return {name: tuple(var.get_value().shape) for name, var in _variables(abstract)}


def model_from_params(cfg: LlamaConfig, params: dict[str, Any], *, source: str = "params") -> Llama:
    """A Llama whose parameters are exactly ``params``; clear errors for missing, extra or misshaped tensors."""
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    expected = dict(_variables(model))
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing:
        raise ValueError(f"{source}: missing tensors {_short(missing)}")
    if extra:
        raise ValueError(f"{source}: unexpected tensors {_short(extra)} (not part of a Llama with this config)")
    for name, var in expected.items():
        value = params[name]
        shape = tuple(value.shape)
        if shape != tuple(var.get_value().shape):
            raise ValueError(f"{source}: tensor {name} has shape {shape}, expected {tuple(var.get_value().shape)}")
        var.set_value(value)
    return model


def named_params(model: nnx.Module) -> dict[str, Any]:
    """``{name: value}``; a value is a dense array or a ``QuantizedWeight``."""
    return {name: var.get_value() for name, var in _variables(model)}


def device_leaves(model: nnx.Module) -> tuple[list[jax.Array], Callable[[list], Any]]:
    """The module's arrays on the device as a flat list, and the function that rebuilds the module
    from such a list (inside jit). Jitted decode steps take the list: flattening the module's state,
    with hundreds of quantized-weight dataclasses, on every call costs several times more host time.
    Quantized weights go in their serving form (``QuantizedWeight.for_serving``)."""
    from jaxquant.formats.base import is_quantized

    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda v: v.for_serving() if is_quantized(v) else v, state, is_leaf=is_quantized)
    leaves, treedef = jax.tree.flatten(jax.device_put(state))
    return leaves, lambda leaves: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def set_param(model: nnx.Module, name: str, value: Any) -> None:
    _variable(model, name).set_value(value)


def get_param(model: nnx.Module, name: str) -> Any:
    return _variable(model, name).get_value()


def _variable(model: nnx.Module, name: str) -> nnx.Variable:
    node: Any = model
    for part in _path(name):
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _path(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")
