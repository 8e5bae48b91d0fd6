"""Round-to-nearest: asymmetric min-max grid per group of consecutive inputs. The baseline."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxquant.formats import scalar
from jaxquant.methods.registry import register_method


@dataclasses.dataclass(frozen=True)
class RTNConfig:
    bits: int = 4  # 1 to 8
    group_size: int | None = 128  # None: one group per output channel
    round_zero: bool = False  # whole-number zero points (integer-zero runtimes such as qwix)

    def __post_init__(self):
        if not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise ValueError(f"RTN supports 1 to 8 bits, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")


@register_method("rtn", RTNConfig)
def quantize(w: jax.Array, cfg: RTNConfig, *, hessian=None, key=None) -> scalar.ScalarQuantized:
    group = cfg.group_size or w.shape[1]  # a group that does not divide the width pads each row
    return _quantize(w, bits=cfg.bits, group=group, round_zero=cfg.round_zero)


@jax.jit(static_argnames=("bits", "group", "round_zero"))
def _quantize(w, *, bits, group, round_zero):
    scale, zero = scalar.minmax_grid(w, levels=2**bits, group_size=group)
    if round_zero:
        zero = jnp.clip(jnp.round(zero), 0, 2**bits - 1)
    return scalar.encode(w, scale, zero, bits=bits, group_size=group)
