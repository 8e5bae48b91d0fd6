"""Decode-matmul of the packed scalar format on tensor cores (Pallas, Triton lowering), 2/4/8 bits.

For 2 to 16 rows of x. The CUDA-core kernels do one FMA per weight per row of x, so from batch ~4
on they are bound by arithmetic, not by the weight stream; here each step decodes a tile of codes
once into 16-bit integers and multiplies it with all rows of x in ``m = 32 / bits`` tensor-core dots.

Format as in ``scalar_matvec``: int32 ``codes [out, words]``, code ``t`` of word ``w`` is input
``w * m + t``; ``W = (q - zero) * scale`` per group of ``group_size`` inputs. A step covers ``bw``
words of one group, so with ``q`` kept as integers (decoded as ``OFFSET + q``, exact in 16 bits; the
zero absorbs ``OFFSET``)

    y[b, r] += scale[r] * (sum_t x_t[b] . q_t[r] - zero[r] * sum_k x[b, k])

where ``x_t`` are the inputs ``w * m + t`` of the step's words: the wrapper lays x out as
``[m, 16, words]`` (zero-padded to 16 rows) so that each ``x_t`` tile is one contiguous load. Groups
under 16 words (4 bits: under 128 inputs) are decoded to weights in x's dtype first, as the reference
rounds them. The input axis is split over ``splits`` programs per row block when there are too few row
blocks to fill the GPU (the last split repeats its final step with weight 0 where they do not divide
the steps); their fp32 partial sums are added outside.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import pow2_divisor, triton_params
from pallas_kernels.scalar_matvec import plan

ROWS = 16  # the dot's M: x is padded to 16 rows
DOT_DTYPES = (jnp.float16, jnp.bfloat16)
MIN_DOT_K = 16  # the smallest K and N of a Triton dot
# q | OFFSET_BITS read as a 16-bit float is OFFSET + q, exact while q < OFFSET (the spacing there is 1):
# codes of fewer bits than the type's significand decode with one bit operation; the zero absorbs OFFSET
OFFSET = {jnp.dtype(jnp.float16): 1024.0, jnp.dtype(jnp.bfloat16): 128.0}
OFFSET_BITS = {jnp.dtype(jnp.float16): 0x6400, jnp.dtype(jnp.bfloat16): 0x4300}


def plan_tc(out: int, words: int, bits: int, group_size: int, *, block_rows: int = 128,
            block_words: int = 16) -> tuple[int, int, bool]:
    """(rows, words, factored) of a step: whole-group steps (scale and zero applied to the dots'
    sums) when a group holds at least ``MIN_DOT_K`` words, else ``block_words``-word steps that decode
    the weights. Raises where the tiles would be below the dots' 16 x 16 minimum."""
    bn, bw = plan(out, words, bits, group_size, block_rows=block_rows, block_words=block_words)
    factored = bw >= MIN_DOT_K
    if not factored:
        bw = pow2_divisor(words, block_words)
    if bw < MIN_DOT_K or bn < MIN_DOT_K:
        raise ValueError(f"pallas scalar_matmul: {out} outputs and {words} code words per row need "
                         f"{MIN_DOT_K}-aligned tiles (got {bn} x {bw})")
    return bn, bw, factored


def default_splits(out: int, words: int, bn: int, bw: int, *, target_programs: int = 264) -> int:
    """Input-axis splits giving about ``target_programs`` programs (two per SM of an H100)."""
    return max(1, min(words // bw, target_programs // (out // bn)))


def _kernel(x_ref, codes_ref, scale_ref, zero_ref, o_ref, *, bits, bn, bw, groups, group_words, steps,
            split_steps, factored, offset):
    m = 32 // bits
    mask = (1 << bits) - 1
    r0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    split = pl.program_id(1)
    rows = pl.ds(r0, bn)
    shape = (ROWS, bn)

    def body(step, acc):
        k = split * split_steps + step  # the last split's steps past the end repeat the last step, weighted 0
        w0 = pl.multiple_of(jnp.minimum(k, steps - 1) * bw, bw)
        words = codes_ref[rows, pl.ds(w0, bw)]
        if factored:  # the step lies in one group: scale and zero factor out of the dots
            g = (r0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)) * groups + w0 // group_words
            s = scale_ref[g].astype(jnp.float32)
            z = zero_ref[g].astype(jnp.float32)
        else:  # small groups: decode the weights themselves, rounded to x's dtype as the reference does
            rr = jax.lax.broadcasted_iota(jnp.int32, (bn, bw), 0)
            cc = jax.lax.broadcasted_iota(jnp.int32, (bn, bw), 1)
            g = (r0 + rr) * groups + (w0 + cc) // group_words
            s = scale_ref[g].astype(jnp.float32)
            zs = zero_ref[g].astype(jnp.float32) * s
        part = jnp.zeros(shape, jnp.float32)
        xsum = jnp.zeros((ROWS, bw), jnp.float32)
        for t in range(m):
            xt = x_ref[t, :, pl.ds(w0, bw)]  # [16, bw]
            qt = jax.lax.shift_right_logical(words, jnp.int32(t * bits)) & mask
            if offset:  # the bits of offset + q as a 16-bit float: no int-to-float conversion
                wt = jax.lax.bitcast_convert_type((qt | OFFSET_BITS[xt.dtype]).astype(jnp.int16), xt.dtype)
            elif factored:
                wt = qt.astype(xt.dtype)
            else:
                # float(q) as 2^23 + q's bits minus 2^23 (exact; an int-to-float conversion is 1/4 rate)
                q32 = jax.lax.bitcast_convert_type(qt | 0x4B000000, jnp.float32) - 8388608.0
                wt = (q32 * s - zs).astype(xt.dtype)
            part += jax.lax.dot_general(xt, wt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            if factored:
                xsum += xt.astype(jnp.float32)
        live = (k < steps).astype(jnp.float32)
        if not factored:
            return acc + live * part
        z = z + OFFSET[x_ref.dtype] if offset else z
        return acc + (live * s)[None, :] * (part - jnp.sum(xsum, axis=1)[:, None] * z[None, :])

    acc = jax.lax.fori_loop(0, split_steps, body, jnp.zeros(shape, jnp.float32))
    o_ref[split, :, rows] = acc


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "block_rows", "block_words", "splits",
                                             "offset", "num_warps", "num_stages", "interpret"))
