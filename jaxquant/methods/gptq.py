"""GPTQ (Frantar et al., 2023): scalar grids with Hessian-aware error feedback (methods/ldlq.py).

Grids are per group of ``group_size`` consecutive inputs (or per output row), asymmetric
min-max or symmetric (GPTQ's ``sym``: zero at ``2^(b−1)``). Every column is rounded onto the
grid exactly as stored (fp16 scale and zero), so ``dequantize`` reproduces the loop's Ŵ.

Group grids:
- dynamic (default): a group's grid is fitted to the group's columns after all earlier
  feedback, when the sweep reaches it (the lazy batch is then the group);
- static (``static_groups``): all grids fitted to the original W up front.

``act_order`` quantizes columns by decreasing ``diag H``. With static groups or per-row grids
the result is stored in the natural order (a plain ``ScalarQuantized``); with dynamic groups the
groups are consecutive in the permuted order and the weight is stored permuted with ``perm``
(``PermutedScalarQuantized``: ``y = x[..., perm] @ Wᵀ``; no per-column group index).
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats import packing
from jaxquant.formats.scalar import PermutedScalarQuantized, ScalarQuantized
from jaxquant.methods import ldlq as core
from jaxquant.methods.registry import register_method

MIN_SCALE = 2.0**-24  # smallest positive float16: a stored scale never rounds to zero


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group_size: int | None = 128  # None: one grid per output row
    act_order: bool = False  # quantize inputs by decreasing diag(H)
    static_groups: bool = False  # fit all group grids to the original W up front
    damp: float = 0.01  # relative diagonal damping (× mean diag H), raised automatically on failure
    block_size: int = 128  # lazy-batch width (with dynamic groups the batch is the group)
    sym: bool = False  # symmetric grid (zero = 2^(bits-1)) instead of asymmetric min-max
    true_sequential: bool = True  # pipeline: re-collect inputs after each linear group of a block

    def __post_init__(self):
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 8):
            raise ValueError(f"GPTQ supports 2 to 8 bits, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")
        if not (isinstance(self.damp, (int, float)) and self.damp >= 0):
            raise ValueError(f"damp must be a non-negative number, got {self.damp!r}")
        if not (isinstance(self.block_size, int) and self.block_size > 0):
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")


def fit_grid(x: jax.Array, *, bits: int, sym: bool) -> tuple[jax.Array, jax.Array]:
    """Scale and zero (code units) over the last axis, rounded to float16 as stored, as float32."""
    maxq = 2**bits - 1
    if sym:
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
        scale = 2.0 * amax / maxq
        zero = jnp.full_like(scale, 2.0 ** (bits - 1))
    else:
        lo, hi = jnp.min(x, axis=-1, keepdims=True), jnp.max(x, axis=-1, keepdims=True)
        scale = jnp.where(hi > lo, (hi - lo) / maxq, jnp.abs(lo))
        scale = jnp.maximum(scale, MIN_SCALE)
        zero = -lo / scale
    scale = jnp.maximum(scale, MIN_SCALE).astype(jnp.float16).astype(jnp.float32)
    return scale, zero.astype(jnp.float16).astype(jnp.float32)


def round_to_grid(x, scale, zero, *, bits: int):
    """(dequantized values, codes) with the stored format's arithmetic."""
    q = jnp.clip(jnp.round(x / scale + zero), 0, 2**bits - 1)
    return (q - zero) * scale, q.astype(jnp.uint32)


@register_method("gptq", GPTQConfig, needs_hessian=True)
def quantize(w: jax.Array, cfg: GPTQConfig, *, hessian=None, key=None):
    if hessian is None:
        raise ValueError("GPTQ needs the layer's input Hessian (hessian=[in, in])")
    return quantize_with_hat(w, cfg, hessian)[0]


