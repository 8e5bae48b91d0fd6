"""QTIP decode-matvec in Pallas (Triton lowering): ``y = x @ Wc.T`` in the rotated domain.

``Wc`` is the matrix of trellis code values (before QTIP's scale) stored as tail-biting
bitstreams per 16x16 tile (``jaxquant/formats/qtip.py``): int32 ``codes [out/16, in/16, 8k]``,
tile ``(i, j)``'s 256 weights one trellis sequence in row-major order, state ``t`` the L-bit
window starting at stream bit ``t·kV`` (read circularly over the tile's ``8k`` words, MSB-first).
Codes (``jaxquant/codebooks/trellis.py``, integer arithmetic, bit-exact here):

- ``1mad`` and ``3inst`` (V=1): table-free, a multiply-add and byte sum / mask-xor-fp16 add;
- ``hyb`` (V=2): ``h = s(s+1) mod 2^L``, Q bits of h index a ``[2^Q, 2]`` float16 table (a gather
  from global memory: the table is 2 KiB and stays in L1/L2), the top bit flips coordinate 0.

Blocking: one program owns ``block_tile_rows`` tile rows (``16·block_tile_rows`` output rows)
and walks the input axis ``block_tile_cols`` tiles at a time. Each step decodes its
``[16·btr, 16·btc]`` weight block at once: for every weight, the tile it lies in, its state
index and the two stream words holding its window are computed from iotas, and the words are
gathered straight from ``codes`` (a load with an index array; HYB's table read is the same kind
of load). Products and sums are float32; each of the 1-16 rows of x keeps its own accumulator.
Rows of x beyond 16 are processed 16 at a time.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.common import over_row_groups, pow2_divisor, triton_params


CODES = ("1mad", "3inst", "hyb")
SUPPORTED_K = (2, 3, 4)
TILE = 16

# Constants of jaxquant.codebooks.trellis (not imported: pallas_kernels imports nothing of jaxquant;
# tests check they agree).
MAD1_A, MAD1_B, MAD1_CENTER = 34038481, 76625530, 510
MAD1_SCALE = float(np.float32(1.0 / 147.800537109375))  # multiply by the fp32 reciprocal, as trellis does
INST3_A, INST3_B, INST3_MASK, INST3_XOR = 89226354, 64248484, 0x8FFF8FFF, 0x3B603B60


def _u32(v: int) -> jax.Array:
    return jnp.uint32(v)


def decode_values(s: jax.Array, coord: jax.Array | None, table_ref, *, code: str, L: int, Q: int) -> jax.Array:
    """uint32 states -> float32 code values (``coord``: which of hyb's two coordinates)."""
    if code == "1mad":
        x = s * _u32(MAD1_A) + _u32(MAD1_B)
        m = _u32(0xFF)
        y = (x & m) + ((x >> 8) & m) + ((x >> 16) & m) + (x >> 24)
        return (y.astype(jnp.int32) - MAD1_CENTER).astype(jnp.float32) * jnp.float32(MAD1_SCALE)
    if code == "3inst":
        x = s * _u32(INST3_A) + _u32(INST3_B)
        r = (x & _u32(INST3_MASK)) ^ _u32(INST3_XOR)
        hi = jax.lax.bitcast_convert_type((r >> 16).astype(jnp.uint16), jnp.float16)
        lo = jax.lax.bitcast_convert_type((r & _u32(0xFFFF)).astype(jnp.uint16), jnp.float16)
        return (hi + lo).astype(jnp.float32)
    h = (s * (s + _u32(1))) & _u32((1 << L) - 1)
    idx = ((h >> (L - Q - 1)) & _u32((1 << Q) - 1)).astype(jnp.int32)
    v = table_ref[idx * 2 + coord].astype(jnp.float32)
    flip = (((h >> (L - 1)) & _u32(1)) == 1) & (coord == 0)
    return jnp.where(flip, -v, v)


def _kernel(x_ref, codes_ref, table_ref, o_ref, *, n, code, k, L, Q, V, tiles_c, btr, btc, steps):
    bn, bc = TILE * btr, TILE * btc
    nw = TILE * TILE * k // 32  # words per tile
    i0 = pl.program_id(0) * btr  # first tile row of this program
    rr = jax.lax.broadcasted_iota(jnp.int32, (bn, bc), 0)
    cc = jax.lax.broadcasted_iota(jnp.int32, (bn, bc), 1)
    u = (rr % TILE) * TILE + cc % TILE  # weight index inside its tile (row-major)
    p = (u // V) * (k * V)  # first stream bit of its state's window
    wi, r = p >> 5, (p & 31).astype(jnp.uint32)
    wn = (wi + 1) % nw  # tail-biting: the last word wraps to the first
    coord = u % V if V > 1 else None
    tile_in_block = (i0 + rr // TILE) * tiles_c + cc // TILE

    def body(step, acc):
        base = (tile_in_block + step * btc) * nw
        w0 = codes_ref[base + wi]
        w1 = codes_ref[base + wn]
        hi = jnp.where(r == 0, w0, (w0 << r) | (w1 >> ((_u32(32) - r) & _u32(31))))
        vals = decode_values(hi >> (32 - L), coord, table_ref, code=code, L=L, Q=Q)
        c0 = pl.multiple_of(step * bc, bc)
        return tuple(acc[b] + jnp.sum(vals * x_ref[b, pl.ds(c0, bc)].astype(jnp.float32)[None, :], axis=1)
                     for b in range(n))

    acc = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((bn,), jnp.float32) for _ in range(n)))
    rows = pl.ds(pl.multiple_of(i0 * TILE, bn), bn)
    for b in range(n):
        o_ref[b, rows] = acc[b]


def plan(codes_shape: tuple[int, ...], *, code: str, k: int, L: int = 16, table_size: int = 0,
         block_tile_rows: int = 2, block_tile_cols: int = 4) -> tuple[int, int]:
    """Check the arguments; the (tile rows, tile cols) block actually used (powers of two)."""
    if code not in CODES:
        raise ValueError(f"pallas qtip_matvec: code must be one of {CODES}, got {code!r}")
    if k not in SUPPORTED_K:
        raise ValueError(f"pallas qtip_matvec: k must be one of {SUPPORTED_K}, got {k}")
    V = 2 if code == "hyb" else 1
    if not (k * V <= L <= 24):
        raise ValueError(f"pallas qtip_matvec: L must be in [{k * V}, 24] for {code} at k={k}, got {L}")
    if len(codes_shape) != 3 or codes_shape[2] != TILE * TILE * k // 32:
        raise ValueError(f"pallas qtip_matvec: codes must be [out/16, in/16, {8 * k}] at k={k}, got {codes_shape}")
    if code == "hyb" and (table_size < 4 or table_size & (table_size - 1) or table_size // 2 > 2 ** (L - 1)):
        raise ValueError(f"pallas qtip_matvec: hyb needs a [2^Q, 2] table with Q < L, got {table_size} entries")
    return pow2_divisor(codes_shape[0], block_tile_rows), pow2_divisor(codes_shape[1], block_tile_cols)


@functools.partial(jax.jit, static_argnames=("code", "k", "L", "block_tile_rows", "block_tile_cols", "num_warps",
                                             "num_stages", "interpret"))
def qtip_matvec(x: jax.Array, codes: jax.Array, table: jax.Array | None, *, code: str, k: int, L: int = 16,
                block_tile_rows: int = 2, block_tile_cols: int = 4, num_warps: int = 4, num_stages: int = 2,
                interpret: bool = False) -> jax.Array:
    """``y[..., out] = x[..., in] @ Wc.T`` (float32), ``Wc`` the code values of the 16x16-tile
    streams ``codes`` (int32 ``[out/16, in/16, 8k]``); the same product as ``cuda_ffi.qtip_matvec``.

    code: ``1mad`` or ``3inst`` (``table`` ignored; pass None) or ``hyb`` (``table`` float16
    ``[2^Q, 2]``, Q < L); k: 2, 3 or 4 bits per weight; L: the trellis state width.
    ``interpret=True`` runs on any backend (CPU tests).
    """
    table_size = 0 if table is None else table.size
    btr, btc = plan(codes.shape, code=code, k=k, L=L, table_size=table_size, block_tile_rows=block_tile_rows,
                    block_tile_cols=block_tile_cols)
    if code == "hyb" and table is None:
        raise ValueError("pallas qtip_matvec: hyb needs its table")
    tiles_r, tiles_c, _ = codes.shape
    if x.shape[-1] != tiles_c * TILE:
        raise ValueError(f"pallas qtip_matvec: x has {x.shape[-1]} inputs, the codes hold {tiles_c * TILE}")
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        raise TypeError(f"pallas qtip_matvec: x must be float32, float16 or bfloat16, got {x.dtype}")
    V = 2 if code == "hyb" else 1
    Q = (table_size // 2).bit_length() - 1 if code == "hyb" else 0
    out = tiles_r * TILE
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    flat = jax.lax.bitcast_convert_type(codes, jnp.uint32).reshape(-1)
    tab = table.astype(jnp.float16).reshape(-1) if code == "hyb" else jnp.zeros((2,), jnp.float16)
    params = triton_params(interpret, "qtip_matvec", num_warps=num_warps, num_stages=num_stages)

    def call(xb):
        nb = xb.shape[0]
        kernel = functools.partial(_kernel, n=nb, code=code, k=k, L=L, Q=Q, V=V, tiles_c=tiles_c, btr=btr,
                                   btc=btc, steps=tiles_c // btc)
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((nb, out), jnp.float32),
                              grid=(tiles_r // btr,), compiler_params=params, interpret=interpret,
                              name=f"qtip_matvec_{code}_k{k}")(xb, flat, tab)

    return over_row_groups(call, x2, lead, out, jnp.float32)
