"""E8P (QuIP# 2-bit), E8P-RVQ3 (3-bit) and E8P-RVQ4 (4-bit) decode-matvec in Pallas (Triton lowering).

Format (``jaxquant/formats/quip_sharp.py``, ``jaxquant/codebooks/e8p.py``): uint8
``codes [out, in/8, bits]``, per 8 consecutive weights of a row one 16-bit E8P code per stage
(little-endian bytes; RVQ4's residual stage in bytes 2-3). Code ``c``: bits 0-7 index the
256-entry source set S of absolute values, bits 8-14 are the signs of coordinates 0-6, coordinate
7's sign makes the number of negative signs ≡ sum(S[c & 0xFF]) (mod 2), bit 15 picks the
shift ``+1/4`` (set) or ``-1/4``. RVQ4: ``Q = E8P(c1) + E8P(c2) / resid_scale``; RVQ3: byte 2 indexes
the 256-point E8 "1-bit" set R, ``Q = E8P(c1) + R[b2] / resid_scale``.

The kernel reads ``table [256, 8]`` float32: S with coordinate 7 negated where the source
vector's sum is odd, so coordinate 7's value is ``table[i, 7] · (-1)^popcount(c bits 8-14)``; at 3
bits R follows it in the same flat table (``resid_table``, rows 256-511).

Blocking: one program owns ``block_rows`` output rows and walks the input axis
``block_cols`` weights (``block_cols/8`` codes per row) at a time. Each step decodes its
``[block_rows, block_cols]`` weight block at once: per weight, its code bytes and its table
entry are gathered (loads with index arrays from ``codes`` and the 8 KiB table), the sign and
shift applied elementwise. Products and sums are float32, one accumulator per row of x (1-16);
rows of x beyond 16 are processed 16 at a time. ``e8p_matmul`` (2-16 rows) decodes the same blocks
and multiplies them with x in float16 on tensor cores.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.common import over_row_groups, pow2_divisor, triton_params


SUPPORTED_BITS = (2, 3, 4)
TC_ROWS = 16  # e8p_matmul pads x to the 16 rows of a dot


def e8p_table(source_set: np.ndarray) -> np.ndarray:
    """The kernel's table: float32 ``[256, 8]``, S with coordinate 7 negated for odd-sum rows."""
    s = np.asarray(source_set, np.float64)
    if s.shape != (256, 8):
        raise ValueError(f"E8P source set must be [256, 8], got {s.shape}")
    odd = np.rint(s.sum(1)).astype(np.int64) % 2
    t = s.copy()
    t[:, 7] *= 1 - 2 * odd
    return t.astype(np.float32)


def _decode(c: jax.Array, d: jax.Array, table_ref) -> jax.Array:
    """uint32 16-bit codes and coordinates ``d`` (0-7) -> float32 E8P values."""
    a = table_ref[(c & jnp.uint32(0xFF)).astype(jnp.int32) * 8 + d]
    signs = (c >> 8) & jnp.uint32(0x7F)
    par = signs ^ (signs >> 4)
    par = par ^ (par >> 2)
    par = (par ^ (par >> 1)) & jnp.uint32(1)  # parity of the 7 stored signs
    bit = (c >> (8 + jnp.minimum(d, 6)).astype(jnp.uint32)) & jnp.uint32(1)
    neg = jnp.where(d == 7, par, bit) == 1
    shift = jnp.where(((c >> 15) & jnp.uint32(1)) == 1, jnp.float32(0.25), jnp.float32(-0.25))
    return jnp.where(neg, -a, a) + shift


