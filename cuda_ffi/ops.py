"""jax-level wrappers of the CUDA FFI targets. Raw arrays and static parameters only.

``register=False`` skips the build and registration: the call still traces and lowers (for
``lowering_platforms=("cuda",)`` checks without a GPU) but cannot run.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cuda_ffi import build

FLOAT_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)


def _check_float(x: jax.Array, what: str) -> None:
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in FLOAT_DTYPES]:
        raise TypeError(f"{what}: dtype must be float32, float16 or bfloat16, got {x.dtype}")


# The scalar kernel stages x in fp32 shared memory; beyond ~200 KB (4 rows of 8192 inputs) each block
# re-stages it tile by tile from L2, and on an H100 one call of 16 rows took 7-14x one of 4 rows
# (results/README.md, session 9): four calls of 4 rows are 1.5-3.5x faster.
SCALAR_ROWS_PER_CALL = 4


def scalar_matvec(x: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, *,
                  bits: int, group_size: int, rows_per_warp: int = 0, warps: int = 0, ksplit: int = 0,
                  variant: int = 0, register: bool = True) -> jax.Array:
    """``y[..., out] = x[..., in] @ W.T`` with ``W = (q - zero) * scale`` decoded from packed codes.

    codes: int32 ``[out, ceil(in_padded / 32) * bits]`` (``jaxquant.formats.packing``);
    scale, zero: ``out * in_padded / group_size`` values (any shape, row-major ``[out, groups]``),
    stored as float16 (others are cast); ``in_padded`` = ``in`` rounded up to whole groups.
    Needs ``bits`` in {2, 3, 4, 8} and ``group_size`` a multiple of 32. More than
    ``SCALAR_ROWS_PER_CALL`` rows of x in all are split into calls of that many (each reads the
    weights again).
    ``rows_per_warp`` (1, 2, 4; batch 1 only), ``warps`` (1-16 per block) and ``ksplit`` (warps
    sharing a row set, each a slice of K) tune the launch; 0 = auto. ``variant=1`` takes the half2
    decode for 2 and 4 bits at batch 1 with float16/bfloat16 x (fp16 products: error ~1e-3
    relative; other cases ignore it).
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
                 rows_per_warp=np.int64(rows_per_warp), warps=np.int64(warps), ksplit=np.int64(ksplit),
                 variant=np.int64(variant))

    n = x2.shape[0]
    if n == 0:
        return jnp.zeros((*lead, out), x.dtype)
    parts = [one(x2[i:i + SCALAR_ROWS_PER_CALL]) for i in range(0, n, SCALAR_ROWS_PER_CALL)]
    y = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    return y.reshape(*lead, out)


