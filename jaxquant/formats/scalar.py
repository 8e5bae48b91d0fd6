"""Scalar grid format shared by RTN, HQQ and GPTQ: packed integer codes, one scale and zero per group.

``w = (q - zero) * scale`` with ``q`` in ``[0, levels)``. Groups follow HQQ's semantics on the
row-major flattened weight: ``axis=1`` groups ``group_size`` consecutive weights (inputs of one
row when ``group_size`` divides ``in``); ``axis=0`` views the weight as ``[group_size, -1]`` and
a group is one column of that view. Codes are bit-packed per row (``packing.pack``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats import packing
from jaxquant.formats.base import QuantizedWeight, quantized_format, static


def padded_width(shape: tuple[int, int], group_size: int, axis: int) -> int:
    """Input width as stored: with ``axis=1`` each row is padded to whole groups (576 inputs in
    groups of 128 store 640), so any group size works on any width."""
    return -(-shape[1] // group_size) * group_size if axis == 1 else shape[1]


def group_view(shape: tuple[int, int], group_size: int, axis: int) -> tuple[int, int]:
    """The 2-D view of the (row-padded) flattened weight in which groups reduce over ``axis``."""
    if axis not in (0, 1):
        raise ValueError(f"group axis must be 0 or 1, got {axis!r}")
    if group_size <= 0:
        raise ValueError(f"group size must be positive, got {group_size}")
    n = shape[0] * padded_width(shape, group_size, axis)
    if n % group_size:
        raise ValueError(f"group size {group_size} does not divide the {shape[0]}x{shape[1]} weight")
    return (n // group_size, group_size) if axis == 1 else (group_size, n // group_size)


def pad_rows(w: jax.Array, group_size: int, axis: int) -> jax.Array:
    """``w`` with each row padded (by repeating its last value) to ``padded_width``."""
    extra = padded_width(tuple(w.shape), group_size, axis) - w.shape[1]
    return jnp.pad(w, ((0, 0), (0, extra)), mode="edge") if extra else w


def dequantize_codes(codes, scale, zero, shape, bits, group_size, axis, dtype) -> jax.Array:
    """``(q - zero) * scale`` of packed codes, cropped to the dense ``shape``."""
    width = padded_width(shape, group_size, axis)
    q = packing.unpack(codes, bits, width).astype(jnp.float32)
    w = (q.reshape(group_view(shape, group_size, axis)) - zero) * scale
    return w.reshape(shape[0], width)[:, : shape[1]].astype(dtype)


@quantized_format("scalar")
class ScalarQuantized(QuantizedWeight):
    codes: jax.Array  # int32 [out, packed_words(in, bits)]
    scale: jax.Array  # float16, the group view reduced over `axis` (keepdims)
    zero: jax.Array  # float16, same shape as scale, in code units
    shape: tuple[int, int] = static()
    bits: int = static()
    group_size: int = static()
    axis: int = static(1)
    levels: int = static(0)  # number of code values; 0 means 2**bits (ternary stores 3 in 2 bits)

    @property
    def num_levels(self) -> int:
        return self.levels or 2**self.bits

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize_codes(self.codes, self.scale.astype(jnp.float32), self.zero.astype(jnp.float32),
                                self.shape, self.bits, self.group_size, self.axis, dtype)

    def matmul(self, x: jax.Array, backend: str = "auto") -> jax.Array:
        """``x @ W.T`` through ``reference`` (dequantize, then XLA), ``pallas``, ``cuda`` or ``auto``
        (a kernel on a GPU for up to 16 rows of x when one serves this weight; see ``dispatch``)."""
        from jaxquant.formats import dispatch

        return dispatch.scalar_matmul(self, x, backend)


def encode(w: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int, group_size: int,
           axis: int = 1, levels: int = 0, param_dtype=jnp.float16) -> ScalarQuantized:
    """Round ``w`` onto the grid given by per-group ``scale``/``zero`` (as stored) and pack it."""
    shape = tuple(int(d) for d in w.shape)
    view = group_view(shape, group_size, axis)
    scale, zero = scale.astype(param_dtype), zero.astype(param_dtype)
    wp = pad_rows(w, group_size, axis)
    q = jnp.round(wp.reshape(view).astype(jnp.float32) / scale.astype(jnp.float32)
                  + zero.astype(jnp.float32))
    q = jnp.clip(q, 0, (levels or 2**bits) - 1).astype(jnp.uint32).reshape(wp.shape)
    return ScalarQuantized(packing.pack(q, bits), scale, zero, shape, bits, group_size, axis, levels)


def minmax_grid(w: jax.Array, *, levels: int, group_size: int, axis: int = 1):
    """Asymmetric min-max scale and zero (code units) per group, float32."""
    wg = pad_rows(w, group_size, axis).reshape(group_view(w.shape, group_size, axis)).astype(jnp.float32)
    lo, hi = wg.min(axis=axis, keepdims=True), wg.max(axis=axis, keepdims=True)
    span = hi - lo
    scale = jnp.where(span > 0, span / (levels - 1), jnp.maximum(jnp.abs(lo), 1e-8))
    return scale, -lo / scale


# --- Meta-quantized variant: the per-group scale and zero are themselves b-bit min-max codes. ---

def meta_quantize(x: jax.Array, *, bits: int, group_size: int, param_dtype=jnp.float16):
    """Asymmetric min-max RTN of a parameter array, flattened in row-major order, in groups of
    ``group_size`` (the tail is padded with its last value). Returns ``(codes uint8 [k, group],
    scale [k, 1], zero [k, 1])``; ``meta_dequantize`` inverts it."""
    if not 1 <= bits <= 8:
        raise ValueError(f"meta quantization stores codes in uint8: 1 to 8 bits, got {bits!r}")
    flat = x.reshape(-1).astype(jnp.float32)
    flat = jnp.pad(flat, (0, -flat.size % group_size), mode="edge").reshape(-1, group_size)
    scale, zero = minmax_grid(flat, levels=2**bits, group_size=group_size)
    scale, zero = scale.astype(param_dtype), zero.astype(param_dtype)
    q = jnp.round(flat / scale.astype(jnp.float32) + zero.astype(jnp.float32))
    return jnp.clip(q, 0, 2**bits - 1).astype(jnp.uint8), scale, zero


def meta_dequantize(codes: jax.Array, scale: jax.Array, zero: jax.Array, shape) -> jax.Array:
    """float32 parameters of ``shape`` from ``meta_quantize``'s output."""
    x = (codes.astype(jnp.float32) - zero.astype(jnp.float32)) * scale.astype(jnp.float32)
    return x.reshape(-1)[: int(np.prod(shape))].reshape(shape)


