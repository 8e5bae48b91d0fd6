"""The error-feedback core shared by GPTQ, GPTVQ, QuIP# (BlockLDLQ) and QTIP (tiled LDLQ).

With ``H⁻¹ = Uᵀ U`` (``U`` upper triangular) the proxy loss of an error ``E = W − Ŵ`` is
``tr(E H Eᵀ) = ‖E U⁻¹‖²``. Quantizing the input columns left to right in blocks ``B`` and
feeding each block's error forward, ``W_F −= (X_B − Q_B) U_BB⁻¹ U_BF`` for the later columns
``F``, makes that loss exactly ``Σ_B ‖(X_B − Q_B) U_BB⁻¹‖²`` (GPTQ, Frantar et al. 2023, eq. 3-5
for blocks of one column; QuIP# BlockLDLQ, Tseng et al. 2024, §4.1 for blocks of g). The matrix
``F = blockdiag(U_BB)⁻¹ U`` is the transposed unit block-triangular factor of the block LDL
decomposition of ``H⁻¹``; we precompute it once, so a step is one small GEMM.

Updates are lazy (GPTQ §4 "lazy batch updates"): inside a batch of ``lazy_batch`` columns only
that batch is updated per block; the rest of the matrix gets one GEMM per batch.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


@jax.jit
def _prepare(H, damp, dead_threshold):
    H = H.astype(jnp.float32)
    H = 0.5 * (H + H.T)
    dead = jnp.diagonal(H) <= dead_threshold
    live = ~dead
    H = jnp.where(live[:, None] & live[None, :], H, 0.0) + jnp.diag(dead.astype(jnp.float32))
    H = H + damp * jnp.mean(jnp.diagonal(H)) * jnp.eye(H.shape[0], dtype=jnp.float32)
    return H, dead


def prepare_hessian(H, *, damp: float = 0.01, dead_threshold: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Returns (H_damped fp32 SPD, dead mask [in] bool).

    Dead inputs (``H_ii <= dead_threshold``, e.g. an input that was always zero) get their row
    and column replaced by the unit vector (``H_ii = 1``); callers zero those weight columns.
    Damping adds ``damp · mean(diag H) · I`` (mean taken after the dead-input fix).
    """
    H = jnp.asarray(H)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"Hessian must be square [in, in], got shape {tuple(H.shape)}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp!r}")
    return _prepare(H, jnp.float32(damp), jnp.float32(dead_threshold))


@jax.jit
def _inverse_cholesky_upper(H, extra):
    # Cholesky of the reversed matrix P H P = L Lᵀ gives H⁻¹ = (P L⁻¹ P)ᵀ (P L⁻¹ P) with
    # P L⁻¹ P upper triangular: the upper Cholesky factor of H⁻¹ without ever forming H⁻¹.
    n = H.shape[0]
    eye = jnp.eye(n, dtype=jnp.float32)
    H = H.astype(jnp.float32) + extra * jnp.mean(jnp.diagonal(H)) * eye
    L = jnp.linalg.cholesky(H[::-1, ::-1])
    L_inv = solve_triangular(L, eye, lower=True)
    return L_inv[::-1, ::-1]