def scalar_mma(x: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, *, group_size: int,
               bits: int = 4, splits: int = 0, tiles: int = 4, prefetch: bool = True,
               register: bool = True) -> jax.Array:
    """4- or 2-bit ``scalar_matvec`` for 1-16 rows of float16/bfloat16 x on tensor cores (``mma.sync``).

    What ``backend="cuda"`` runs for 2-16 rows (``formats.dispatch.cuda_tensor_cores``). Needs groups
    of a multiple of 128 inputs and rows padded to whole groups (as ``jaxquant.formats.packing`` stores
    them). ``splits``: programs along the input axis, each whole groups (0: about two per SM of an
    H100); their fp32 partial sums are added here. ``tiles``: 16-row tiles per warp (2 or 4).
    ``prefetch``: load the next step while this one computes (1.2-1.3x faster on an H100,
    cuda_ffi/NOTES.md, session 11; 2-bit codes are always prefetched). 2-bit codes read 29-41% of copy
    at 70B shapes on an H100 (session 12), 2.3-2.9x the fp16 product and the Pallas kernel.
    """
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"scalar_mma: x must be float16 or bfloat16, got {x.dtype}")
    if bits not in (2, 4):
        raise ValueError(f"scalar_mma: bits must be 2 or 4, got {bits}")
    if group_size <= 0 or group_size % 128:
        raise ValueError(f"scalar_mma: group_size must be a multiple of 128, got {group_size}")
    if tiles not in (2, 4):
        raise ValueError(f"scalar_mma: tiles must be 2 or 4, got {tiles}")
    out, words = codes.shape
    kpad = words * 32 // bits
    lead, k_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k_in)
    n = x2.shape[0]
    if not 0 < n <= 16 or k_in > kpad or kpad % group_size:
        raise ValueError(f"scalar_mma: x {x.shape} does not fit 1-16 rows of codes [{out}, {words}] ({bits} bits) "
                         f"in whole groups of {group_size}")
    if register:
        build.load()
    rows = 8 if n <= 8 else 16
    x2 = jax.lax.optimization_barrier(x2)  # keep the padding out of x's producer (see pallas_kernels.scalar_matmul)
    xp = jnp.pad(x2, ((0, rows - n), (0, kpad - k_in)))
    scale = scale.reshape(out, -1).astype(jnp.float16)
    zero = zero.reshape(out, -1).astype(jnp.float16)
    groups = scale.shape[1]
    xsum = xp.astype(jnp.float32).reshape(rows, kpad // group_size, group_size).sum(-1)
    xsum = jnp.pad(xsum, ((0, 0), (0, groups - kpad // group_size)))
    blocks = -(-out // (64 * tiles))
    splits = splits or max(1, min(kpad // group_size, 264 // blocks))
    parts = jax.ffi.ffi_call("jaxquant_scalar_mma", jax.ShapeDtypeStruct((splits, rows, out), jnp.float32),
                             vmap_method="sequential")(xp, xsum, codes, scale, zero, group_size=np.int64(group_size),
                                                       tiles=np.int64(tiles), prefetch=np.int64(prefetch),
                                                       bits=np.int64(bits))
    return parts.sum(0)[:n].astype(x.dtype).reshape(*lead, out)


def hadamard(x: jax.Array, signs: jax.Array | None = None, *, normalize: bool = True,
             signs_after: bool = False, sum_parts: bool = False, register: bool = True) -> jax.Array:
    """Walsh-Hadamard transform (Sylvester order) of the last axis, n = 2^p <= 32768.

    ``y = FWHT(x * signs) / sqrt(n)``; with ``signs_after`` the signs multiply the result instead
    (``FWHT(x) / sqrt(n) * signs``, the inverse of the former). ``normalize=False`` drops 1/sqrt(n).
    Computes in float32 whatever the input dtype; the output has x's dtype. The kernel (v2:
    coalesced 16-byte loads, butterflies in registers, shared memory between stages; see
    cuda_ffi/NOTES.md) can be switched back to the first version with the environment variable
    ``JAXQUANT_HADAMARD_KERNEL=v1``, read once per process. ``sum_parts``: x is ``[P, ..., n]`` and
    the transform is of ``x.sum(0)``, added in the kernel's first pass (a matvec's partial sums).
    """
    _check_float(x, "hadamard")
    n = x.shape[-1]
    if n < 2 or n & (n - 1) or n > 32768:
        raise ValueError(f"hadamard: the last axis must be a power of two in [2, 32768], got {n}")
    if register:
        build.load()
    return _hadamard_call("hadamard", x, signs, sum_parts, signs_after=np.int64(signs_after),
                          normalize=np.int64(normalize))


def _hadamard_call(what: str, x: jax.Array, signs: jax.Array | None, sum_parts: bool, **attrs) -> jax.Array:
    """The ``jaxquant_<what>`` call with the checks and attributes both transforms share."""
    n = x.shape[-1]
    if signs is None:
        s = jnp.zeros((1,), jnp.float32)
    else:
        if signs.shape != (n,):
            raise ValueError(f"{what}: signs must have shape ({n},), got {signs.shape}")
        s = signs.astype(jnp.float32)
    out = x.shape
    if sum_parts:
        if x.ndim < 2 or x.shape[0] < 1:
            raise ValueError(f"{what}: sum_parts needs x [P, ..., n] with P >= 1, got {x.shape}")
        out = x.shape[1:]
    f = jax.ffi.ffi_call(f"jaxquant_{what}", jax.ShapeDtypeStruct(out, x.dtype), vmap_method="sequential")
    return f(x, s, has_signs=np.int64(signs is not None), parts=np.int64(x.shape[0] if sum_parts else 1), **attrs)


HADAMARD_K = (12, 20, 28)  # K of n = K * 2^p that the fused kernel takes, with p in [6, 10]


def hadamard_k_factor(n: int) -> int | None:
    """K of width n = K * 2^p when ``hadamard_k`` takes it (K = 4 * the odd part of n, as
    ``jaxquant.hadamard.hadamard_factors`` picks for these K), else None."""
    odd = n // (n & -n) if n > 0 else 0
    k = 4 * odd
    return k if k in HADAMARD_K and n % k == 0 and 64 <= n // k <= 1024 else None


def hadamard_k(x: jax.Array, signs: jax.Array | None = None, *, inverse: bool = False,
               sum_parts: bool = False, unit_signs: bool = False, register: bool = True) -> jax.Array:
    """``jaxquant.hadamard.rht`` (or ``rht_inverse``) of the last axis, n = K * 2^p with K in
    ``HADAMARD_K`` and 2^p in [64, 1024], in one kernel: the K-point factor (compile-time signs of
    ``hadamard_factor(K)``) and the 2^p-point transform on a row held in shared memory.
    ``y = (H_K ⊗ H_M)(x * signs) / sqrt(n)``; ``inverse``: the transpose, signs after. Computes in
    float32; the output has x's dtype. ``sum_parts`` as in ``hadamard``.
    The kernel flips signs only; the magnitudes of ``signs`` (real-valued once QuIP# / QTIP fine-tuning
    has trained them) multiply x before it (or y after it, ``inverse``) in XLA, which fuses them into
    the neighbouring ops. ``unit_signs=True`` promises every entry is +-1 and skips that multiply."""
    _check_float(x, "hadamard_k")
    n = x.shape[-1]
    k = hadamard_k_factor(n)
    if k is None:
        raise ValueError(f"hadamard_k: width {n} is not K * 2^p with K in {HADAMARD_K}, 2^p in [64, 1024]")
    if register:
        build.load()
    scaled = signs is not None and not unit_signs
    if scaled and not inverse:
        x = (x * jnp.abs(signs.astype(jnp.float32))).astype(x.dtype)
    y = _hadamard_call("hadamard_k", x, signs, sum_parts, k=np.int64(k), inverse=np.int64(inverse))
    if scaled and inverse:
        y = (y * jnp.abs(signs.astype(jnp.float32))).astype(y.dtype)
    return y


VQ_MAX_BATCH = 8


def _split_batch(x2: jax.Array, one) -> jax.Array:
    n = x2.shape[0]
    parts = [one(x2[i:i + VQ_MAX_BATCH]) for i in range(0, n, VQ_MAX_BATCH)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def e8p_abs_table(source_set: np.ndarray) -> np.ndarray:
    """The E8P kernel's source table: uint32 ``[256, 2]``, per vector the fp16 high bytes of its 8
    entries (low bytes are zero for 1/2, 3/2, 5/2), byte 7's sign set when the vector's coordinate
    sum is odd (the 8th sign is then the complement of the 7 stored signs' parity)."""
    s = np.asarray(source_set, np.float64)
    if s.shape != (256, 8):
        raise ValueError(f"E8P source set must be [256, 8], got {s.shape}")
    hi = (s.astype(np.float16).view(np.uint16) >> 8).astype(np.uint32)
    odd = (np.rint(s.sum(1)).astype(np.int64) % 2).astype(np.uint32)
    hi[:, 7] ^= odd << 7
    words = hi.reshape(256, 2, 4) << (8 * np.arange(4, dtype=np.uint32))
    return words.sum(-1, dtype=np.uint32)


def e8p_x_layout(x2: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """x ``[n, in]`` as the E8P kernel reads it: fp16 ``[n, in]`` and ``xq`` float32 ``[n, in/8]``
    (-1/4 of each 8-sum), both with the groups of 8 in ``[G, units]`` order, where a 16-byte code
    unit holds G = 16 / bits groups: the kernel's lane u reads group g of unit u at ``g * units + u``,
    so consecutive lanes read consecutive 16-byte pieces of x."""
    n, k_in = x2.shape
    g = 8 if bits == 2 else 4
    units = k_in // (8 * g)
    x4 = x2.astype(jnp.float32).reshape(n, units, g, 8)
    xq = (-0.25 * x4.sum(-1)).transpose(0, 2, 1).reshape(n, k_in // 8)
    xh = x4.astype(jnp.float16).transpose(0, 2, 1, 3).reshape(n, k_in)
    return xh, xq


def e8p_matvec(x: jax.Array, codes: jax.Array, abs_table: jax.Array, *, bits: int,
               resid_scale: float = 1.0, rows_per_warp: int = 0, warps: int = 0,
               units_per_step: int = 0, variant: int = 0, prefetch: int = 0, keep_parts: bool = False,
               tensor_cores: bool = True, su: jax.Array | None = None, register: bool = True) -> jax.Array:
    """``y[..., out] = x[..., in] @ Q.T`` (float32) for E8P (bits=2) or E8P-RVQ4 (bits=4) codes.

    codes: uint8 ``[out, in / 8, bits]`` (``jaxquant.formats.quip_sharp``); abs_table: uint32
    ``[256, 2]`` from ``e8p_abs_table``. x is used in float16 (its products accumulate in fp16 over
    at most 16 terms, then in float32). ``in`` must be a multiple of 64 (2-bit) or 32 (4-bit).
    Launch knobs at batch 1 (0: the measured default): ``rows_per_warp`` (1, 2, 4), ``warps`` per
    block (1-8; the x-stationary kernel up to 24, then at 2 rows per warp, one block per SM),
    ``units_per_step`` (1, 2: 16-byte code units each lane loads before decoding).
    ``variant=1`` (batch-1 calls only; others use the default): the x-stationary kernel, each warp
    holding one chunk of 32 code units' inputs in registers (made in the kernel from float32 x in
    natural order) and returning per-chunk partials, summed here; its ``prefetch`` (1, 2; 0: 1) is
    the number of row groups whose codes load while one decodes. ``variant=2``: the same on tensor
    cores (16-row tiles, ``rows_per_warp`` of them per warp: 1, 2; chunks of 8 code units).
    ``keep_parts`` returns the partials unsummed, ``[P, ..., out]`` (P = 1 for the other kernels), for
    ``hadamard(..., sum_parts=True)``.
    ``tensor_cores``: 2-16 rows take ``e8p_mma`` where it fits (False: the CUDA-core kernel).
    ``su`` (the x-stationary kernel only, see ``e8p_xs_rht_fits``): x is unrotated and the kernel
    applies ``jaxquant.hadamard.rht(x, su)`` itself, saving the Hadamard kernel before it.
    """
    if bits not in (2, 4):
        raise ValueError(f"e8p_matvec: bits must be 2 or 4, got {bits}")
    out, groups, nbytes = codes.shape
    if nbytes != bits or groups * 8 != x.shape[-1] or x.shape[-1] % (64 if bits == 2 else 32):
        raise ValueError(f"e8p_matvec: codes {codes.shape} do not fit x {x.shape} at {bits} bits")
    lead, k_in = x.shape[:-1], x.shape[-1]
    if su is not None and not (variant in (1, 2) and math.prod(lead) == 1 and e8p_xs_rht_fits(k_in, bits, variant)):
        raise ValueError(f"e8p_matvec: su (the in-kernel RHT) needs variant 1 or 2, one row of x and e8p_xs_rht_fits; "
                         f"got variant={variant}, x {x.shape}, {bits} bits")
    if su is not None and su.shape != (k_in,):
        raise ValueError(f"e8p_matvec: su must have shape ({k_in},), got {su.shape}")
    if register:
        build.load()
    if tensor_cores and 2 <= math.prod(lead) and e8p_mma_fits(math.prod(lead), k_in, bits):
        return e8p_mma(x, codes, abs_table, bits=bits, resid_scale=resid_scale, keep_parts=keep_parts,
                       register=register)
    x2 = x.reshape(-1, k_in).astype(jnp.float32)
    if x2.shape[0] == 0:
        return jnp.zeros((1, *lead, out) if keep_parts else (*lead, out), jnp.float32)
    table = jnp.asarray(abs_table, jnp.uint32).reshape(512)
    if variant in (1, 2) and x2.shape[0] == 1:
        chunks = _e8p_chunks(k_in, bits, variant)
        f = jax.ffi.ffi_call("jaxquant_e8p_matvec_xs", jax.ShapeDtypeStruct((chunks, out), jnp.float32),
                             vmap_method="sequential")
        signs = jnp.zeros((1,), jnp.float32) if su is None else su.astype(jnp.float32)
        part = f(x2.reshape(k_in), codes, table, signs, bits=np.int64(bits), resid_scale=np.float64(resid_scale),
                 rows_per_warp=np.int64(rows_per_warp), warps=np.int64(warps), prefetch=np.int64(prefetch),
                 rht=np.int64(su is not None), tensor_cores=np.int64(variant == 2))
        return part.reshape(chunks, *lead, out) if keep_parts else part.sum(0).reshape(*lead, out)
    xh, xq = e8p_x_layout(x2, bits)

    def one(idx):
        xb, qb = idx
        f = jax.ffi.ffi_call("jaxquant_e8p_matvec", jax.ShapeDtypeStruct((xb.shape[0], out), jnp.float32),
                             vmap_method="sequential")
        return f(xb, qb, codes, table, bits=np.int64(bits), resid_scale=np.float64(resid_scale),
                 rows_per_warp=np.int64(rows_per_warp), warps=np.int64(warps),
                 units_per_step=np.int64(units_per_step))

    n = x2.shape[0]
    parts = [one((xh[i:i + VQ_MAX_BATCH], xq[i:i + VQ_MAX_BATCH])) for i in range(0, n, VQ_MAX_BATCH)]
    y = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    return y.reshape(1, *lead, out) if keep_parts else y.reshape(*lead, out)


E8P_XS_RHT_MAX_IN = 8192  # every block of the kernel reads all of x for its chunk of the RHT


def e8p_xs_rht_fits(k_in: int, bits: int, variant: int = 1) -> bool:
    """Whether the batch-1 E8P kernel ``variant`` (1 x-stationary, 2 on tensor cores) can apply the
    RHT of x itself: ``k_in`` a power of two from one chunk (2048 inputs at 2 bits, 1024 at 4; a
    quarter of that for variant 2) to ``E8P_XS_RHT_MAX_IN``."""
    chunk_in = _E8P_CHUNK_UNITS[variant] * 128 // bits
    return bits in (2, 4) and k_in & (k_in - 1) == 0 and chunk_in <= k_in <= E8P_XS_RHT_MAX_IN


_E8P_CHUNK_UNITS = {1: 32, 2: 8}  # 16-byte code units per chunk of the batch-1 kernels (variant 1, 2)


def _e8p_chunks(k_in: int, bits: int, variant: int = 1) -> int:
    """Row chunks of the batch-1 E8P kernel ``variant`` (its partials' leading axis)."""
    return -(-(k_in * bits // 128) // _E8P_CHUNK_UNITS[variant])


def _multiprocessors() -> int:
    """SMs of the first GPU (an H100's 132 where none is visible, e.g. lowering on a CPU)."""
    try:
        return int(jax.devices("gpu")[0].core_count)
    except (RuntimeError, AttributeError, IndexError):
        return 132


def e8p_mma_fits(rows: int, k_in: int, bits: int) -> bool:
    """Whether ``e8p_mma`` takes ``rows`` rows of x against E8P (2) / RVQ4 (4) codes of ``k_in`` inputs."""
    return 1 <= rows <= 16 and k_in % (256 if bits == 2 else 128) == 0


def e8p_mma(x: jax.Array, codes: jax.Array, abs_table: jax.Array, *, bits: int, resid_scale: float = 1.0,
            splits: int = 0, tiles: int = 0, keep_parts: bool = False, register: bool = True) -> jax.Array:
    """``e8p_matvec`` for 1-16 rows of x on tensor cores (``mma.sync``, x in fp16, fp32 sums): what
    ``e8p_matvec`` runs for 2-16 rows where ``e8p_mma_fits``. ``splits``: programs along the input
    axis (0: as many as fill one wave of one block per SM); ``tiles``: 16-row tiles per warp (1, 2, 4; 0: by
    size). ``keep_parts``: the splits' partial sums ``[P, ..., out]`` unsummed."""
    if bits not in (2, 4):
        raise ValueError(f"e8p_mma: bits must be 2 or 4, got {bits}")
    out, groups, nbytes = codes.shape
    lead, k_in = x.shape[:-1], x.shape[-1]
    n = math.prod(lead)
    if nbytes != bits or groups * 8 != k_in or not e8p_mma_fits(n, k_in, bits):
        raise ValueError(f"e8p_mma: codes {codes.shape} and x {x.shape} do not fit 1-16 rows at {bits} bits "
                         f"(in a multiple of {256 if bits == 2 else 128})")
    if register:
        build.load()
    rows = 8 if n <= 8 else 16
    tiles = tiles or (4 if out * k_in >= 1 << 25 else 2)
    steps = k_in * bits // 512
    chunks = -(-out // (128 * tiles))  # row chunks of a block (8 warps)
    # one wave of one block per SM: at 70B shapes on an H100 a ragged second wave cost 1.3x
    # (28672 x 8192 E8P, batch 8: 2 splits 59.9 us, 5 splits 79.2; cuda_ffi/NOTES.md, session 11)
    splits = splits or max(1, min(steps, _multiprocessors() // chunks))
    xp = jnp.pad(x.reshape(n, k_in).astype(jnp.float16), ((0, rows - n), (0, 0)))
    table = jnp.asarray(abs_table, jnp.uint32).reshape(512)
    parts = jax.ffi.ffi_call("jaxquant_e8p_mma", jax.ShapeDtypeStruct((splits, rows, out), jnp.float32),
                             vmap_method="sequential")(xp, codes, table, bits=np.int64(bits),
                                                       resid_scale=np.float64(resid_scale), tiles=np.int64(tiles))
    parts = parts[:, :n].reshape(splits, *lead, out)
    return parts if keep_parts else parts.sum(0)


QTIP_CODES = {"hyb": 0, "1mad": 1, "3inst": 2}
MAD1_SCALE = float(np.float32(1.0 / 147.800537109375))


def qtip_matvec(x: jax.Array, codes: jax.Array, table: jax.Array | None, *, code: str, k: int, L: int = 16,
                ksplit: int = 0, warps: int = 0, register: bool = True) -> jax.Array:
    """``y[..., out] = x[..., in] @ Wc.T`` (float32) where ``Wc`` is the trellis code values of the
    16x16-tile streams ``codes`` (int32 ``[out/16, in/16, 8k]``, ``jaxquant.formats.qtip``).

    code: ``hyb`` (L=16, Q=9: ``table`` float16 ``[512, 2]``), ``1mad`` or ``3inst`` (no table);
    k: 2, 3 or 4 bits per weight. hyb and 3inst multiply in fp16 (x cast), 1mad in float32.
    """
    if code not in QTIP_CODES:
        raise ValueError(f"qtip_matvec: code must be one of {tuple(QTIP_CODES)}, got {code!r}")
    if k not in (2, 3, 4):
        raise ValueError(f"qtip_matvec: k must be 2, 3 or 4, got {k}")
    tr, tc, nw = codes.shape
    if nw != 8 * k or tc * 16 != x.shape[-1]:
        raise ValueError(f"qtip_matvec: codes {codes.shape} do not fit x {x.shape} at k={k}")
    if code == "hyb" and (L != 16 or table is None or table.size != 1024):
        raise ValueError("qtip_matvec: hyb needs L=16 and a [512, 2] table (Q=9)")
    if register:
        build.load()
    lead, k_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k_in).astype(jnp.float32)
    out = tr * 16
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, out), jnp.float32)
    if code == "hyb":
        tab = jax.lax.bitcast_convert_type(jnp.asarray(table, jnp.float16).reshape(512, 2), jnp.uint32)
        xk = x2.astype(jnp.float16)
    else:
        tab = jnp.zeros((1,), jnp.uint32)
        xk = jnp.repeat(x2.astype(jnp.float16), 2, axis=-1) if code == "3inst" else x2

    def one(xb):
        f = jax.ffi.ffi_call("jaxquant_qtip_matvec", jax.ShapeDtypeStruct((xb.shape[0], out), jnp.float32),
                             vmap_method="sequential")
        return f(xb, codes, tab, code=np.int64(QTIP_CODES[code]), kbits=np.int64(k), L=np.int64(L),
                 ksplit=np.int64(ksplit), warps=np.int64(warps))

    y = _split_batch(xk, one)
    if code == "1mad":  # the kernel returns sum x (1 + y/1024); value = (y - 510) * MAD1_SCALE
        y = MAD1_SCALE * (1024.0 * y - 1534.0 * x2.sum(-1, keepdims=True))
    return y.reshape(*lead, out)


VQ2_INDEX_BITS = (4, 6, 8)  # 2, 3 and 4 bits per weight at D = 2


def vq2_matvec(x: jax.Array, codes: jax.Array, codebooks: jax.Array, *, index_bits: int, group_rows: int,
               group_cols: int, warps: int = 0, register: bool = True) -> jax.Array:
    """``y[..., out] = x[..., in] @ W.T`` (float32) for GPTVQ with 2-D vectors (``formats.vq``).

    codes: int32 ``[out, words]`` (runs of 32 indices of ``index_bits`` bits, 4, 6 or 8);
    codebooks: float ``[out / group_rows, in / group_cols, 2^index_bits, 2]`` (rounded to fp16
    pairs here); ``group_cols`` a multiple of 64. Each row of x is one call of the batch-1 kernel:
    products in fp16 over 32 vectors, then float32.
    """
    if index_bits not in VQ2_INDEX_BITS:
        raise ValueError(f"vq2_matvec: index_bits must be one of {VQ2_INDEX_BITS}, got {index_bits}")
    if codebooks.ndim != 4 or codebooks.shape[2:] != (1 << index_bits, 2):
        raise ValueError(f"vq2_matvec: codebooks must be [tr, tc, {1 << index_bits}, 2], got {codebooks.shape}")
    if group_cols % 64:
        raise ValueError(f"vq2_matvec: group_cols must be a multiple of 64, got {group_cols}")
    if register:
        build.load()
    lead, k_in = x.shape[:-1], x.shape[-1]
    out = codes.shape[0]
    x2 = x.reshape(-1, k_in).astype(jnp.float32)
    table = jax.lax.bitcast_convert_type(codebooks.astype(jnp.float16), jnp.uint32)
    chunks = -(-k_in // 2048)
    f = jax.ffi.ffi_call("jaxquant_vq2_matvec", jax.ShapeDtypeStruct((chunks, out), jnp.float32),
                         vmap_method="sequential")
    rows = [f(x2[i], codes, table, index_bits=np.int64(index_bits), group_rows=np.int64(group_rows),
              group_cols=np.int64(group_cols), warps=np.int64(warps)).sum(0) for i in range(x2.shape[0])]
    y = jnp.stack(rows) if rows else jnp.zeros((0, out), jnp.float32)
    return y.reshape(*lead, out)


RHT_CLUSTER_MAX_A = 256
RHT_CLUSTER_ROW_WIDTHS = (32, 64, 128, 256, 512, 1024)  # B: the Sylvester factor a warp transforms


def rht_cluster_fits(factor: np.ndarray, n: int) -> bool:
    """Whether ``rht_cluster`` takes this A x A ``factor`` for width n: +-1 entries, A <= 256, n / A
    a power of two in [32, 1024]."""
    factor = np.asarray(factor)
    if factor.ndim != 2 or factor.shape[0] != factor.shape[1] or factor.shape[0] > RHT_CLUSTER_MAX_A:
        return False
    a = factor.shape[0]
    return n % a == 0 and n // a in RHT_CLUSTER_ROW_WIDTHS and bool(np.all(np.abs(factor) == 1))


def sign_bits(factor: np.ndarray) -> np.ndarray:
    """Sign bits of a +-1 A x A ``factor``, uint32 ``[A, ceil(A / 32)]``: row a, bit i set where
    factor[i, a] < 0 (output a of ``v @ factor``)."""
    a = factor.shape[0]
    neg = np.zeros((a, -(-a // 32) * 32), bool)
    neg[:, :a] = np.asarray(factor).T < 0
    return np.packbits(neg, axis=-1, bitorder="little").view("<u4")


def rht_cluster(x: jax.Array, factor: np.ndarray, signs: jax.Array, *, inverse: bool = False,
                sum_parts: bool = False, blocks: int = 0, groups: int = 0, register: bool = True) -> jax.Array:
    """The randomized Hadamard transform of float32 rows of width n = A * B with D = factor (x) H_B
    (Sylvester, B = n / A): ``(x * signs) @ D / sqrt(n)``, or with ``inverse`` ``(x @ D.T) * signs /
    sqrt(n)``, each row by one thread-block cluster (for a decode step's few rows). ``factor``: +-1,
    numpy, A <= 256, B a power of two in [32, 1024]. ``sum_parts``: x is ``[P, ..., n]``, transformed
    as ``x.sum(0)`` (the parts added as they load). ``blocks`` (cluster size, at most 16) and ``groups``
    (clusters per row, each taking B / groups columns) tune the launch; 0 = auto."""
    factor = np.asarray(factor)
    n = x.shape[-1]
    if x.dtype != jnp.float32:
        raise TypeError(f"rht_cluster: x must be float32, got {x.dtype}")
    if not rht_cluster_fits(factor, n):
        raise ValueError(f"rht_cluster: needs a +-1 A x A factor, A <= {RHT_CLUSTER_MAX_A}, with n / A one of "
                         f"{RHT_CLUSTER_ROW_WIDTHS}; got {factor.shape} for width {n}")
    if signs.shape != (n,):
        raise ValueError(f"rht_cluster: signs must have shape ({n},), got {signs.shape}")
    if sum_parts and x.ndim < 2:
        raise ValueError(f"rht_cluster: sum_parts needs x [P, ..., n], got {x.shape}")
    if register:
        build.load()
    shape = x.shape[1:] if sum_parts else x.shape
    f = jax.ffi.ffi_call("jaxquant_rht_cluster", jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")
    signs = signs.astype(jnp.float32)
    # forward: the signs go on x here, where XLA fuses them into x's producer
    return f(x if inverse else x * signs, jnp.asarray(sign_bits(factor.T if inverse else factor)), signs,
             parts=np.int64(x.shape[0] if sum_parts else 1), has_signs=np.int64(inverse),
             scale=np.float64(1 / math.sqrt(n)), blocks=np.int64(blocks), groups=np.int64(groups))



_E8P_LINEAR_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))  # read as they are


def _kernel_float(v: jax.Array) -> jax.Array:
    """v as it is where e8p_linear reads its dtype (no convert kernel), else float32."""
    return v if v.dtype in _E8P_LINEAR_FLOATS else v.astype(jnp.float32)


def _e8p_linear_check(name: str, k_in: int, codes: jax.Array, su: jax.Array, sv: jax.Array, bits: int,
                      in_factor, out_factor, variant: int = 1) -> int:
    """Raise on shapes ``e8p_linear`` / ``e8p_mlp`` cannot take; the output width."""
    if bits not in (2, 4):
        raise ValueError(f"{name}: bits must be 2 or 4, got {bits}")
    if variant not in _E8P_CHUNK_UNITS:
        raise ValueError(f"{name}: variant must be 1 (x-stationary) or 2 (tensor cores), got {variant}")
    out, groups, nbytes = codes.shape
    if nbytes != bits or groups * 8 != k_in:
        raise ValueError(f"{name}: codes [out, {k_in} / 8, {bits}] expected, got {codes.shape}")
    if su.shape != (k_in,) or sv.shape != (out,):
        raise ValueError(f"{name}: su [{k_in}] and sv [{out}] expected, got {su.shape} and {sv.shape}")
    if in_factor is None and not e8p_xs_rht_fits(k_in, bits, variant):
        raise ValueError(f"{name}: the E8P kernel cannot rotate {k_in} inputs at {bits} bits; pass in_factor")
    for label, factor, n in (("in_factor", in_factor, k_in), ("out_factor", out_factor, out)):
        if factor is not None and not rht_cluster_fits(factor, n):
            raise ValueError(f"{name}: {label} {np.shape(factor)} is not a cluster factor of width {n}")
    return out


def _scalar_scale(scale: jax.Array | None, n: int, name: str) -> jax.Array:
    """A row scale as the kernel reads it: float32 [n] (ones where None)."""
    if scale is None:
        return jnp.ones((n,), jnp.float32)
    if scale.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {scale.shape}")
    return scale.astype(jnp.float32)


def e8p_linear(x: jax.Array, codes: jax.Array, abs_table: jax.Array, su: jax.Array, sv: jax.Array,
               out_factor: np.ndarray, *, bits: int, resid_scale: float = 1.0, in_factor: np.ndarray | None = None,
               rows_per_warp: int = 0, warps: int = 0, prefetch: int = 0, norm_weight: jax.Array | None = None,
               norm_eps: float = 1e-6, residual: jax.Array | None = None, out_scale: jax.Array | None = None,
               part_rows: tuple[int, ...] = (), out_dtype=jnp.float32, variant: int = 1,
               register: bool = True) -> jax.Array:
    """QuIP#'s linear of one row in one FFI call: ``rht_inverse(rht(x, su) @ Q.T, sv)`` (float32,
    before the row scale), the three kernels each started programmatically dependent on the one
    before. x's RHT is made by the E8P kernel where ``e8p_xs_rht_fits`` (``in_factor`` None), else
    by ``rht_cluster`` with ``in_factor``; the output's by ``rht_cluster`` with ``out_factor`` (see
    ``rht_cluster`` for the factors). x: ``[..., in]`` with one row; codes and the launch knobs
    (``rows_per_warp``, ``warps``, ``prefetch``, ``variant`` 1 or 2) as ``e8p_matvec``'s batch-1 kernels'.
    ``norm_weight`` [in] (x's RHT in the E8P kernel only): x is the residual stream and the linear's
    input its RMSNorm, ``(x / rms(x, norm_eps)) * norm_weight``, made by the E8P kernel in float32
    (two XLA kernels fewer before it; the model's norm also rounds it to x's dtype).
    ``out_scale``: the row scale the last kernel applies as it stores, [1] or, with ``part_rows``
    (a fused linear's parts, at most 3, multiples of 4), one per part; the result then comes in
    ``out_dtype``. ``residual`` [..., out] (float32, fp16 or bf16): the result is
    ``residual + out_scale * y`` in residual's dtype."""
    lead, k_in = x.shape[:-1], x.shape[-1]
    if math.prod(lead) != 1:
        raise ValueError(f"e8p_linear: needs one row of x, got {x.shape}")
    out = _e8p_linear_check("e8p_linear", k_in, codes, su, sv, bits, in_factor, out_factor, variant)
    if norm_weight is not None and (in_factor is not None or norm_weight.shape != (k_in,)):
        raise ValueError(f"e8p_linear: norm_weight must be [{k_in}] with x's RHT in the E8P kernel (no in_factor); "
                         f"got {norm_weight.shape}")
    if residual is not None:
        _check_float(residual, "e8p_linear")
        if math.prod(residual.shape) != out:
            raise ValueError(f"e8p_linear: residual must have {out} elements, got {residual.shape}")
    splits = np.cumsum(part_rows)[:-1].tolist() if len(part_rows) > 1 else []
    if part_rows and (len(part_rows) > 3 or sum(part_rows) != out or any(r % 4 for r in part_rows)):
        raise ValueError(f"e8p_linear: part_rows must be 1 to 3 multiples of 4 adding up to {out}, got {part_rows}")
    out_scale = _scalar_scale(out_scale, 1 + len(splits), "out_scale")
    _check_float(jax.ShapeDtypeStruct((), out_dtype), "e8p_linear (out_dtype)")
    if register:
        build.load()
    su = su.astype(jnp.float32)
    x1 = x.reshape(k_in) if in_factor is None else x.reshape(k_in).astype(jnp.float32)
    x1 = _kernel_float(x1)  # the E8P kernel reads float32, fp16 or bf16 as it comes
    one_u32 = jnp.zeros((1, 1), jnp.uint32)
    y_dtype = out_dtype if residual is None else residual.dtype
    f = jax.ffi.ffi_call("jaxquant_e8p_linear", (jax.ShapeDtypeStruct((out,), y_dtype),
                                                 jax.ShapeDtypeStruct((_e8p_chunks(k_in, bits, variant), out),
                                                                      jnp.float32),
                                                 jax.ShapeDtypeStruct((k_in if in_factor is not None else 1,),
                                                                      jnp.float32)),
                         vmap_method="sequential")
    y, _, _ = f(x1 if in_factor is None else x1 * su, codes, jnp.asarray(abs_table, jnp.uint32).reshape(512), su,
                one_u32 if in_factor is None else jnp.asarray(sign_bits(in_factor)),
                jnp.asarray(sign_bits(np.asarray(out_factor).T)), sv.astype(jnp.float32),
                jnp.zeros((1,), jnp.float32) if norm_weight is None else _kernel_float(norm_weight),
                jnp.zeros((1,), jnp.float32) if residual is None else residual.reshape(out), out_scale,
                bits=np.int64(bits), resid_scale=np.float64(resid_scale), in_cluster=np.int64(in_factor is not None),
                rows_per_warp=np.int64(rows_per_warp), warps=np.int64(warps), prefetch=np.int64(prefetch),
                norm=np.int64(norm_weight is not None), norm_eps=np.float64(norm_eps),
                add_resid=np.int64(residual is not None), split0=np.int64((splits + [0])[0]),
                split1=np.int64((splits[1:] + [0])[0]), tensor_cores=np.int64(variant == 2))
    return y.reshape(*lead, out) if residual is None else y.reshape(residual.shape)


def e8p_mlp(x: jax.Array, norm_weight: jax.Array, abs_table: jax.Array, gate_up: dict, down: dict, *, bits: int,
            resid_scale: float = 1.0, norm_eps: float = 1e-6, rows_per_warp: int = 0, warps: int = 0,
            prefetch: int = 0, variant: int = 1, register: bool = True) -> jax.Array:
    """A Llama MLP block of one row in one FFI call (five kernels, each programmatically dependent
    on the one before): ``x + down(silu(gate) * up)`` with ``[gate, up] = gate_up(rms_norm(x))``,
    both QuIP# linears as ``e8p_linear`` computes them. ``gate_up`` and ``down``: dicts of ``codes``,
    ``su``, ``sv``, ``scale`` (the row scales: [2], gate's and up's, and [1]) and the cluster factors
    ``out_factor`` (and down's ``in_factor``). x [..., d] (one row; float32, fp16 or bf16) needs d a
    power of two whose RHT the E8P kernel makes; the result has x's shape and dtype. The down
    input's RHT reads gate and up in float32 (the model rounds them, and their product, to x's dtype)."""
    _check_float(x, "e8p_mlp")
    d = x.shape[-1]
    if math.prod(x.shape[:-1]) != 1:
        raise ValueError(f"e8p_mlp: needs one row of x, got {x.shape}")
    if norm_weight.shape != (d,):
        raise ValueError(f"e8p_mlp: norm_weight must be [{d}], got {norm_weight.shape}")
    f2 = _e8p_linear_check("e8p_mlp (gate_up)", d, gate_up["codes"], gate_up["su"], gate_up["sv"], bits, None,
                           gate_up["out_factor"], variant)
    f = f2 // 2
    if f2 % 2 or down["in_factor"] is None:
        raise ValueError(f"e8p_mlp: gate_up needs an even output width ({f2}) and down an in_factor")
    if _e8p_linear_check("e8p_mlp (down)", f, down["codes"], down["su"], down["sv"], bits, down["in_factor"],
                         down["out_factor"], variant) != d:
        raise ValueError(f"e8p_mlp: down must map {f} inputs back to {d}, got codes {down['codes'].shape}")
    if register:
        build.load()
    f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
    call = jax.ffi.ffi_call("jaxquant_e8p_mlp", (jax.ShapeDtypeStruct((d,), x.dtype),
                                                 jax.ShapeDtypeStruct((_e8p_chunks(d, bits, variant), f2), jnp.float32),
                                                 jax.ShapeDtypeStruct((f2,), jnp.float32),
                                                 jax.ShapeDtypeStruct((f,), jnp.float32),
                                                 jax.ShapeDtypeStruct((_e8p_chunks(f, bits, variant), d), jnp.float32)),
                            vmap_method="sequential")
    y = call(x.reshape(d), _kernel_float(norm_weight), jnp.asarray(abs_table, jnp.uint32).reshape(512),
             gate_up["codes"], f32(gate_up["su"]), f32(gate_up["sv"]),
             jnp.asarray(sign_bits(np.asarray(gate_up["out_factor"]).T)),
             _scalar_scale(gate_up["scale"], 2, "gate_up scale"),
             down["codes"], f32(down["su"]), f32(down["sv"]), jnp.asarray(sign_bits(down["in_factor"])),
             jnp.asarray(sign_bits(np.asarray(down["out_factor"]).T)), _scalar_scale(down["scale"], 1, "down scale"),
             bits=np.int64(bits), resid_scale=np.float64(resid_scale), norm_eps=np.float64(norm_eps),
             rows_per_warp=np.int64(rows_per_warp), warps=np.int64(warps), prefetch=np.int64(prefetch),
             tensor_cores=np.int64(variant == 2))[0]
    return y.reshape(x.shape)


ATTENTION_HEAD_DIMS = (64, 128)
ATTENTION_MAX_GROUP = 16  # query heads per kv head
ATTENTION_MAX_KEYS_PER_SPLIT = 32  # staged in shared memory, a lane per key in the softmax


def decode_attention_fits(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether ``decode_attention`` takes this head layout: head size 64 or 128, at most 16 query heads per kv head."""
    return (head_dim in ATTENTION_HEAD_DIMS and kv_heads > 0 and heads % kv_heads == 0
            and heads // kv_heads <= ATTENTION_MAX_GROUP)


def decode_attention_splits(batch: int, kv_heads: int, cache_len: int) -> int:
    """Key splits per (sequence, kv head): at least two blocks per SM, at most 32 keys per split."""
    fill = -(-2 * _multiprocessors() // (batch * kv_heads))
    return max(-(-cache_len // ATTENTION_MAX_KEYS_PER_SPLIT), min(fill, cache_len), 1)


def decode_attention(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos: jax.Array,
                     inv_freq: jax.Array, *, heads: int, kv_heads: int, scale: float | None = None,
                     register: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of one new token per sequence over its KV cache, RoPE (rotate-half) included.

    ``qkv [B, (heads + 2 kv_heads) * D]``: the new token's q, k and v heads side by side, unrotated;
    caches ``[B, S, kv_heads, D]``; ``pos`` an int32 scalar, the new token's position. Writes the
    rotated k and v into the caches at ``pos`` (clamped to S - 1, as ``dynamic_update_slice``) and
    attends to keys ``[0, pos]``; returns ``(out [B, heads * D] in qkv's dtype, k_cache, v_cache)``,
    the caches updated in place (donate them). D must be 64 or 128, at most 16 query heads per kv head.
    """
    _check_float(qkv, "decode_attention")
    _check_float(k_cache, "decode_attention")
    if k_cache.ndim != 4 or v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"decode_attention: caches must be two equal [B, S, KVH, D] arrays, got "
                         f"{k_cache.shape} {k_cache.dtype} and {v_cache.shape} {v_cache.dtype}")
    batch, cache_len, kvh, d = k_cache.shape
    if d not in ATTENTION_HEAD_DIMS:
        raise ValueError(f"decode_attention: head size {d} is not one of {ATTENTION_HEAD_DIMS}")
    if kvh != kv_heads or not decode_attention_fits(heads, kv_heads, d):
        raise ValueError(f"decode_attention: {heads} query heads over {kv_heads} kv heads (cache has {kvh}) "
                         f"is not supported (at most {ATTENTION_MAX_GROUP} per kv head)")
    if qkv.shape != (batch, (heads + 2 * kv_heads) * d):
        raise ValueError(f"decode_attention: qkv must be {(batch, (heads + 2 * kv_heads) * d)}, got {qkv.shape}")
    if inv_freq.shape != (d // 2,):
        raise ValueError(f"decode_attention: inv_freq must be ({d // 2},), got {inv_freq.shape}")
    if register:
        build.load()
    splits = decode_attention_splits(batch, kv_heads, cache_len)
    f = jax.ffi.ffi_call("jaxquant_decode_attention",
                         (jax.ShapeDtypeStruct((batch, heads * d), qkv.dtype),
                          jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                          jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
                          jax.ShapeDtypeStruct((batch, heads, splits, d), jnp.float32),
                          jax.ShapeDtypeStruct((batch, heads, splits, 2), jnp.float32)),
                         input_output_aliases={1: 1, 2: 2})
    out, k_cache, v_cache, _, _ = f(qkv, k_cache, v_cache, jnp.asarray(pos, jnp.int32).reshape(()),
                                    inv_freq.astype(jnp.float32), heads=np.int64(heads),
                                    kv_heads=np.int64(kv_heads), splits=np.int64(splits),
                                    scale=np.float64(scale if scale is not None else 1.0 / math.sqrt(d)))
    return out, k_cache, v_cache
