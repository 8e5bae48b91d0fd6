"""``jaxquant bench decode``: decode tokens/s against the memory-bandwidth bound.

At batch 1 a decode step must read every weight once, so its speed limit is
``copy bandwidth / bytes per token``. We measure the device-to-device copy bandwidth in the same
run and report the fraction of that bound reached. For a random model of real shape each distinct
weight shape is quantized once and reused by every layer: the bytes read, and so the speed, are
those of a fully quantized model.
"""
from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats.base import QuantizedWeight
from jaxquant.model.fuse import fused_parts
from jaxquant.model.llama import Llama, init_cache
from jaxquant.model.params import device_leaves, get_param, named_params, set_param
from jaxquant.pipeline import block_groups
from jaxquant.quant import quantize_weight


def copy_bandwidth(nbytes: int = 1 << 30, trials: int = 3) -> float:
    """Bytes/s of a device-to-device copy (read + written), an elementwise negation of ``nbytes``.

    Chains of R and 2R calls run without waiting in between; their time difference over R calls
    cancels the dispatch of the first call and the final wait. Median of ``trials``."""
    x = jnp.full((nbytes // 2,), 1.5, jnp.bfloat16)
    negate = jax.jit(lambda a: -a)
    negate(x).block_until_ready()

    def chain(calls):
        start, y = time.perf_counter(), x
        for _ in range(calls):
            y = negate(y)
        y.block_until_ready()
        return time.perf_counter() - start

    per_call = statistics.median((chain(20) - chain(10)) / 10 for _ in range(trials))
    if per_call <= 0:  # timer noise beat a tiny copy (CPU smoke runs)
        per_call = chain(20) / 20
    return 2 * x.nbytes / per_call


def quantize_shared(model: Llama, cfg, *, key=None) -> Llama:
    """Quantize one weight per distinct shape (with an identity Hessian where needed) and use it for
    every block linear of that shape. For speed measurements only."""
    key = jax.random.key(0) if key is None else key
    by_shape: dict = {}
    for i in range(model.config.num_hidden_layers):
        for members in block_groups(model.config).values():
            for member in members:
                name = f"layers.{i}.{member}.weight"
                w = get_param(model, name)
                if w.shape not in by_shape:
                    by_shape[w.shape] = quantize_weight(w, cfg, hessian=jnp.eye(w.shape[1]), key=key, name=name,
                                                        parts=fused_parts(model.config, name.removesuffix(".weight")))
                set_param(model, name, by_shape[w.shape])
    return model


def bytes_per_token(model: Llama) -> int:
    """Weight bytes a batch-1 decode step reads: every linear, one embedding row, the head."""
    total = 0
    for name, value in named_params(model).items():
        if isinstance(value, QuantizedWeight):
            total += int(value.bits_per_weight * value.shape[0] * value.shape[1] / 8)
        elif name == "embed_tokens.weight":
            total += value.shape[1] * value.dtype.itemsize * (1 if model.lm_head is not None else value.shape[0])
        else:
            total += int(np.prod(value.shape)) * value.dtype.itemsize
    return total


def greedy_step(model: Llama, *, batch: int, cache_len: int):
    """A jitted greedy decode step ``step(state, token, cache, pos) -> (token, cache)`` (cache
    donated), with the model's arrays on the device as ``state`` and an empty KV cache."""
    state, rebuild = device_leaves(model)
    cache = init_cache(model.config, batch, cache_len, state[0].dtype)

    @functools.partial(jax.jit, donate_argnums=2)
    def step(state, token, cache, pos):
        logits, cache = rebuild(state)(token, cache, pos)
        return jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32), cache

    return step, state, cache


def decode_speed(model: Llama, *, batch: int, context: int = 128, steps: int = 32, windows: int = 3) -> list[float]:
    """Tokens/s (all rows counted) of jitted single-token decode steps in each of ``windows`` timed
    windows of ``steps`` steps, after two untimed steps (compile, then a first replay); the KV cache
    holds ``context`` tokens at the start. Report the median: one window can catch a host stall."""
    if steps < 1 or windows < 1:
        raise ValueError(f"decode_speed: steps and windows must be >= 1, got {steps} and {windows}")
    step, state, cache = greedy_step(model, batch=batch, cache_len=context + windows * steps + 3)
    token = jnp.zeros((batch, 1), jnp.int32)
    pos = context
    for _ in range(2):  # compile, then one replay (XLA records its command buffers on first use)
        token, cache = step(state, token, cache, jnp.int32(pos))
        pos += 1
    token.block_until_ready()
    speeds = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            token, cache = step(state, token, cache, jnp.int32(pos))
            pos += 1
        token.block_until_ready()
        speeds.append(batch * steps / (time.perf_counter() - start))
    return speeds
