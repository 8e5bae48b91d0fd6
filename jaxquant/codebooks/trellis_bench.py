"""Gaussian distortion of QTIP's trellis codes: MSE per weight on i.i.d. N(0, 1) at the best scale.

``jaxquant bench codebook --codebook qtip-1mad|qtip-3inst|qtip-hyb|qtip-lut --bits K`` calls
``gaussian_mse``. Sequences are 256 weights (one 16x16 tile), tail-biting, as in QTIP Table 1.
The scale (code rms over data rms) is tuned by golden-section search on an independent draw
(the MSE is flat near the optimum, so the draw must not be tiny: 2^15 weights by default), then
the MSE is measured on ``samples`` fresh weights; ``stderr`` is the standard error over the
(independent) sequences.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.codebooks.trellis import TrellisCode
from jaxquant.viterbi import viterbi_tailbiting

CODEBOOKS = {"qtip-1mad": "1mad", "qtip-3inst": "3inst", "qtip-hyb": "hyb", "qtip-lut": "lut"}
SEQUENCE = 256

# QTIP Table 1 (L = 16, tail-biting), ../shared/REFERENCE.md §7.
PUBLISHED_MSE = {
    "1mad": {2: 0.0691, 3: 0.0177, 4: 0.0046},
    "3inst": {2: 0.0691, 3: 0.0179, 4: 0.0046},
    "hyb": {2: 0.0709, 3: 0.0190, 4: 0.0055},
}


def _sequence_mse(x: jax.Array, values: jax.Array, ratio: float, *, L: int, k: int) -> np.ndarray:
    """Per-sequence MSE of quantizing ``x`` with the code scaled to rms ``ratio`` (x has rms 1)."""
    states = viterbi_tailbiting(x / ratio, values, L=L, k=k)
    rec = values[states].reshape(x.shape) * ratio
    return np.asarray(jnp.mean((x - rec) ** 2, axis=1), np.float64)


def _gaussian(n: int, seed: int) -> jax.Array:
    rows = -(-n // SEQUENCE)
    return jax.random.normal(jax.random.key(seed), (rows, SEQUENCE), jnp.float32)


def best_ratio(code: TrellisCode, bits: int, *, samples: int = 1 << 15, seed: int = 1,
               lo: float = 0.8, hi: float = 1.5, tol: float = 0.02) -> float:
    """Golden-section search of the code-rms / data-rms ratio minimizing the MSE."""
    values = code.values() / code.rms()
    x = _gaussian(samples, seed)
    f = lambda r: float(np.mean(_sequence_mse(x, values, r, L=code.L, k=bits)))  # noqa: E731
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


def gaussian_mse(codebook: str, bits: int, *, samples: int = 1 << 16, seed: int = 0, L: int = 16,
                 tune_samples: int = 1 << 15, tune_tol: float = 0.02, ratio: float | None = None) -> dict:
    """MSE per weight of the tail-biting trellis code on ``samples`` N(0, 1) weights.

    ``codebook``: ``qtip-1mad`` / ``qtip-3inst`` / ``qtip-hyb`` / ``qtip-lut`` (or the bare code
    name). ``ratio``: code rms / data rms; tuned on ``tune_samples`` other weights when None.
    """
    name = CODEBOOKS.get(codebook, codebook)
    code = TrellisCode(name, L=L)
    t0 = time.perf_counter()
    if ratio is None:
        ratio = best_ratio(code, bits, samples=tune_samples, seed=seed + 1, tol=tune_tol)
    t1 = time.perf_counter()
    values = code.values() / code.rms()
    per_seq = _sequence_mse(_gaussian(samples, seed), values, ratio, L=L, k=bits)
    t2 = time.perf_counter()
    mse = float(per_seq.mean())
    published = PUBLISHED_MSE.get(name, {}).get(bits) if L == 16 else None
    return {
        "codebook": f"qtip-{name}", "bits": bits, "L": L, "V": code.V, "tail_biting": True,
        "samples": int(per_seq.size * SEQUENCE), "seed": seed, "mse": mse,
        "stderr": float(per_seq.std(ddof=1) / math.sqrt(per_seq.size)),
        "ratio": float(ratio), "published_mse": published,
        "rate_distortion_bound": 2.0 ** (-2 * bits),
        "tune_seconds": t1 - t0, "seconds": t2 - t1,
        "backend": jax.default_backend(),
    }