def quantize_with_hat(w, cfg: GPTQConfig, hessian):
    """``(quantized weight, Ŵ from the sweep)``; Ŵ equals ``dequantize`` of the first."""
    out, n_in = w.shape
    group = cfg.group_size or n_in
    dynamic = cfg.group_size is not None and not cfg.static_groups
    n = -(-n_in // group) * group  # rows padded to whole groups, as the scalar format stores them
    if n != n_in:
        if dynamic and cfg.act_order:
            raise ValueError(f"GPTQ act-order with dynamic groups needs a group size dividing the input "
                             f"width ({group} does not divide {n_in}); use static_groups or another group size")
        w = jnp.pad(jnp.asarray(w, jnp.float32), ((0, 0), (0, n - n_in)))
        hessian = jnp.pad(hessian, ((0, n - n_in), (0, n - n_in)))  # dead inputs: zero weight, H_ii = 1
    H, dead = core.prepare_hessian(hessian, damp=cfg.damp)
    W = jnp.where(dead[None, :], 0.0, jnp.asarray(w, jnp.float32))
    if cfg.act_order:
        perm = jnp.asarray(np.argsort(-np.asarray(jnp.diagonal(H)), kind="stable"), jnp.int32)
        H = H[perm][:, perm]
    else:
        perm = jnp.arange(n, dtype=jnp.int32)
    U = core.inverse_cholesky_upper(H, damp=cfg.damp)
    codes, scale, zero, W_hat = _sweep(W, U, perm, bits=cfg.bits, group=group, sym=cfg.sym,
                                       dynamic=dynamic, lazy=cfg.block_size)
    shape, W_hat = (out, n_in), W_hat[:, :n_in]
    if dynamic and cfg.act_order:
        perm = perm.astype(jnp.int16 if n <= 2**15 else jnp.int32)
        qw = PermutedScalarQuantized(packing.pack(codes, cfg.bits), scale, zero, perm, shape,
                                     cfg.bits, group)
    else:
        qw = ScalarQuantized(packing.pack(codes, cfg.bits), scale, zero, shape, cfg.bits, group)
    return qw, W_hat


@partial(jax.jit, static_argnames=("bits", "group", "sym", "dynamic", "lazy"))
def _sweep(W, U, perm, *, bits, group, sym, dynamic, lazy):
    """GPTQ over the columns in the order ``perm`` (``U`` is for the permuted Hessian).

    Returns codes [out, in] (stored order: permuted for dynamic groups, natural otherwise),
    float16 scale / zero [out * in / group, 1] and Ŵ [out, in] (natural order)."""
    out, n = W.shape
    inverse = jnp.argsort(perm)
    if dynamic:
        def setup(Wb, j):  # the lazy batch is the group: fit its grid after all earlier feedback
            return fit_grid(Wb, bits=bits, sym=sym)

        def quantize_col(x, k, grid):
            return round_to_grid(x, *grid, bits=bits)

        Wq, ((scale, zero), codes) = core.ldlq(W[:, perm], U, quantize_col, block_size=1,
                                                lazy_batch=group, batch_setup=setup)
        scale, zero = jnp.moveaxis(scale, 0, 1), jnp.moveaxis(zero, 0, 1)  # [out, groups, 1]
        codes = jnp.moveaxis(codes[..., 0], 0, 1)
    else:
        scale, zero = fit_grid(W.reshape(out, n // group, group), bits=bits, sym=sym)

        def quantize_col(x, k):
            g = perm[k] // group  # the natural group of the column quantized at step k
            return round_to_grid(x, scale[:, g], zero[:, g], bits=bits)

        Wq, codes = core.ldlq(W[:, perm], U, quantize_col, block_size=1, lazy_batch=lazy)
        codes = jnp.moveaxis(codes[..., 0], 0, 1)[:, inverse]
    f16 = lambda a: a.reshape(-1, 1).astype(jnp.float16)  # noqa: E731
    return codes, f16(scale), f16(zero), Wq[:, inverse]
