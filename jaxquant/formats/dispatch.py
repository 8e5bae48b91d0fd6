"""Which implementation computes a quantized ``x @ W.T``: ``reference``, ``pallas`` or ``cuda``.

- ``reference``: ``dequantize`` then an XLA matmul; every format, shape and device.
- ``pallas``: the Pallas kernel (``pallas_kernels``), Triton lowering on a GPU; on other backends it
  runs in interpret mode (slow; for tests). Scalar weights with 2-16 rows of 16-bit x take its
  tensor-core decode-matmul (``pallas_tensor_cores``), as do E8P / RVQ4. ``auto`` picks it for a
  codebook format only where the tuning table measured it fastest (QTIP, GPTVQ: never measured).
- ``cuda``: the CUDA FFI kernel (``cuda_ffi``), built with nvcc on first use; GPU only. GPTVQ's
  (2-D vectors) is explicit only, like its Pallas one, until timed.
- ``auto``: the reference on CPU and for more than ``MAX_KERNEL_BATCH`` rows of x (a GEMM beats a
  matvec kernel there); on a GPU the backend measured fastest for the format, bits and batch
  (``formats.tuning``, a table stored with the package), falling back to the other kernel, then to
  the reference, when one cannot serve the weight or is unavailable.

The choice is made at trace time (shapes and the default backend are static).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats import tuning

BACKENDS = ("auto", "reference", "pallas", "cuda")
MAX_KERNEL_BATCH = 16
# the scalar half2 decode's smallest weight matrix (11008x4096 and larger measured faster on an H100)
HALF2_MIN_WEIGHTS = 32 * 1024 * 1024
KERNEL_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)

def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _batch_rows(x: jax.Array) -> int:
    return math.prod(x.shape[:-1])


def scalar_kernel_issue(qw: Any, x: jax.Array, backend: str) -> str | None:
    """Why ``backend``'s kernel cannot compute ``x @ qw.T`` (None when it can)."""
    if qw.axis != 1:
        return "groups along the output axis (axis=0) have no kernel"
    if qw.group_size % 32:
        return f"group size {qw.group_size} is not a multiple of 32"
    bits = (2, 3, 4, 8) if backend == "cuda" else (2, 4, 8)
    if qw.bits not in bits:
        return f"{qw.bits}-bit codes have no {backend} kernel (supported: {bits})"
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in KERNEL_DTYPES]:
        return f"x dtype {x.dtype} is not float32, float16 or bfloat16"
    if x.shape[-1] != qw.shape[1]:
        return f"x has {x.shape[-1]} inputs, the weight {qw.shape[1]}"
    return None


def _cuda_ready() -> bool:
    import cuda_ffi

    return cuda_ffi.available()


