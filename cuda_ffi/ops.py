"""jax-level wrappers of the CUDA FFI targets. Raw arrays and static parameters only.

``register=False`` skips the build and registration: the call still traces and lowers (for
``lowering_platforms=("cuda",)`` checks without a GPU) but cannot run.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cuda_ffi import build

FLOAT_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
MAX_BATCH = 16


def _check_float(x: jax.Array, what: str) -> None:
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in FLOAT_DTYPES]:
        raise TypeError(f"{what}: dtype must be float32, float16 or bfloat16, got {x.dtype}")


def scalar_matvec(x: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, *,
                  bits: int, group_size: int, rows_per_warp: int = 0, warps: int = 0,
                  register: bool = True) -> jax.Array:
    """``y[..., out] = x[..., in] @ W.T`` with ``W = (q - zero) * scale`` decoded from packed codes.

    codes: int32 ``[out, ceil(in_padded / 32) * bits]`` (``jaxquant.formats.packing``);
    scale, zero: ``out * in_padded / group_size`` values (any shape, row-major ``[out, groups]``),
    stored as float16 (others are cast); ``in_padded`` = ``in`` rounded up to whole groups.
    Needs ``bits`` in {2, 3, 4, 8} and ``group_size`` a multiple of 32. Leading dims of x with more
    than 16 rows in all are split into calls of 16 (each reads the weights again).
    ``rows_per_warp`` (1, 2, 4; batch 1 only) and ``warps`` (1-8 per block) tune the launch; 0 = auto.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"scalar_matvec: bits must be 2, 3, 4 or 8, got {bits}")
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"scalar_matvec: group_size must be a multiple of 32, got {group_size}")
    _check_float(x, "scalar_matvec")
    if register:
        build.load()
    out = codes.shape[0]
    lead, k_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k_in)
    scale = scale.reshape(out, -1).astype(jnp.float16)
    zero = zero.reshape(out, -1).astype(jnp.float16)

    def one(xb):
        f = jax.ffi.ffi_call("jaxquant_scalar_matvec", jax.ShapeDtypeStruct((xb.shape[0], out), x.dtype),
                             vmap_method="sequential")
        return f(xb, codes, scale, zero, bits=np.int64(bits), group_size=np.int64(group_size),
                 rows_per_warp=np.int64(rows_per_warp), warps=np.int64(warps))

    n = x2.shape[0]
    if n == 0:
        return jnp.zeros((*lead, out), x.dtype)
    parts = [one(x2[i:i + MAX_BATCH]) for i in range(0, n, MAX_BATCH)]
    y = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    return y.reshape(*lead, out)


def hadamard(x: jax.Array, signs: jax.Array | None = None, *, normalize: bool = True,
             signs_after: bool = False, register: bool = True) -> jax.Array:
    """Walsh-Hadamard transform (Sylvester order) of the last axis, n = 2^p <= 32768.

    ``y = FWHT(x * signs) / sqrt(n)``; with ``signs_after`` the signs multiply the result instead
    (``FWHT(x) / sqrt(n) * signs``, the inverse of the former). ``normalize=False`` drops 1/sqrt(n).
    Computes in float32 whatever the input dtype; the output has x's dtype.
    """
    _check_float(x, "hadamard")
    n = x.shape[-1]
    if n < 2 or n & (n - 1) or n > 32768:
        raise ValueError(f"hadamard: the last axis must be a power of two in [2, 32768], got {n}")
    if register:
        build.load()
    if signs is None:
        s = jnp.zeros((1,), jnp.float32)
    else:
        if signs.shape != (n,):
            raise ValueError(f"hadamard: signs must have shape ({n},), got {signs.shape}")
        s = signs.astype(jnp.float32)
    f = jax.ffi.ffi_call("jaxquant_hadamard", jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential")
    return f(x, s, has_signs=np.int64(signs is not None), signs_after=np.int64(signs_after),
             normalize=np.int64(normalize))