def scalar_matmul(x: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int,
                  group_size: int, block_rows: int = 128, block_words: int = 16, splits: int | None = None,
                  offset: bool | None = None, num_warps: int = 4, num_stages: int = 3,
                  interpret: bool = False) -> jax.Array:
    """``y[..., out] = x[..., in] @ W.T`` on tensor cores; same arguments as ``scalar_matvec``.

    x must be float16 or bfloat16 (the dots' operand type) with at most 16 rows; ``splits`` (programs
    per row block, each a contiguous share of the input axis) defaults to ``default_splits``;
    ``offset`` decodes a code into the bits of ``OFFSET + q`` with one bit operation instead of an
    int-to-float conversion (default: wherever it is exact, i.e. whole-group steps and codes narrower
    than x's significand).
    """
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in DOT_DTYPES]:
        raise ValueError(f"pallas scalar_matmul: x must be float16 or bfloat16, got {x.dtype}")
    out, words = codes.shape
    bn, bw, factored = plan_tc(out, words, bits, group_size, block_rows=block_rows, block_words=block_words)
    m = 32 // bits
    k_pad = words * m
    lead, k_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k_in)
    n = x2.shape[0]
    if not 0 < n <= ROWS:
        raise ValueError(f"pallas scalar_matmul: x must have 1 to {ROWS} rows, got {n}")
    if k_in > k_pad:
        raise ValueError(f"pallas scalar_matmul: x has {k_in} inputs, the codes hold {k_pad}")
    groups = scale.size // out
    if groups * group_size < k_pad or zero.size != scale.size:
        raise ValueError("pallas scalar_matmul: scale/zero hold fewer groups than the codes")
    steps = words // bw
    splits = splits or default_splits(out, words, bn, bw)
    if not 1 <= splits <= steps:
        raise ValueError(f"pallas scalar_matmul: splits must be 1 to {steps} (the steps of {bw} words), got {splits}")
    can_offset = factored and bits < jnp.finfo(x.dtype).nmant + 1
    if offset is None:
        offset = can_offset
    elif offset and not can_offset:
        raise ValueError(f"pallas scalar_matmul: the offset decode needs groups of >= {MIN_DOT_K} words and "
                         f"{bits}-bit codes below {x.dtype}'s {jnp.finfo(x.dtype).nmant + 1} significant bits")
    # [m, 16, words]: x_t of a step is one [16, bw] tile. The barrier keeps XLA from fusing this
    # transpose into x's producer: in a decode step (SwiGLU of the previous kernel's partial sums) that
    # fusion took 0.76 ms on an H100; loading x strided instead slowed the kernel by a third.
    x2 = jax.lax.optimization_barrier(x2)
    xt = jnp.pad(x2, ((0, ROWS - n), (0, k_pad - k_in))).reshape(ROWS, words, m).transpose(2, 0, 1)
    kernel = functools.partial(_kernel, bits=bits, bn=bn, bw=bw, groups=groups, group_words=group_size // m,
                               steps=steps, split_steps=-(-steps // splits), factored=factored, offset=offset)
    params = triton_params(interpret, "scalar_matmul", num_warps=num_warps, num_stages=num_stages)
    parts = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((splits, ROWS, out), jnp.float32),
                           grid=(out // bn, splits), compiler_params=params, interpret=interpret,
                           name=f"scalar_matmul_{bits}bit")(xt, codes, scale.reshape(-1), zero.reshape(-1))
    return parts.sum(0)[:n].astype(x.dtype).reshape(*lead, out)