def choose_scalar(qw: Any, x: jax.Array, backend: str = "auto") -> str:
    """The backend that ``scalar_matmul`` will use; raises if an explicit one cannot serve."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    if backend != "auto":
        issue = scalar_kernel_issue(qw, x, backend)
        if issue:
            raise ValueError(f"scalar format, backend {backend!r}: {issue}")
        return backend
    if not on_gpu() or _batch_rows(x) > MAX_KERNEL_BATCH or _batch_rows(x) == 0:
        return "reference"
    first = tuning.preferred("scalar", qw.bits, _batch_rows(x)) or "cuda"
    if first == "reference":
        return first
    for candidate in (first, "pallas" if first == "cuda" else "cuda"):
        if scalar_kernel_issue(qw, x, candidate):
            continue
        if candidate == "cuda" and not _cuda_ready():
            continue
        return candidate
    return "reference"


def reference_matmul(qw: Any, x: jax.Array) -> jax.Array:
    return x @ qw.dequantize(x.dtype).T


def scalar_matmul(qw: Any, x: jax.Array, backend: str = "auto") -> jax.Array:
    """``x @ W.T`` for a ``ScalarQuantized`` weight through the chosen backend."""
    choice = choose_scalar(qw, x, backend)
    if choice == "reference":
        return reference_matmul(qw, x)
    if choice == "cuda":
        import cuda_ffi

        if not on_gpu():
            raise cuda_ffi.CudaFFIUnavailable("backend 'cuda' needs a GPU; use 'reference' or 'auto' here")
        if cuda_tensor_cores(qw, x):
            return cuda_ffi.scalar_mma(x, qw.codes, qw.scale, qw.zero, group_size=qw.group_size, bits=qw.bits)
        # variant 1, the half2 decode (2 and 4 bits, batch 1): on an H100 1.03-1.41x faster at 2 bits
        # (relative error 5e-3 against 1.7e-3), 1.09-1.48x at 4 bits (2.8e-3 against 1.7e-3), below
        # bf16's rounding but not fp16's; other cases ignore it. Below HALF2_MIN_WEIGHTS it is not
        # faster (4096x4096 at 4 bits: 0.64x in session 8's run, 20-35% of copy against the fp32
        # decode's 35% in session 9's), so the more accurate fp32 decode takes those.
        out_features, in_features = qw.shape
        half2 = int(jnp.dtype(x.dtype) == jnp.bfloat16 and out_features * in_features >= HALF2_MIN_WEIGHTS)
        return cuda_ffi.scalar_matvec(x, qw.codes, qw.scale, qw.zero, bits=qw.bits, group_size=qw.group_size,
                                      variant=half2)
    import pallas_kernels

    kernel = pallas_kernels.scalar_matmul if pallas_tensor_cores(qw, x) else pallas_kernels.scalar_matvec
    return kernel(x, qw.codes, qw.scale, qw.zero, bits=qw.bits, group_size=qw.group_size, interpret=not on_gpu())


def cuda_tensor_cores(qw: Any, x: jax.Array) -> bool:
    """Whether the CUDA backend takes its tensor-core decode-matmul (``cuda_ffi.scalar_mma``: 2- or 4-bit
    codes, 2 to 16 rows of 16-bit x, groups of a multiple of 128, whole 128-input steps). On an H100
    it reads 55-60% of copy bandwidth at 70B shapes for 2-16 rows at 4 bits and 29-41% at 2 bits (2.3-2.9x
    fp16, the Pallas kernel 13%), where the CUDA-core kernel's time grows with the rows; one row stays on
    the half2 decode (at 4 bits 81-82% against 58-60%)."""
    kpad = qw.codes.shape[1] * 32 // qw.bits if qw.bits in (2, 4) else 0  # inputs the codes hold
    return (kpad > 0 and 2 <= _batch_rows(x) <= MAX_KERNEL_BATCH and jnp.dtype(x.dtype) != jnp.float32
            and qw.group_size % 128 == 0 and kpad % qw.group_size == 0)


def pallas_tensor_cores(qw: Any, x: jax.Array) -> bool:
    """Whether the Pallas backend takes its tensor-core decode-matmul (2 to 16 rows of 16-bit x, tiles
    of at least 16 x 16) rather than the decode-matvec, which does one FMA per weight and row."""
    import pallas_kernels

    if not 2 <= _batch_rows(x) <= MAX_KERNEL_BATCH or jnp.dtype(x.dtype) == jnp.float32:
        return False
    try:
        pallas_kernels.plan_tc(qw.shape[0], qw.codes.shape[1], qw.bits, qw.group_size)
    except ValueError:
        return False
    return True


def vq_choice(fmt: str, issue: str | None, x: jax.Array, backend: str = "auto", *, tuned: str | None = None,
              bits: int = 0, pallas_issue: str | None = "no Pallas kernel measured for this format") -> str:
    """``reference``, ``cuda`` or ``pallas`` for a codebook format (E8P, QTIP).

    ``issue`` says why the kernel of ``backend`` (the CUDA one for ``auto``) cannot serve this
    weight (None when it can). An explicit ``cuda`` or ``pallas`` raises on an issue (``cuda``
    also off the GPU; ``pallas`` runs in interpret mode there); ``auto`` takes the CUDA kernel on
    a GPU for 1 to ``MAX_KERNEL_BATCH`` rows of x when it serves and builds and the tuning table
    (entry ``tuned``/``bits``) does not measure the reference faster, else the reference; it picks
    ``pallas`` only where the table measured it fastest and ``pallas_issue`` (why the Pallas kernel
    cannot serve; by default every format is unmeasured) is None.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in KERNEL_DTYPES]:
        issue = issue or f"x dtype {x.dtype} is not float32, float16 or bfloat16"
        pallas_issue = issue
    if backend == "pallas":
        if issue:
            raise ValueError(f"{fmt} format, backend 'pallas': {issue}")
        return "pallas"
    if backend == "cuda":
        if issue:
            raise ValueError(f"{fmt} format, backend 'cuda': {issue}")
        import cuda_ffi

        if not on_gpu():
            raise cuda_ffi.CudaFFIUnavailable("backend 'cuda' needs a GPU; use 'reference' or 'auto' here")
        return "cuda"
    if not on_gpu() or not 0 < _batch_rows(x) <= MAX_KERNEL_BATCH:
        return "reference"
    preferred = tuning.preferred(tuned, bits, _batch_rows(x)) if tuned else None
    if preferred == "pallas" and pallas_issue is None:
        return "pallas"
    if issue or not _cuda_ready() or preferred == "reference":
        return "reference"
    return "cuda"


