"""Gradients through a quantized ``x @ W.T`` for every format and backend.

Kernels (Pallas, CUDA) have no backward. ``matmul`` runs the format's own forward (whatever
backend it picks) and takes its backward from the jnp reference ``x @ dequantize(W).T`` in fp32,
so fine-tuning can differentiate with respect to ``x`` and to every float leaf of the weight
(sign vectors, scales, zeros, tables, adapters). Integer leaves (codes) get ``float0`` cotangents:
they are not differentiable and a trainer never updates them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _reference(x: jax.Array, qw) -> jax.Array:
    """The oracle, in fp32 whatever the activation dtype, so bf16 training keeps accurate gradients."""
    y = x.astype(jnp.float32) @ qw.dequantize(jnp.float32).T
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, qw, backend: str = "auto") -> jax.Array:
    """``qw.matmul(x, backend)`` forward; backward through ``dequantize``."""
    return qw.matmul(x, backend=backend)


def _forward(x, qw, backend):
    return qw.matmul(x, backend=backend), (x, qw)


def _backward(backend, residuals, g):
    _, pullback = jax.vjp(_reference, *residuals)
    return pullback(g)


matmul.defvjp(_forward, _backward)
