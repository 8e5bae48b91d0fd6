"""Distortion of a codebook on unit-variance i.i.d. Gaussian data (``jaxquant bench codebook``).

The number to compare with published tables (QuIP# Table 1, QTIP Table 1): the MSE per weight
of ``x ~ N(0, 1)`` quantized as ``Q(s·x)/s`` at the scale ``s`` that minimises it.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from jaxquant.codebooks import e8p

CODEBOOKS = tuple(e8p.CODEBOOKS)


def gaussian_mse(codebook: str, samples: int, seed: int, *, scale: float | None = None,
                 tol: float = 2e-3) -> dict:
    """MSE per weight of ``samples`` N(0,1) weights (rounded up to whole 8-vectors).

    With ``scale=None`` the scale is searched on the same samples: a grid of step 0.05 over
    [0.7, 1.3], then golden-section refinement to ``tol``. Returns ``{"codebook", "bits", "samples", "seed",
    "mse", "scale", "scale_searched", "seconds"}``.
    """
    cb = e8p.get_codebook(codebook)
    n = max(1, math.ceil(samples / e8p.DIM))
    x = jax.random.normal(jax.random.key(seed), (n, e8p.DIM), jnp.float32)

    @jax.jit
    def mse_at(s):
        _, q = cb.quantize(x * s)
        return jnp.mean((q / s - x) ** 2)

    start = time.perf_counter()
    cache: dict[float, float] = {}

    def f(s: float) -> float:
        if s not in cache:
            cache[s] = float(mse_at(jnp.float32(s)))
        return cache[s]

    if scale is None:
        grid = [0.7 + 0.05 * i for i in range(13)]
        i = min(range(len(grid)), key=lambda j: f(grid[j]))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        g = (math.sqrt(5) - 1) / 2
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        while hi - lo > tol:
            if f(a) < f(b):
                hi, b = b, a
                a = hi - g * (hi - lo)
            else:
                lo, a = a, b
                b = lo + g * (hi - lo)
        best = min(cache, key=cache.get)
    else:
        best = float(scale)
    return {"codebook": cb.name, "bits": cb.bits, "samples": n * e8p.DIM, "seed": seed,
            "mse": f(best), "scale": best, "scale_searched": scale is None,
            "seconds": time.perf_counter() - start}