# The fused K * 2^p kernel transforms a row in one block (one SM), so a decode batch leaves most
# SMs idle: on an H100 (results/bench_kernels_h100_session8.json) one row of 28672 takes 15.5 us
# against 8.4 for the 2^p kernel (K blocks) plus the einsum, 16 rows 13.3 against 9.6; from 32
# rows it ties or wins (64 rows: 11.0 against 29.6 us; 1170 rows: 86 against 488 us).
HADAMARD_K_MIN_ROWS = 32


# Up to this many rows (a decode step) a K * 2^p transform is one CUDA kernel on a thread-block cluster
# per row (``cuda_ffi.rht_cluster``): the 2^p kernel alone runs a row on one SM, and a K factor adds a
# pad, a split-K GEMM and a sum of the splits.
RHT_CLUSTER_MAX_ROWS = 8
# The cluster transform's split n = A * B (B = 2^q): its warps transform rows of B (loads, registers,
# shuffles), then each block applies the dense A x A rest to its columns, A additions per element.
# B is the widest power of two up to 2^RHT_CLUSTER_LOG_B that leaves at least RHT_CLUSTER_MIN_A rows
# (rows for the warps to share). On an H100 (session 20) this rule against B = 2^min(p, 7): the 70B
# one-call linear 28672x8192 38.9-39.6 us against 44.3 (A = 56 against 224), 8192x28672 40.1-40.8
# against 41.0-41.2; the 7B decode step equal (245 us of device time per 2 layers).
RHT_CLUSTER_LOG_B = 10
RHT_CLUSTER_MIN_A = 48


@functools.lru_cache(maxsize=None)
def cluster_factor(n: int, seed: int = 0) -> np.ndarray | None:
    """The dense +-1 factor D of width n's transform A_n = D (x) H_B that ``cuda_ffi.rht_cluster`` takes
    (B = 2^q, D = H_K (x) H_{2^p / B}; q by ``RHT_CLUSTER_LOG_B`` and ``RHT_CLUSTER_MIN_A``), or None
    where it takes none."""
    import cuda_ffi
    from jaxquant import hadamard

    k, p = hadamard.hadamard_factors(n)
    q = min(p, RHT_CLUSTER_LOG_B)
    while q > 5 and n >> q < RHT_CLUSTER_MIN_A:
        q -= 1
    d = hadamard.hadamard_factor(k, seed=seed)
    if p > q:
        d = np.kron(d, hadamard.hadamard_matrix(2 ** (p - q)))
    return d if cuda_ffi.ops.rht_cluster_fits(d, n) else None


# A batch-1 QuIP# linear as one FFI call (``cuda_ffi.e8p_linear``: its transforms and the E8P kernel
# launched programmatically dependent) where ``e8p_linear_factors`` allows; False: three calls.
E8P_LINEAR_ONE_CALL = True
# And with x's RHT in its E8P kernel, that kernel also makes the RMSNorm before the linear
# (``QuantizedWeight.normed_matmul``; two XLA kernels fewer per norm, ~2 us per 7B layer net on an H100).
E8P_LINEAR_NORM = True
# A one-call linear followed by a residual add stores residual + y itself (``QuantizedWeight.matmul_add``:
# an o-proj's add kernel fewer per layer).
E8P_ADD_RESIDUAL = True
# A Llama MLP block of QuIP# weights (norm, fused gate/up, SwiGLU, down, residual) as one FFI call
# (``QuantizedWeight.swiglu_block``, ``cuda_ffi.e8p_mlp``): five kernels in one chain, no XLA kernel between.
E8P_MLP_ONE_CALL = True
# Its E8P kernel's launch (``cuda_ffi.e8p_linear``'s rows_per_warp, warps, prefetch; 0: the defaults).
E8P_LINEAR_LAUNCH = (0, 0, 0)
# The batch-1 E8P / RVQ4 kernel of every QuIP# linear on CUDA (``cuda_ffi.e8p_matvec``'s variant):
# 1 x-stationary (HFMA2), 2 the same decode on tensor cores.
E8P_BATCH1_VARIANT = 1


