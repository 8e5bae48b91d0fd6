"""The public weight-level API: quantize_weight, dequantize, matmul (dense or any format)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats import autodiff
from jaxquant.formats.base import QuantizedWeight
from jaxquant.methods.registry import method_of


def quantize_weight(w: Any, cfg: Any, *, hessian: Any = None, key: jax.Array | None = None,
                    name: str = "weight", parts: tuple[int, ...] | None = None) -> QuantizedWeight:
    """Quantize one ``[out, in]`` weight with the method of ``cfg``.

    ``hessian`` is the ``[in, in]`` second moment of the layer's inputs, required by
    Hessian-aware methods. ``name`` only labels error messages. ``parts``: the output rows of each
    part of a fused weight (q/k/v, gate/up), for methods that treat parts apart (QuIP#).
    """
    method = method_of(cfg)
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point weight, got {w.dtype}")
    if not bool(jnp.isfinite(w).all()):
        raise ValueError(f"{name}: weight contains NaN or Inf")
    if hessian is not None:
        hessian = jnp.asarray(hessian, jnp.float32)
        if hessian.shape != (w.shape[1], w.shape[1]):
            raise ValueError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match "
                             f"the weight's input width {w.shape[1]}")
        if not bool(jnp.isfinite(hessian).all()):
            raise ValueError(f"{name}: Hessian contains NaN or Inf")
    elif method.needs_hessian:
        raise ValueError(f"{name}: method {method.name!r} needs a Hessian (hessian=...)")
    if key is None:
        key = jax.random.key(0)
    if parts and method.takes_parts:
        return method.quantize(w, cfg, hessian=hessian, key=key, parts=tuple(parts))
    return method.quantize(w, cfg, hessian=hessian, key=key)


def dequantize(w: Any, dtype=jnp.float32) -> jax.Array:
    """Dense ``[out, in]`` array of a quantized or dense weight."""
    if isinstance(w, QuantizedWeight):
        return w.dequantize(dtype)
    return jnp.asarray(w, dtype)


def matmul(x: jax.Array, w: Any, backend: str = "auto") -> jax.Array:
    """``x @ W.T`` for a dense ``[out, in]`` array or any quantized weight (differentiable: the
    backward of a quantized weight goes through ``dequantize``, see ``formats.autodiff``)."""
    if isinstance(w, QuantizedWeight):
        return autodiff.matmul(x, w, backend)
    if isinstance(w, np.ndarray):
        w = jnp.asarray(w)
    return x @ w.astype(x.dtype).T


def bits_per_weight(w: Any) -> float:
    if isinstance(w, QuantizedWeight):
        return w.bits_per_weight
    return float(np.dtype(w.dtype).itemsize * 8)