def inverse_cholesky_upper(H, *, damp: float = 0.01, max_tries: int = 6) -> jax.Array:
    """U with ``H⁻¹ = Uᵀ U`` (upper triangular, positive diagonal), fp32.

    ``H`` is normally ``prepare_hessian``'s output (already damped by ``damp``) and is tried as
    given. If the factorization fails (NaN/Inf), attempt ``t`` adds ``(10^t − 1) · damp ·
    mean(diag H) · I`` (total damping ×10 per retry, host-side loop) and warns; after
    ``max_tries`` attempts it raises ``FloatingPointError``. Call it outside ``jit``.
    """
    H = jnp.asarray(H, jnp.float32)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"Hessian must be square [in, in], got shape {tuple(H.shape)}")
    try:
        finite = bool(jnp.isfinite(H).all())
    except jax.errors.ConcretizationTypeError:
        raise TypeError("inverse_cholesky_upper retries on the host: call it outside jit") from None
    if not finite:
        raise ValueError("Hessian contains NaN or Inf")
    base = damp if damp > 0 else 0.01
    for t in range(max_tries):
        extra = 0.0 if t == 0 else (10.0**t - 1.0) * base
        U = _inverse_cholesky_upper(H, jnp.float32(extra))
        if bool(jnp.isfinite(U).all()):
            if t:
                warnings.warn(f"Hessian not positive definite: Cholesky succeeded after raising "
                              f"the damping by {extra:g}·mean(diag H)", RuntimeWarning, stacklevel=2)
            return U
    raise FloatingPointError(
        f"Cholesky of the Hessian failed {max_tries} times, up to extra damping "
        f"{(10.0 ** (max_tries - 1) - 1) * base:g}·mean(diag H); the Hessian is not usable "
        f"(check the calibration data, or raise damp / max_tries)")


def block_diagonal(U: jax.Array, block_size: int) -> jax.Array:
    """The diagonal blocks ``U_BB`` as ``[n / block_size, block_size, block_size]``."""
    n = U.shape[0]
    nb = n // block_size
    blocks = U.reshape(nb, block_size, nb, block_size)
    idx = jnp.arange(nb)
    return blocks[idx, :, idx, :]


def block_metric_factor(U: jax.Array, block_size: int, *, diagonal: bool = False) -> jax.Array:
    """``A_B = U_BB⁻¹`` per block, ``[n / b, b, b]``: the loss of a block's error ``e`` (its
    contribution to ``tr(E H Eᵀ)`` after feedback) is ``‖e A_B‖²``. ``diagonal=True`` keeps
    only ``1 / diag(U_BB)`` (GPTQ's per-column weights, what GPTVQ upstream uses)."""
    Ubb = block_diagonal(U, block_size)
    if diagonal:
        return jax.vmap(jnp.diag)(1.0 / jnp.diagonal(Ubb, axis1=1, axis2=2))
    eye = jnp.broadcast_to(jnp.eye(block_size, dtype=U.dtype), Ubb.shape)
    return solve_triangular(Ubb, eye, lower=False)


def feedback_matrix(U: jax.Array, block_size: int, *, diagonal: bool = False) -> jax.Array:
    """``F = blockdiag(U_BB)⁻¹ U`` with its diagonal blocks zeroed (strictly block-upper)."""
    n = U.shape[0]
    nb = n // block_size
    A = block_metric_factor(U, block_size, diagonal=diagonal)
    F = jnp.einsum("kij,kjn->kin", A, U.reshape(nb, block_size, n), precision=HIGHEST)
    blk = jnp.arange(n) // block_size
    return jnp.where(blk[None, :] > blk[:, None], F.reshape(n, n), 0.0)