def e8p_linear_factors(k_in: int, out: int, bits: int, seed: int = 0):
    """The ``(in_factor, out_factor)`` with which ``cuda_ffi.e8p_linear`` does a ``k_in -> out``
    QuIP# linear (``in_factor`` None: the E8P kernel rotates x itself), or None where it cannot."""
    import cuda_ffi

    out_factor = cluster_factor(out, seed)
    if out_factor is None:
        return None
    if cuda_ffi.e8p_xs_rht_fits(k_in, bits, E8P_BATCH1_VARIANT):
        return None, out_factor
    in_factor = cluster_factor(k_in, seed)
    return None if in_factor is None else (in_factor, out_factor)


def rht_fast(x: jax.Array, signs: jax.Array, *, seed: int = 0, inverse: bool = False,
             kernel: str = "cuda", sum_parts: bool = False) -> jax.Array:
    """``hadamard.rht`` (or ``rht_inverse``) of float32 ``x`` with its power-of-two factor through
    the CUDA Walsh-Hadamard kernel (GPU only) or, with ``kernel="pallas"``, the Pallas one
    (interpret mode off the GPU); the K x K factor of n = K * 2^p is an XLA einsum, except where
    one CUDA kernel does both (``cuda_ffi.hadamard_k``: K = 12, 20, 28 and 2^p in [64, 1024]) for
    at least ``HADAMARD_K_MIN_ROWS`` rows; up to ``RHT_CLUSTER_MAX_ROWS`` rows (+-1 factors) one
    cluster kernel does the whole transform (``cuda_ffi.rht_cluster``).
    ``sum_parts``: x is ``[P, ..., n]`` (a matvec's partial sums), transformed as ``x.sum(0)``; the
    CUDA kernels add the parts as they load them."""
    from jaxquant import hadamard

    n = x.shape[-1]
    k, p = hadamard.hadamard_factors(n)
    s = signs.astype(jnp.float32)
    cuda_adds_parts = kernel != "pallas" and 1 <= p and 2**p <= 32768
    if sum_parts and not cuda_adds_parts:
        x, sum_parts = x.sum(0), False
    if kernel == "pallas":
        import pallas_kernels

        fwht = functools.partial(pallas_kernels.hadamard, interpret=not on_gpu())
    else:
        import cuda_ffi

        rows = math.prod(x.shape[1 if sum_parts else 0:-1])
        if rows <= RHT_CLUSTER_MAX_ROWS and (d := cluster_factor(n, seed)) is not None:
            return cuda_ffi.rht_cluster(x, d, s, inverse=inverse, sum_parts=sum_parts)
        if cuda_ffi.hadamard_k_factor(n) and rows >= HADAMARD_K_MIN_ROWS:  # K = 12, 20, 28: one kernel
            return cuda_ffi.hadamard_k(x, s, inverse=inverse, sum_parts=sum_parts)
        fwht = functools.partial(cuda_ffi.hadamard, sum_parts=sum_parts)
    if p < 1 or 2**p > 32768:
        return (hadamard.rht_inverse if inverse else hadamard.rht)(x, s, seed=seed)
    if k == 1:
        return fwht(x, s, signs_after=inverse)
    y = fwht((x if inverse else x * s).reshape(*x.shape[:-1], k, 2**p))  # / sqrt(2^p)
    hk = jnp.asarray(hadamard.hadamard_factor(k, seed=seed) / math.sqrt(k), jnp.float32)
    y = jnp.einsum("...ij,ki->...kj" if inverse else "...ij,ik->...kj", y, hk,
                   precision=jax.lax.Precision.HIGHEST).reshape(y.shape[:-2] + (n,))
    return y * s if inverse else y
