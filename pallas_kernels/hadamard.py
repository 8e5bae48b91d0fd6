"""Walsh-Hadamard transform of the last axis in Pallas (Triton lowering), n = 2^p in [2, 32768].

``y = H_n (x * signs) / sqrt(n)`` (or ``H_n x / sqrt(n) * signs`` with ``signs_after``, the
inverse), ``H_n`` the Sylvester-ordered Hadamard matrix, as ``jaxquant.hadamard``'s power-of-two
factor and the CUDA ``hadamard`` kernel compute it. Float32 inside, output in x's dtype.

No butterflies: the Triton lowering cannot slice or interleave register blocks, but it has dot
products. ``H_n = H_a ⊗ H_b`` for ``n = a·b``, so with a row viewed as an ``[a, b]`` matrix X
(a free reshape outside the kernel), the transform is ``H_a X H_b``: two small dense products
with Sylvester matrices of order 16-128 (passed in as inputs, ±1, exact). Per size:

- ``n <= 8``: one program per ``block_rows`` rows, ``y = x H_n`` as a sum of n outer products
  (a dot needs every dimension >= 16);
- ``16 <= n <= 128``: one program per ``block_rows`` rows (padded to a multiple), ``y = X H_n``;
- ``256 <= n <= 4096``: one program per row, the row as ``[a, b]`` (a, b in 16..64),
  ``Y = H_a X H_b`` (at most 16 KiB per operand, so blocks stay in registers / shared memory);
- ``8192 <= n <= 32768``: two passes: ``H_16`` along the leading axis of the row viewed as
  ``[16, n/16]`` (programs over ``[16, 128]`` column blocks), then each of the 16 rows of
  ``n/16`` as above. Each pass reads and writes x once (the first writes float32).

Dots run at ``Precision.HIGHEST`` (IEEE fp32 in Triton; the default would be TF32).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.common import triton_params


MAX_N = 32768
_ONE_PASS_MAX = 4096  # a, b <= 64
_HIGHEST = jax.lax.Precision.HIGHEST
FLOAT_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)


def sylvester(n: int) -> np.ndarray:
    """``H_n`` (n a power of two) as float32: ``H[i, j] = (-1)^popcount(i & j)``, symmetric."""
    i = np.arange(n)
    bits = np.bitwise_and(i[:, None], i[None, :])
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return (1 - 2 * parity).astype(np.float32)


def _split(n: int) -> tuple[int, int]:
    """``n = a·b`` with a <= b, both powers of two in [16, 64] (n in [256, 4096])."""
    p = n.bit_length() - 1
    return 2 ** (p // 2), 2 ** (p - p // 2)


def _kernel_small(x_ref, h_ref, *rest, n, scale, has_signs, signs_after):
    """``[br, n]`` rows, n <= 8: ``y = sum_i x[:, i] ⊗ H[i, :]``."""
    s_ref, o_ref = rest if has_signs else (None, rest[0])
    s = s_ref[0, :].astype(jnp.float32) if has_signs else None
    acc = None
    for i in range(n):
        xi = x_ref[:, i].astype(jnp.float32)
        if has_signs and not signs_after:
            xi = xi * s_ref[0, i].astype(jnp.float32)
        term = xi[:, None] * h_ref[i, :][None, :]
        acc = term if acc is None else acc + term
    acc = acc * scale
    if has_signs and signs_after:
        acc = acc * s[None, :]
    o_ref[...] = acc.astype(o_ref.dtype)


def _kernel_right(x_ref, h_ref, *rest, scale, has_signs, signs_after):
    """``[br, n]`` rows, 16 <= n <= 128: ``y = X H_n``."""
    s_ref, o_ref = rest if has_signs else (None, rest[0])
    x = x_ref[...].astype(jnp.float32)
    if has_signs and not signs_after:
        x = x * s_ref[...].astype(jnp.float32)
    y = jnp.dot(x, h_ref[...], precision=_HIGHEST) * scale
    if has_signs and signs_after:
        y = y * s_ref[...].astype(jnp.float32)
    o_ref[...] = y.astype(o_ref.dtype)


def _kernel_two_sided(x_ref, ha_ref, hb_ref, *rest, scale, has_signs, signs_after):
    """One row as ``[a, b]``: ``Y = H_a X H_b``."""
    s_ref, o_ref = rest if has_signs else (None, rest[0])
    x = x_ref[...].astype(jnp.float32)
    if has_signs and not signs_after:
        x = x * s_ref[...].astype(jnp.float32)
    y = jnp.dot(ha_ref[...], x, precision=_HIGHEST)
    y = jnp.dot(y, hb_ref[...], precision=_HIGHEST) * scale
    if has_signs and signs_after:
        y = y * s_ref[...].astype(jnp.float32)
    o_ref[...] = y.astype(o_ref.dtype)


def _kernel_left(x_ref, h_ref, *rest, scale, has_signs):
    """A ``[f, bc]`` block of the row viewed as ``[f, rest]``: ``Y = H_f X`` (signs before only)."""
    s_ref, o_ref = rest if has_signs else (None, rest[0])
    x = x_ref[...].astype(jnp.float32)
    if has_signs:
        x = x * s_ref[...].astype(jnp.float32)
    o_ref[...] = (jnp.dot(h_ref[...], x, precision=_HIGHEST) * scale).astype(o_ref.dtype)


def _params(interpret: bool, num_warps: int):
    return triton_params(interpret, "hadamard", num_warps=num_warps, num_stages=1)


def _rows_pass(x2, s, *, scale, signs_after, block_rows, interpret, num_warps):
    """n <= 4096 on ``x2 [rows, n]``; ``s``: ``[1, n]`` float32 or None."""
    rows, n = x2.shape
    has = s is not None
    sargs = (s,) if has else ()
    params = _params(interpret, num_warps)
    if n <= 128:
        br = max(16, block_rows)
        pad = -rows % br
        xp = jnp.pad(x2, ((0, pad), (0, 0))) if pad else x2
        h = jnp.asarray(sylvester(n))
        if n < 16:
            kernel = functools.partial(_kernel_small, n=n, scale=scale, has_signs=has, signs_after=signs_after)
        else:
            kernel = functools.partial(_kernel_right, scale=scale, has_signs=has, signs_after=signs_after)
        specs = [pl.BlockSpec((br, n), lambda i: (i, 0)), pl.BlockSpec((n, n), lambda i: (0, 0))]
        specs += [pl.BlockSpec((1, n), lambda i: (0, 0))] * has
        y = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(xp.shape, x2.dtype), grid=(xp.shape[0] // br,),
                           in_specs=specs, out_specs=pl.BlockSpec((br, n), lambda i: (i, 0)),
                           compiler_params=params, interpret=interpret, name=f"hadamard_{n}")(xp, h, *sargs)
        return y[:rows] if pad else y
    a, b = _split(n)
    kernel = functools.partial(_kernel_two_sided, scale=scale, has_signs=has, signs_after=signs_after)
    specs = [pl.BlockSpec((None, a, b), lambda i: (i, 0, 0)), pl.BlockSpec((a, a), lambda i: (0, 0)),
             pl.BlockSpec((b, b), lambda i: (0, 0))]
    specs += [pl.BlockSpec((a, b), lambda i: (0, 0))] * has
    y = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((rows, a, b), x2.dtype), grid=(rows,),
                       in_specs=specs, out_specs=pl.BlockSpec((None, a, b), lambda i: (i, 0, 0)),
                       compiler_params=params, interpret=interpret, name=f"hadamard_{n}")(
        x2.reshape(rows, a, b), jnp.asarray(sylvester(a)), jnp.asarray(sylvester(b)),
        *(si.reshape(a, b) for si in sargs))
    return y.reshape(rows, n)


def _left_pass(x2, s, *, f, scale, interpret, num_warps, block_cols=128):
    """``H_f`` along the leading axis of each row viewed as ``[f, n / f]`` (float32 out)."""
    rows, n = x2.shape
    c = n // f
    bc = min(block_cols, c)
    has = s is not None
    kernel = functools.partial(_kernel_left, scale=scale, has_signs=has)
    specs = [pl.BlockSpec((None, f, bc), lambda i, j: (i, 0, j)), pl.BlockSpec((f, f), lambda i, j: (0, 0))]
    specs += [pl.BlockSpec((f, bc), lambda i, j: (0, j))] * has
    y = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((rows, f, c), jnp.float32), grid=(rows, c // bc),
                       in_specs=specs, out_specs=pl.BlockSpec((None, f, bc), lambda i, j: (i, 0, j)),
                       compiler_params=_params(interpret, num_warps), interpret=interpret,
                       name=f"hadamard_{n}_left{f}")(
        x2.reshape(rows, f, c), jnp.asarray(sylvester(f)), *([s.reshape(f, c)] if has else []))
    return y.reshape(rows, n)


@functools.partial(jax.jit, static_argnames=("normalize", "signs_after", "block_rows", "num_warps", "interpret"))
def hadamard(x: jax.Array, signs: jax.Array | None = None, *, normalize: bool = True, signs_after: bool = False,
             block_rows: int = 16, num_warps: int = 4, interpret: bool = False) -> jax.Array:
    """Walsh-Hadamard transform (Sylvester order) of the last axis of x, n = 2^p in [2, 32768].

    ``y = FWHT(x * signs) / sqrt(n)``; with ``signs_after``, ``FWHT(x) / sqrt(n) * signs`` (the
    inverse of the former). ``normalize=False`` drops 1/sqrt(n). Any leading dims; float32,
    float16 or bfloat16 x (computed in float32, returned in x's dtype). ``interpret=True`` runs on
    any backend (CPU tests).
    """
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in FLOAT_DTYPES]:
        raise TypeError(f"pallas hadamard: x must be float32, float16 or bfloat16, got {x.dtype}")
    n = x.shape[-1]
    if n < 2 or n & (n - 1) or n > MAX_N:
        raise ValueError(f"pallas hadamard: the last axis must be a power of two in [2, {MAX_N}], got {n}")
    s = None
    if signs is not None:
        if signs.shape != (n,):
            raise ValueError(f"pallas hadamard: signs must have shape ({n},), got {signs.shape}")
        s = signs.astype(jnp.float32).reshape(1, n)
    x2 = x.reshape(-1, n)
    if x2.shape[0] == 0:
        return x
    kw = dict(interpret=interpret, num_warps=num_warps)
    if n <= _ONE_PASS_MAX:
        y = _rows_pass(x2, s, scale=1.0 / math.sqrt(n) if normalize else 1.0, signs_after=signs_after,
                       block_rows=block_rows, **kw)
        return y.reshape(x.shape)
    f = max(16, n // _ONE_PASS_MAX)
    c = n // f
    y = _left_pass(x2, None if signs_after else s, f=f, scale=1.0 / math.sqrt(f) if normalize else 1.0, **kw)
    s2 = None if s is None or not signs_after else s.reshape(f, c)
    y = _rows_pass(y.reshape(-1, c), None, scale=1.0 / math.sqrt(c) if normalize else 1.0, signs_after=False,
                   block_rows=block_rows, **kw).reshape(-1, f, c)
    if s2 is not None:  # signs after the last pass: an elementwise XLA multiply
        y = y * s2
    return y.reshape(x.shape).astype(x.dtype)