def ldlq(W: jax.Array, U: jax.Array, quantize_block: Callable, *, block_size: int,
         lazy_batch: int = 128, batch_setup: Callable | None = None,
         diagonal_feedback: bool = False) -> tuple[jax.Array, Any]:
    """Error-feedback quantization (GPTQ/LDLQ form); jit-friendly, meant to be called inside jit.

    ``W [out, in]`` fp32; ``U`` from ``inverse_cholesky_upper``. Columns are processed in blocks
    of ``block_size``; ``quantize_block(x [out, block_size], k) -> (q [out, block_size]
    dequantized, aux pytree)`` with ``k`` the traced block index. Feedback is exact for a jointly
    quantized block, ``W_F −= (X_B − Q_B) U_BB⁻¹ U_BF``, applied inside a lazy batch of
    ``lazy_batch`` columns (rounded down to a multiple of ``block_size``) and by one GEMM for the
    rest. Returns ``(W_hat [out, in], aux stacked over blocks along a new leading axis)``.

    When ``in`` is not a multiple of the lazy batch, zero columns are appended internally; their
    blocks (``k >= in / block_size``) are still passed to ``quantize_block`` (with ``x = 0``)
    but their results are discarded and they feed nothing back.

    Optional:
      batch_setup(W_batch [out, lazy_batch], j) -> ctx: called at the start of lazy batch ``j``
        with that batch's columns after all earlier feedback (e.g. GPTQ's per-group grid or
        GPTVQ's codebook init when the batch is a group). Then ``quantize_block(x, k, ctx)`` is
        called instead, and the returned aux is ``(ctx stacked over batches, block aux)``.
      diagonal_feedback: use ``diag(U_BB)⁻¹`` instead of ``U_BB⁻¹`` (upstream GPTVQ's
        approximation; identical for ``block_size=1``).
    """
    out, n = W.shape
    b = int(block_size)
    if b < 1 or n % b:
        raise ValueError(f"block size {block_size} does not divide the input width {n}")
    if U.shape != (n, n):
        raise ValueError(f"U has shape {tuple(U.shape)}, expected ({n}, {n})")
    lb = max(b, (int(lazy_batch) // b) * b)
    lb = min(lb, n)
    pad = -n % lb
    n_p = n + pad
    nbatch, per_batch = n_p // lb, lb // b

    F = feedback_matrix(U.astype(jnp.float32), b, diagonal=diagonal_feedback)
    F = jnp.pad(F, ((0, pad), (0, pad)))
    W = jnp.pad(W.astype(jnp.float32), ((0, 0), (0, pad)))
    cols = jnp.arange(n_p)

    def batch_step(W, j):
        start = j * lb
        Wb = jax.lax.dynamic_slice(W, (0, start), (out, lb))
        Fbb = jax.lax.dynamic_slice(F, (start, start), (lb, lb))
        ctx = batch_setup(Wb, j) if batch_setup is not None else None

        def block_step(Wb, i):
            x = jax.lax.dynamic_slice(Wb, (0, i * b), (out, b))
            k = j * per_batch + i
            q, aux = quantize_block(x, k) if batch_setup is None else quantize_block(x, k, ctx)
            q = q.astype(jnp.float32)
            # Columns up to this block's end are zero in its rows of F: only later ones move.
            Wb = Wb - _mm(x - q, jax.lax.dynamic_slice(Fbb, (i * b, 0), (b, lb)))
            return Wb, (q, aux)

        Wb, (Qb, aux) = jax.lax.scan(block_step, Wb, jnp.arange(per_batch))
        Qb = jnp.moveaxis(Qb, 0, 1).reshape(out, lb)
        err = Wb - Qb  # each block's columns still hold their value at quantization time
        Fr = jax.lax.dynamic_slice(F, (start, 0), (lb, n_p))
        W = W - jnp.where(cols[None, :] >= start + lb, _mm(err, Fr), 0.0)
        return W, (Qb, aux, ctx)

    _, (Q, aux, ctx) = jax.lax.scan(batch_step, W, jnp.arange(nbatch))
    W_hat = jnp.moveaxis(Q, 0, 1).reshape(out, n_p)[:, :n]
    nblocks = n // b
    aux = jax.tree.map(lambda a: a.reshape(nbatch * per_batch, *a.shape[2:])[:nblocks], aux)
    if batch_setup is not None:
        return W_hat, (ctx, aux)
    return W_hat, aux


def proxy_loss_jnp(W: jax.Array, W_hat: jax.Array, H: jax.Array) -> jax.Array:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` as a traced fp32 scalar (for use inside jit / grad)."""
    E = (W - W_hat).astype(jnp.float32)
    return jnp.sum(_mm(E, H.astype(jnp.float32)) * E)


def proxy_loss(W, W_hat, H) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)``, the layer's output error on the calibration inputs."""
    return float(proxy_loss_jnp(jnp.asarray(W), jnp.asarray(W_hat), jnp.asarray(H)))
