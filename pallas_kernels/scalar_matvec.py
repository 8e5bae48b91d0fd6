"""Decode-matvec of the packed scalar format in Pallas (Triton lowering), for 2, 4 and 8 bits.

Format (``jaxquant/formats/packing.py``, ``scalar.py``): int32 ``codes [out, words]``, each word
holding ``m = 32 / bits`` codes, code ``t`` of word ``w`` at bits ``[t * bits, (t+1) * bits)`` and
standing for input ``w * m + t``; fp16 ``scale``/``zero`` per group of ``group_size`` inputs of a row;
``W = (q - zero) * scale``. Widths that do not divide 32 (3 bits) straddle words and are left to
the CUDA kernel.

One program owns ``block_rows`` rows and walks the input axis in steps of ``block_words`` words
that never cross a group, so a step needs one scale and zero per row:
``y += scale * (sum_k x_k q_k - zero * sum_k x_k)``. x is viewed as ``[n, words, m]`` (a free
reshape) and loaded one code position ``t`` at a time (a strided vector), so no in-kernel reshape
or gather is needed and every block shape is a power of two, as the Triton lowering requires.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import over_row_groups, pow2_divisor, triton_params


SUPPORTED_BITS = (2, 4, 8)


def plan(out: int, words: int, bits: int, group_size: int, *, block_rows: int = 32,
         block_words: int = 32) -> tuple[int, int]:
    """The (rows, words) block actually used: powers of two dividing ``out`` and the group."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"pallas scalar_matvec: bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"pallas scalar_matvec: group_size must be a multiple of 32, got {group_size}")
    m = 32 // bits
    group_words = group_size // m
    bw = pow2_divisor(math.gcd(group_words, words), block_words)
    bn = pow2_divisor(out, block_rows)
    return bn, bw


def _kernel(x_ref, codes_ref, scale_ref, zero_ref, o_ref, *, n, bits, bn, bw, group_words, steps):
    m = 32 // bits
    mask = (1 << bits) - 1
    r0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    rows = pl.ds(r0, bn)

    def body(step, acc):
        w0 = pl.multiple_of(step * bw, bw)
        words = codes_ref[rows, pl.ds(w0, bw)]
        g = w0 // group_words
        s = scale_ref[rows, g].astype(jnp.float32)
        z = zero_ref[rows, g].astype(jnp.float32)
        qs = [(jax.lax.shift_right_logical(words, jnp.int32(t * bits)) & mask).astype(jnp.float32)
              for t in range(m)]
        new = []
        for b in range(n):
            part = jnp.zeros((bn, bw), jnp.float32)
            xsum = jnp.zeros((bw,), jnp.float32)
            for t in range(m):
                xt = x_ref[b, pl.ds(w0, bw), t].astype(jnp.float32)
                part = part + qs[t] * xt[None, :]
                xsum = xsum + xt
            new.append(acc[b] + s * (jnp.sum(part, axis=1) - z * jnp.sum(xsum)))
        return tuple(new)

    acc = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((bn,), jnp.float32) for _ in range(n)))
    for b in range(n):
        o_ref[b, rows] = acc[b].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "block_rows", "block_words",
                                             "num_warps", "num_stages", "interpret"))
def scalar_matvec(x: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int,
                  group_size: int, block_rows: int = 32, block_words: int = 32, num_warps: int = 4,
                  num_stages: int = 3, interpret: bool = False) -> jax.Array:
    """``y[..., out] = x[..., in] @ W.T``, W decoded from packed ``codes`` with per-group scale/zero.

    codes: int32 ``[out, words]``; scale, zero: ``out * groups`` values (row-major ``[out, groups]``,
    any float dtype); x: ``[..., in]`` float with ``in <= words * 32 / bits``. Rows of x beyond 16
    are processed 16 at a time. ``interpret=True`` runs on any backend (CPU tests).
    """
    out, words = codes.shape
    bn, bw = plan(out, words, bits, group_size, block_rows=block_rows, block_words=block_words)
    m = 32 // bits
    k_pad = words * m
    lead, k_in = x.shape[:-1], x.shape[-1]
    if k_in > k_pad:
        raise ValueError(f"pallas scalar_matvec: x has {k_in} inputs, the codes hold {k_pad}")
    x2 = x.reshape(-1, k_in)
    if k_in < k_pad:
        x2 = jnp.pad(x2, ((0, 0), (0, k_pad - k_in)))
    scale2, zero2 = scale.reshape(out, -1), zero.reshape(out, -1)
    if scale2.shape[1] * group_size < k_pad:
        raise ValueError("pallas scalar_matvec: scale/zero hold fewer groups than the codes")
    params = triton_params(interpret, "scalar_matvec", num_warps=num_warps, num_stages=num_stages)

    def call(xb):
        nb = xb.shape[0]
        kernel = functools.partial(_kernel, n=nb, bits=bits, bn=bn, bw=bw,
                                   group_words=group_size // m, steps=words // bw)
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((nb, out), x.dtype), grid=(out // bn,),
                              compiler_params=params, interpret=interpret,
                              name=f"scalar_matvec_{bits}bit")(xb.reshape(nb, words, m), codes, scale2, zero2)

    return over_row_groups(call, x2, lead, out, x.dtype)