def _block_decoder(codes_ref, table_ref, *, bits, groups, bn, bc, inv_resid):
    """``decode(step)``: the float32 values of this program's ``[bn, bc]`` weight block at ``step``."""
    r0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    rr = jax.lax.broadcasted_iota(jnp.int32, (bn, bc), 0)
    cc = jax.lax.broadcasted_iota(jnp.int32, (bn, bc), 1)
    d = cc % 8  # coordinate inside the 8-vector

    def code16(base, byte):
        lo = codes_ref[base + byte].astype(jnp.uint32)
        return lo | (codes_ref[base + byte + 1].astype(jnp.uint32) << 8)

    def decode(step):
        base = ((r0 + rr) * groups + step * (bc // 8) + cc // 8) * bits  # first byte of the weight's code
        vals = _decode(code16(base, 0), d, table_ref)
        if bits == 4:
            vals = vals + _decode(code16(base, 2), d, table_ref) * jnp.float32(inv_resid)
        elif bits == 3:  # R[b2] from rows 256-511 of the flat table
            vals = vals + table_ref[(256 + codes_ref[base + 2].astype(jnp.int32)) * 8 + d] * jnp.float32(inv_resid)
        return vals

    return decode


def _kernel(x_ref, codes_ref, table_ref, o_ref, *, n, bn, bc, steps, **block):
    decode = _block_decoder(codes_ref, table_ref, bn=bn, bc=bc, **block)

    def body(step, acc):
        vals = decode(step)
        c0 = pl.multiple_of(step * bc, bc)
        return tuple(acc[b] + jnp.sum(vals * x_ref[b, pl.ds(c0, bc)].astype(jnp.float32)[None, :], axis=1)
                     for b in range(n))

    acc = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((bn,), jnp.float32) for _ in range(n)))
    r0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    for b in range(n):
        o_ref[b, pl.ds(r0, bn)] = acc[b]