@quantized_format("scalar_meta")
class ScalarMetaQuantized(QuantizedWeight):
    """``ScalarQuantized`` whose scale and zero are stored as 8-bit (``meta_bits``) codes with an
    fp16 scale and zero per ``meta_group_size`` consecutive groups (HQQ's meta quantization)."""

    codes: jax.Array  # int32 [out, packed_words(in, bits)]
    scale_codes: jax.Array  # uint8 [k, meta_group_size]
    scale_scale: jax.Array  # float16 [k, 1]
    scale_zero: jax.Array  # float16 [k, 1]
    zero_codes: jax.Array
    zero_scale: jax.Array
    zero_zero: jax.Array
    shape: tuple[int, int] = static()
    bits: int = static()
    group_size: int = static()
    axis: int = static(1)
    levels: int = static(0)
    meta_bits: int = static(8)
    meta_group_size: int = static(128)

    @property
    def num_levels(self) -> int:
        return self.levels or 2**self.bits

    def grid(self) -> tuple[jax.Array, jax.Array]:
        """float32 scale and zero of every group, shaped like ``ScalarQuantized.scale``."""
        view = group_view(self.shape, self.group_size, self.axis)
        pshape = (1, view[1]) if self.axis == 0 else (view[0], 1)
        return (meta_dequantize(self.scale_codes, self.scale_scale, self.scale_zero, pshape),
                meta_dequantize(self.zero_codes, self.zero_scale, self.zero_zero, pshape))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        scale, zero = self.grid()
        return dequantize_codes(self.codes, scale, zero, self.shape, self.bits, self.group_size, self.axis, dtype)


def encode_meta(w: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int, group_size: int,
                axis: int = 1, levels: int = 0, meta_bits: int = 8, meta_group_size: int = 128,
                param_dtype=jnp.float16, scale_meta=None) -> ScalarMetaQuantized:
    """Meta-quantize per-group ``scale``/``zero`` (float32), then round ``w`` onto the grid they
    decode to (so the codes match what ``dequantize`` sees) and pack it. ``scale_meta``: an
    already meta-quantized scale (``meta_quantize`` output) to store as is."""
    shape = tuple(int(d) for d in w.shape)
    view = group_view(shape, group_size, axis)
    sq = scale_meta if scale_meta is not None else meta_quantize(
        scale, bits=meta_bits, group_size=meta_group_size, param_dtype=param_dtype)
    zq = meta_quantize(zero, bits=meta_bits, group_size=meta_group_size, param_dtype=param_dtype)
    s = meta_dequantize(*sq, scale.shape)
    z = meta_dequantize(*zq, zero.shape)
    wp = pad_rows(w, group_size, axis)
    q = jnp.round(wp.reshape(view).astype(jnp.float32) / s + z)
    q = jnp.clip(q, 0, (levels or 2**bits) - 1).astype(jnp.uint32).reshape(wp.shape)
    return ScalarMetaQuantized(packing.pack(q, bits), *sq, *zq, shape, bits, group_size, axis,
                               levels, meta_bits, meta_group_size)


# --- Input-permuted variant: GPTQ act-order with groups formed in the permuted order. ---

@quantized_format("scalar_permuted")
class PermutedScalarQuantized(QuantizedWeight):
    """A ``ScalarQuantized`` weight whose input columns are stored in the order ``perm``:
    stored column ``j`` is input ``perm[j]``. Groups are consecutive in the stored order, so a
    kernel needs no per-column group index: ``y = x[..., perm] @ stored.T``."""

    codes: jax.Array  # int32 [out, packed_words(in, bits)], stored (permuted) column order
    scale: jax.Array  # float16 [out * in / group_size, 1]
    zero: jax.Array  # float16, same shape as scale, in code units
    perm: jax.Array  # int16 (int32 when in > 32768) [in]
    shape: tuple[int, int] = static()
    bits: int = static()
    group_size: int = static()

    def stored(self) -> ScalarQuantized:
        """The weight in stored column order, as a plain ``ScalarQuantized``."""
        return ScalarQuantized(self.codes, self.scale, self.zero, self.shape, self.bits, self.group_size)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        inverse = jnp.argsort(self.perm)
        return jnp.take(self.stored().dequantize(dtype), inverse, axis=1)

    def matmul(self, x: jax.Array, backend: str = "auto") -> jax.Array:
        return self.stored().matmul(jnp.take(x, self.perm, axis=-1), backend=backend)
