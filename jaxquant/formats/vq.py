"""Vector-quantized format (GPTVQ): D-dimensional codebooks shared by tiles of the weight.

A vector is ``vq_dim`` (D) consecutive inputs of one row. The weight is cut into tiles of
``group_rows`` rows × ``group_cols`` columns; each tile has its own codebook of ``K`` D-vectors
(int8 entries times one float16 scale), and each vector stores its ``index_bits``-bit index,
bit-packed per row. ``VQSVDQuantized`` stores 1-D codebooks as a low-rank product (GPTVQ's
SVD codebook compression). ``VQScaledQuantized`` adds GPTVQ's blockwise scales: one ``scale_bits``
log-domain code per row and ``scale_block`` columns, ``s = 2^(lo + code·(hi − lo)/(2^bits − 1))``,
multiplying the decoded weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.formats import packing
from jaxquant.formats.base import QuantizedWeight, quantized_format, static


def decode(idx: jax.Array, codebooks: jax.Array, *, group_rows: int, group_cols: int) -> jax.Array:
    """Gather ``[out, in / D]`` indices from ``codebooks [out/rows, in/cols, K, D]`` (float)
    into the dense ``[out, in]`` weight."""
    out, nv = idx.shape
    tr, tc, k, d = codebooks.shape
    row_tile = jnp.arange(out) // group_rows
    col_tile = (jnp.arange(nv) * d) // group_cols
    flat = (row_tile[:, None] * tc + col_tile[None, :]) * k + idx.astype(jnp.int32)
    return jnp.take(codebooks.reshape(-1, d), flat, axis=0).reshape(out, nv * d)


def quantize_codebooks(c: jax.Array, bits: int = 8) -> tuple[jax.Array, jax.Array]:
    """Symmetric integer codebooks: ``(int8 [..., K, D], float16 scale [..., 1, 1])`` with
    scale ``max|c| / (2^(bits−1) − 1)`` per codebook (rounded to float16 before use)."""
    qmax = 2 ** (bits - 1) - 1
    amax = jnp.max(jnp.abs(c), axis=(-2, -1), keepdims=True)
    scale = jnp.maximum(amax / qmax, 2.0**-24).astype(jnp.float16)
    q = jnp.clip(jnp.round(c / scale.astype(jnp.float32)), -qmax, qmax).astype(jnp.int8)
    return q, scale


def log_scale_values(codes: jax.Array, scale_range: jax.Array, bits: int) -> jax.Array:
    """Blockwise scales from their log-domain codes: ``2^(lo + code·(hi − lo)/(2^bits − 1))``."""
    lo, hi = scale_range[0], scale_range[1]
    return jnp.exp2(lo + codes.astype(jnp.float32) * (hi - lo) / (2**bits - 1))


class _VQ(QuantizedWeight):
    """Shared decode of the VQ formats; subclasses say how their codebooks are stored."""

    def codebooks(self) -> jax.Array:
        """float32 codebooks ``[out/rows, in/cols, K, D]`` as used by ``dequantize``."""
        raise NotImplementedError

    def indices(self) -> jax.Array:
        return packing.unpack(self.codes, self.index_bits, self.shape[1] // self.vq_dim)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        w = decode(self.indices(), self.codebooks(), group_rows=self.group_rows,
                   group_cols=self.group_cols)
        return w.astype(dtype)


@quantized_format("vq")
class VQQuantized(_VQ):
    codes: jax.Array  # int32 [out, packed_words(in / vq_dim, index_bits)]
    codebook: jax.Array  # int8 [out / group_rows, in / group_cols, 2**index_bits, vq_dim]
    codebook_scale: jax.Array  # float16 [out / group_rows, in / group_cols, 1, 1]
    shape: tuple[int, int] = static()
    vq_dim: int = static()
    index_bits: int = static()
    group_rows: int = static()
    group_cols: int = static()

    def codebooks(self) -> jax.Array:
        return self.codebook.astype(jnp.float32) * self.codebook_scale.astype(jnp.float32)


@quantized_format("vq_svd")
class VQSVDQuantized(_VQ):
    """1-D codebooks (sorted) stored as a low-rank product: tile ``t``'s codebook is
    ``(factor[t] · factor_scale[t]) @ basis`` with int8 factors and one float16 basis."""

    codes: jax.Array  # int32 [out, packed_words(in, index_bits)]
    factor: jax.Array  # int8 [out / group_rows, in / group_cols, rank]
    factor_scale: jax.Array  # float16 [out / group_rows, in / group_cols, 1]
    basis: jax.Array  # float16 [rank, 2**index_bits]
    shape: tuple[int, int] = static()
    vq_dim: int = static()
    index_bits: int = static()
    group_rows: int = static()
    group_cols: int = static()

    def codebooks(self) -> jax.Array:
        a = self.factor.astype(jnp.float32) * self.factor_scale.astype(jnp.float32)
        return (a @ self.basis.astype(jnp.float32))[..., None]


@quantized_format("vq_scaled")
class VQScaledQuantized(VQQuantized):
    scale_codes: jax.Array  # int32 packed_words(out * in / scale_block, scale_bits), row-major
    scale_range: jax.Array  # float32 [2]: log2 of the smallest and largest block scale
    scale_block: int = static(64)
    scale_bits: int = static(4)

    def block_scales(self) -> jax.Array:
        """float32 ``[out, in / scale_block]``."""
        out, n = self.shape
        nb = out * (n // self.scale_block)
        codes = packing.unpack(self.scale_codes, self.scale_bits, nb).reshape(out, -1)
        return log_scale_values(codes, self.scale_range, self.scale_bits)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        w = super().dequantize(jnp.float32)
        s = jnp.repeat(self.block_scales(), self.scale_block, axis=1)
        return (w * s).astype(dtype)
