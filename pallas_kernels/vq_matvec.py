"""GPTVQ decode-matvec in Pallas (Triton lowering): ``y = x @ W.T`` with W decoded on the fly.

Format (``jaxquant/formats/vq.py``): a vector is ``D`` consecutive inputs of one row; row ``r``'s
``in / D`` vector indices of ``index_bits`` (b) bits are bit-packed into int32 ``codes [out, words]``
as ``jaxquant/formats/packing.py`` lays them out: runs of 32 indices, each run one little-endian
bitstream of ``32·b`` bits in ``b`` words, index ``t`` of a run at stream bits ``[t·b, (t+1)·b)``.
Widths that do not divide 32 (3, 5, 6, 7 ...) straddle two words. Each tile of ``group_rows`` ×
``group_cols`` weights has its own codebook of ``K = 2^b`` D-vectors; the caller passes them
as float ``codebooks [out/group_rows, in/group_cols, K, D]`` (int8 entries times the tile's scale,
or the SVD product), so the kernel reproduces ``dequantize`` exactly.

Optional blockwise scales (``VQScaledQuantized``): one ``scale_bits`` code per row and
``scale_block`` inputs, packed the same way over the row-major ``[out, in / scale_block]`` array,
and the ``2^scale_bits`` scale values the codes stand for; decoded weights are multiplied by them.

Blocking: one program owns ``block_rows`` rows and walks the input axis ``block_vectors`` vectors
(``D·block_vectors`` inputs) at a time. For each vector of the ``[rows, vectors]`` block the
packed word(s) holding its index and its codebook entry are computed from iotas and loaded with
index arrays (gathers from global memory, as in ``qtip_matvec``: a tile's codebook is a few
hundred bytes and stays in L1/L2). x is viewed as ``[n, in/D, D]`` (a free reshape) and loaded
one coordinate at a time (a strided vector), once per step for all rows of the block. Products
and sums are float32; each of the 1-16 rows of x keeps its own accumulator; rows of x beyond 16
are processed 16 at a time.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import over_row_groups, pow2_divisor, triton_params


SUPPORTED_DIMS = (1, 2, 4)
MAX_INDEX_BITS = 16  # a tile codebook of 2^16 entries is already far past any useful size
RUN = 32  # indices per packed run (packing.CHUNK)


def packed_words(n: int, bits: int) -> int:
    """Words per row holding ``n`` indices of ``bits`` bits (``packing.packed_words``)."""
    return -(-n // RUN) * bits


def read_packed(words_ref, start_word: jax.Array, position: jax.Array, bits: int) -> jax.Array:
    """int32 codes number ``position`` of the packed streams starting at word ``start_word``."""
    bit = (position % RUN) * bits
    word = start_word + (position // RUN) * bits + bit // 32
    shift = (bit % 32).astype(jnp.uint32)
    value = words_ref[word] >> shift
    if 32 % bits:
        # Only a code that crosses the word boundary reads the next word; the others re-read
        # their own, so no load goes past the array's end.
        straddles = shift + bits > 32
        high = words_ref[jnp.where(straddles, word + 1, word)] << ((jnp.uint32(32) - shift) & jnp.uint32(31))
        value = value | jnp.where(straddles, high, jnp.uint32(0))
    return (value & jnp.uint32((1 << bits) - 1)).astype(jnp.int32)


def _kernel(x_ref, codes_ref, cb_ref, *refs, n, D, bits, words, group_rows, group_cols, tiles_c, K, bn, bv,
            steps, scale_bits, scale_block, scale_blocks_per_row):
    *scale_refs, o_ref = refs
    r0 = pl.program_id(0) * bn
    rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bn, bv), 0)
    vec_in_step = jax.lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
    row_start_word = rows * words
    row_tile_base = (rows // group_rows) * tiles_c

    def body(step, acc):
        vec = step * bv + vec_in_step
        idx = read_packed(codes_ref, row_start_word, vec, bits)
        entry = ((row_tile_base + (vec * D) // group_cols) * K + idx) * D
        coords = [cb_ref[entry + d] for d in range(D)]
        if scale_refs:
            scale_codes_ref, scale_values_ref = scale_refs
            block = rows * scale_blocks_per_row + (vec * D) // scale_block
            s = scale_values_ref[read_packed(scale_codes_ref, jnp.int32(0), block, scale_bits)]
            coords = [c * s for c in coords]
        v0 = pl.multiple_of(step * bv, bv)
        new = []
        for b in range(n):
            part = coords[0] * x_ref[b, pl.ds(v0, bv), 0].astype(jnp.float32)[None, :]
            for d in range(1, D):
                part = part + coords[d] * x_ref[b, pl.ds(v0, bv), d].astype(jnp.float32)[None, :]
            new.append(acc[b] + jnp.sum(part, axis=1))
        return tuple(new)

    acc = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((bn,), jnp.float32) for _ in range(n)))
    out_rows = pl.ds(pl.multiple_of(r0, bn), bn)
    for b in range(n):
        o_ref[b, out_rows] = acc[b]


def plan(codes_shape: tuple[int, ...], codebooks_shape: tuple[int, ...], *, vq_dim: int, index_bits: int,
         group_rows: int, group_cols: int, block_rows: int = 32, block_vectors: int = 64) -> tuple[int, int]:
    """Check the arguments; the (rows, vectors) block actually used (powers of two)."""
    if vq_dim not in SUPPORTED_DIMS:
        raise ValueError(f"pallas vq_matvec: vq_dim must be one of {SUPPORTED_DIMS}, got {vq_dim}")
    if not 1 <= index_bits <= MAX_INDEX_BITS:
        raise ValueError(f"pallas vq_matvec: index_bits must be in [1, {MAX_INDEX_BITS}], got {index_bits}")
    if len(codes_shape) != 2 or len(codebooks_shape) != 4:
        raise ValueError(f"pallas vq_matvec: codes must be [out, words] and codebooks [tiles_r, tiles_c, K, D], "
                         f"got {codes_shape} and {codebooks_shape}")
    out = codes_shape[0]
    tiles_r, tiles_c, K, D = codebooks_shape
    if D != vq_dim or K != 2**index_bits:
        raise ValueError(f"pallas vq_matvec: codebooks must hold {2**index_bits} entries of {vq_dim} values, "
                         f"got {codebooks_shape}")
    if tiles_r * group_rows != out:
        raise ValueError(f"pallas vq_matvec: {tiles_r} tile rows of {group_rows} do not make the {out} rows")
    inp = tiles_c * group_cols
    if inp % vq_dim:
        raise ValueError(f"pallas vq_matvec: in = {inp} is not a multiple of vq_dim {vq_dim}")
    if codes_shape[1] != packed_words(inp // vq_dim, index_bits):
        raise ValueError(f"pallas vq_matvec: codes hold {codes_shape[1]} words a row, {inp // vq_dim} indices of "
                         f"{index_bits} bits take {packed_words(inp // vq_dim, index_bits)}")
    return pow2_divisor(out, block_rows), pow2_divisor(inp // vq_dim, block_vectors)


@functools.partial(jax.jit, static_argnames=("vq_dim", "index_bits", "group_rows", "group_cols", "scale_block",
                                             "scale_bits", "block_rows", "block_vectors", "num_warps",
                                             "num_stages", "interpret"))
def vq_matvec(x: jax.Array, codes: jax.Array, codebooks: jax.Array, *, vq_dim: int, index_bits: int,
              group_rows: int, group_cols: int, scale_codes: jax.Array | None = None,
              scale_values: jax.Array | None = None, scale_block: int = 0, scale_bits: int = 0,
              block_rows: int = 32, block_vectors: int = 64, num_warps: int = 4, num_stages: int = 2,
              interpret: bool = False) -> jax.Array:
    """``y[..., out] = x[..., in] @ W.T`` (float32), W decoded from the packed vector indices
    ``codes`` (int32 ``[out, words]``) and the float ``codebooks [out/group_rows, in/group_cols,
    2^index_bits, vq_dim]``; ``vq_dim`` 1, 2 or 4, ``index_bits`` 1 to 16.

    Blockwise scales (optional): ``scale_codes`` the packed ``scale_bits`` codes of the row-major
    ``[out, in / scale_block]`` blocks and ``scale_values`` the ``2^scale_bits`` scales they stand
    for; ``scale_block`` a multiple of ``vq_dim`` dividing ``in``. ``interpret=True`` runs on any
    backend (CPU tests).
    """
    bn, bv = plan(codes.shape, codebooks.shape, vq_dim=vq_dim, index_bits=index_bits, group_rows=group_rows,
                  group_cols=group_cols, block_rows=block_rows, block_vectors=block_vectors)
    out = codes.shape[0]
    tiles_c = codebooks.shape[1]
    inp = tiles_c * group_cols
    if x.shape[-1] != inp:
        raise ValueError(f"pallas vq_matvec: x has {x.shape[-1]} inputs, the weight {inp}")
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        raise TypeError(f"pallas vq_matvec: x must be float32, float16 or bfloat16, got {x.dtype}")
    scaled = scale_codes is not None or scale_values is not None
    scale_args = ()
    if scaled:
        if scale_codes is None or scale_values is None:
            raise ValueError("pallas vq_matvec: block scales need both scale_codes and scale_values")
        if scale_block <= 0 or scale_block % vq_dim or inp % scale_block:
            raise ValueError(f"pallas vq_matvec: scale_block {scale_block} must be a multiple of vq_dim "
                             f"{vq_dim} dividing in = {inp}")
        if not 1 <= scale_bits <= MAX_INDEX_BITS or scale_values.size != 2**scale_bits:
            raise ValueError(f"pallas vq_matvec: scale_bits must be in [1, {MAX_INDEX_BITS}] and scale_values "
                             f"hold 2^scale_bits values, got {scale_bits} bits and {scale_values.size} values")
        if scale_codes.size != packed_words(out * (inp // scale_block), scale_bits):
            raise ValueError(f"pallas vq_matvec: scale_codes hold {scale_codes.size} words, "
                             f"{out * (inp // scale_block)} codes of {scale_bits} bits take "
                             f"{packed_words(out * (inp // scale_block), scale_bits)}")
        scale_args = (jax.lax.bitcast_convert_type(scale_codes, jnp.uint32).reshape(-1),
                      scale_values.astype(jnp.float32).reshape(-1))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, inp)
    flat_codes = jax.lax.bitcast_convert_type(codes, jnp.uint32).reshape(-1)
    flat_codebooks = codebooks.astype(jnp.float32).reshape(-1)
    params = triton_params(interpret, "vq_matvec", num_warps=num_warps, num_stages=num_stages)
    nv = inp // vq_dim

    def call(xb):
        nb = xb.shape[0]
        kernel = functools.partial(_kernel, n=nb, D=vq_dim, bits=index_bits, words=codes.shape[1],
                                   group_rows=group_rows, group_cols=group_cols, tiles_c=tiles_c,
                                   K=2**index_bits, bn=bn, bv=bv, steps=nv // bv, scale_bits=scale_bits,
                                   scale_block=scale_block, scale_blocks_per_row=inp // scale_block if scaled else 0)
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((nb, out), jnp.float32), grid=(out // bn,),
                              compiler_params=params, interpret=interpret,
                              name=f"vq_matvec_d{vq_dim}_{index_bits}bit")(
            xb.reshape(nb, nv, vq_dim), flat_codes, flat_codebooks, *scale_args)

    return over_row_groups(call, x2, lead, out, jnp.float32)
