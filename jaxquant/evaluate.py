"""Perplexity: exp(mean NLL of all predicted tokens) over non-overlapping windows."""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def window_nll(model, tokens: jax.Array) -> jax.Array:
    """Summed next-token NLL of ``tokens [B, T]`` (T - 1 predictions per row)."""
    logits, _ = model(tokens)
    logits = logits[:, :-1]
    targets = tokens[:, 1:]
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(logz - picked)


def perplexity(model, windows: np.ndarray, *, batch_size: int = 1,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Perplexity of ``model`` on ``windows [n, ctx]``; returns ppl, nll, tokens, windows, ctx."""
    windows = np.asarray(windows, np.int32)
    n, ctx = windows.shape
    graphdef, state = nnx.split(model)
    state = jax.device_put(state)  # host (numpy) weights would otherwise be copied on every call
    step = jax.jit(lambda state, batch: window_nll(nnx.merge(graphdef, state), batch))
    total = 0.0
    for start in range(0, n, batch_size):
        total += float(step(state, windows[start : start + batch_size]))
        if progress:
            progress(min(start + batch_size, n), n)
    predicted = n * (ctx - 1)
    nll = total / predicted
    return {"ppl": math.exp(nll), "nll": nll, "tokens": predicted, "windows": n, "ctx": ctx}