def _tc_kernel(x_ref, codes_ref, table_ref, o_ref, *, bn, bc, steps, **block):
    """As ``_kernel`` with the products on tensor cores: the decoded block, rounded to float16 (E8P
    values are multiples of 1/4: exact; RVQ4's sums round), times the 16 rows of x in one dot per step."""
    decode = _block_decoder(codes_ref, table_ref, bn=bn, bc=bc, **block)

    def body(step, acc):
        xt = x_ref[:, pl.ds(pl.multiple_of(step * bc, bc), bc)]
        return acc + jax.lax.dot_general(xt, decode(step).astype(xt.dtype), (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    r0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    o_ref[:, pl.ds(r0, bn)] = jax.lax.fori_loop(0, steps, body, jnp.zeros((TC_ROWS, bn), jnp.float32))


@functools.partial(jax.jit, static_argnames=("bits", "resid_scale", "block_rows", "block_cols", "num_warps",
                                             "num_stages", "interpret"))
def e8p_matmul(x: jax.Array, codes: jax.Array, table: jax.Array, *, bits: int, resid_scale: float = 1.0,
               resid_table: jax.Array | None = None, block_rows: int = 64, block_cols: int = 64, num_warps: int = 4,
               num_stages: int = 3, interpret: bool = False) -> jax.Array:
    """``e8p_matvec`` for 1-16 rows of x on tensor cores: x is rounded to float16 (as the CUDA kernel
    does; values beyond float16's range are an error of the caller's scaling), the output is float32."""
    tab = _flat_table(x, codes, table, bits, resid_table)
    out, groups, _ = codes.shape
    k_in = x.shape[-1]
    bn, bc = pow2_divisor(out, block_rows), pow2_divisor(k_in, block_cols)
    if bn < 16 or bc < 16:
        raise ValueError(f"pallas e8p_matmul: {out} x {k_in} needs 16-aligned tiles (got {bn} x {bc})")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_in)
    n = x2.shape[0]
    if not 0 < n <= TC_ROWS:
        raise ValueError(f"pallas e8p_matmul: x must have 1 to {TC_ROWS} rows, got {n}")
    xh = jnp.pad(x2.astype(jnp.float16), ((0, TC_ROWS - n), (0, 0)))
    kernel = functools.partial(_tc_kernel, bits=bits, groups=groups, bn=bn, bc=bc, steps=k_in // bc,
                               inv_resid=1.0 / resid_scale)
    params = triton_params(interpret, "e8p_matmul", num_warps=num_warps, num_stages=num_stages)
    y = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((TC_ROWS, out), jnp.float32), grid=(out // bn,),
                       compiler_params=params, interpret=interpret, name=f"e8p_matmul_{bits}bit")(
        xh, codes.astype(jnp.uint8).reshape(-1), tab)
    return y[:n].reshape(*lead, out)


def e8p_product(x: jax.Array, codes: jax.Array, table: jax.Array, **kwargs) -> jax.Array:
    """What the Pallas QuIP# linear calls: ``e8p_matmul`` for 2 to ``TC_ROWS`` rows of x, else
    ``e8p_matvec`` (same arguments)."""
    rows = math.prod(x.shape[:-1])
    return (e8p_matmul if 2 <= rows <= TC_ROWS else e8p_matvec)(x, codes, table, **kwargs)


def _flat_table(x, codes, table, bits, resid_table) -> jax.Array:
    """Check the arguments; the kernel's flat float32 table (E8P's, then at 3 bits the residual set's)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"pallas e8p_matvec: bits must be one of {SUPPORTED_BITS}, got {bits}")
    if codes.ndim != 3 or codes.shape[2] != bits or codes.shape[1] * 8 != x.shape[-1]:
        raise ValueError(f"pallas e8p_matvec: codes {codes.shape} do not fit x {x.shape} at {bits} bits "
                         f"(need [out, in/8, {bits}])")
    if table.shape != (256, 8):
        raise ValueError(f"pallas e8p_matvec: table must be [256, 8], got {table.shape}")
    if bits == 3 and (resid_table is None or resid_table.shape != (256, 8)):
        raise ValueError("pallas e8p_matvec: 3 bits need resid_table, the [256, 8] E8 1-bit set, got "
                         f"{None if resid_table is None else resid_table.shape}")
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        raise TypeError(f"pallas e8p_matvec: x must be float32, float16 or bfloat16, got {x.dtype}")
    tables = [table] + ([resid_table] if bits == 3 else [])
    return jnp.concatenate([jnp.asarray(t, jnp.float32).reshape(-1) for t in tables])


@functools.partial(jax.jit, static_argnames=("bits", "resid_scale", "block_rows", "block_cols", "num_warps",
                                             "num_stages", "interpret"))
def e8p_matvec(x: jax.Array, codes: jax.Array, table: jax.Array, *, bits: int, resid_scale: float = 1.0,
               resid_table: jax.Array | None = None, block_rows: int = 32, block_cols: int = 64, num_warps: int = 4,
               num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """``y[..., out] = x[..., in] @ Q.T`` (float32) for E8P (bits=2), E8P-RVQ3 (3) or E8P-RVQ4 (4) codes.

    codes: uint8 ``[out, in / 8, bits]``; table: float32 ``[256, 8]`` from ``e8p_table``;
    resid_scale: the residual stage's divisor (ignored at 2 bits); resid_table: at 3 bits the
    residual codebook, the E8 1-bit set ``[256, 8]`` (``jaxquant.codebooks.e8p.e8_onebit_codebook``).
    ``interpret=True`` runs on any backend (CPU tests).
    """
    tab = _flat_table(x, codes, table, bits, resid_table)
    out, groups, _ = codes.shape
    k_in = x.shape[-1]
    bn, bc = pow2_divisor(out, block_rows), pow2_divisor(k_in, block_cols)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_in)
    flat = codes.astype(jnp.uint8).reshape(-1)
    params = triton_params(interpret, "e8p_matvec", num_warps=num_warps, num_stages=num_stages)

    def call(xb):
        nb = xb.shape[0]
        kernel = functools.partial(_kernel, n=nb, bits=bits, groups=groups, bn=bn, bc=bc, steps=k_in // bc,
                                   inv_resid=1.0 / resid_scale)
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((nb, out), jnp.float32), grid=(out // bn,),
                              compiler_params=params, interpret=interpret, name=f"e8p_matvec_{bits}bit")(
            xb, flat, tab)

    return over_row_groups(call, x2, lead, out, jnp.float32)
