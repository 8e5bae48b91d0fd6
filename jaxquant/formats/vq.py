"""Vector-quantized format (GPTVQ): D-dimensional codebooks shared by tiles of the weight.

A vector is ``vq_dim`` (D) consecutive inputs of one row. The weight is cut into tiles of
``group_rows`` rows × ``group_cols`` columns; each tile has its own codebook of ``K`` D-vectors
(int8 entries times one float16 scale), and each vector stores its ``index_bits``-bit index,
bit-packed per row. ``VQSVDQuantized`` stores 1-D codebooks as a low-rank product (GPTVQ's
SVD codebook compression). ``VQScaledQuantized`` adds GPTVQ's blockwise scales: one ``scale_bits``
log-domain code per row and ``scale_block`` columns, ``s = 2^(lo + code·(hi − lo)/(2^bits − 1))``,
multiplying the decoded weights.

``matmul``: ``reference`` (and ``auto``) dequantize then multiply; ``pallas`` (explicit only: never
timed on a GPU) is ``pallas_kernels.vq_matvec``, block scales applied inside it. No CUDA kernel.
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

    def matmul(self, x: jax.Array, backend: str = "auto") -> jax.Array:
        """``x @ W.T`` through ``reference`` (dequantize, then XLA), ``pallas`` (the decode-matvec,
        interpret mode off the GPU) or ``cuda`` (2-D vectors of 2-4 bits per weight without block
        scales; GPU only). ``auto`` takes ``cuda`` on a GPU where it serves (1.5-5.7x the Pallas
        kernel's speed on an H100 at Llama shapes), else the reference."""
        from jaxquant.formats import dispatch

        if backend == "pallas":
            issue = kernel_issue(self, x)
        else:
            issue = cuda_issue(self, x)
        choice = dispatch.vq_choice(self.format_name, issue, x, backend)
        if choice == "pallas":
            return _matmul_pallas(x, self)
        if choice == "cuda":
            return _matmul_cuda(x, self)
        return dispatch.reference_matmul(self, x)


def kernel_issue(qw: _VQ, x: jax.Array) -> str | None:
    """Why ``pallas_kernels.vq_matvec`` cannot compute ``x @ qw.T`` (None when it can)."""
    from pallas_kernels.vq_matvec import MAX_INDEX_BITS, SUPPORTED_DIMS

    if qw.vq_dim not in SUPPORTED_DIMS:
        return f"vq_dim {qw.vq_dim} has no kernel (supported: {SUPPORTED_DIMS})"
    if qw.index_bits > MAX_INDEX_BITS:
        return f"{qw.index_bits}-bit indices have no kernel (at most {MAX_INDEX_BITS})"
    if isinstance(qw, VQScaledQuantized) and qw.scale_block % qw.vq_dim:
        return f"scale_block {qw.scale_block} is not a multiple of vq_dim {qw.vq_dim}"
    if x.shape[-1] != qw.shape[1]:
        return f"x has {x.shape[-1]} inputs, the weight {qw.shape[1]}"
    return None


def cuda_issue(qw: _VQ, x: jax.Array) -> str | None:
    """Why ``cuda_ffi.vq2_matvec`` cannot compute ``x @ qw.T`` (None when it can)."""
    from cuda_ffi.ops import VQ2_INDEX_BITS

    if type(qw) is not VQQuantized:
        return f"the CUDA kernel reads plain VQ codebooks, not the {qw.format_name} format (use 'pallas')"
    if qw.vq_dim != 2 or qw.index_bits not in VQ2_INDEX_BITS:
        return (f"the CUDA kernel takes 2-D vectors of {VQ2_INDEX_BITS} index bits, not vq_dim {qw.vq_dim} "
                f"with {qw.index_bits} (use 'pallas')")
    if qw.group_cols % 64:
        return f"the CUDA kernel needs group_cols a multiple of 64, got {qw.group_cols} (use 'pallas')"
    if x.shape[-1] != qw.shape[1]:
        return f"x has {x.shape[-1]} inputs, the weight {qw.shape[1]}"
    return None


@jax.jit
def _matmul_cuda(x: jax.Array, qw: VQQuantized) -> jax.Array:
    import cuda_ffi

    y = cuda_ffi.vq2_matvec(x, qw.codes, qw.codebooks(), index_bits=qw.index_bits, group_rows=qw.group_rows,
                            group_cols=qw.group_cols)
    return y.astype(x.dtype)


@jax.jit
def _matmul_pallas(x: jax.Array, qw: _VQ) -> jax.Array:
    """The Pallas decode-matvec with the float codebooks (and block scales) ``dequantize`` uses."""
    import pallas_kernels
    from jaxquant.formats import dispatch

    scales = {}
    if isinstance(qw, VQScaledQuantized):
        values = log_scale_values(jnp.arange(2**qw.scale_bits), qw.scale_range, qw.scale_bits)
        scales = dict(scale_codes=qw.scale_codes, scale_values=values, scale_block=qw.scale_block,
                      scale_bits=qw.scale_bits)
    y = pallas_kernels.vq_matvec(x, qw.codes, qw.codebooks(), vq_dim=qw.vq_dim, index_bits=qw.index_bits,
                                 group_rows=qw.group_rows, group_cols=qw.group_cols,
                                 interpret=not dispatch.on_gpu(), **scales)
    return y.astype(x.dtype)


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
