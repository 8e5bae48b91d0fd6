"""What every Pallas kernel here shares: power-of-two blocks, Triton compiler parameters, and
calls over groups of at most ``MAX_BATCH`` rows of x (one compiled batch size per group)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

try:  # the Triton lowering (deprecated from jax 0.11 on, still present)
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None

MAX_BATCH = 16


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides ``n`` and is at most ``cap``."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def triton_params(interpret: bool, kernel: str, *, num_warps: int, num_stages: int):
    """Compiler parameters of the Triton lowering (None in interpret mode)."""
    if interpret:
        return None
    if pltriton is None:
        raise RuntimeError(f"pallas {kernel} needs jax.experimental.pallas.triton")
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def over_row_groups(call: Callable[[jax.Array], jax.Array], x2: jax.Array, lead: tuple, out: int,
                    dtype) -> jax.Array:
    """``call`` on groups of at most ``MAX_BATCH`` rows of ``x2 [n, in]`` -> ``[*lead, out]``."""
    n = x2.shape[0]
    if n == 0:
        return jnp.zeros((*lead, out), dtype)
    parts = [call(x2[i:i + MAX_BATCH]) for i in range(0, n, MAX_BATCH)]
    y = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    return y.reshape(*lead, out)
