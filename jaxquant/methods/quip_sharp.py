"""QuIP# (Tseng et al. 2024): RHT incoherence, E8 lattice codebooks, BlockLDLQ.

Per layer (W ``[m, n]``, H ``[n, n]``), Algorithm 1 of the paper without fine-tuning:
1. seeded sign vectors SU (n), SV (m); ``Wr = A_mᵀ SV W SU A_n``, ``Hr = A_nᵀ SU H SU A_n``;
2. ``X = Wr / Wscale`` with ``Wscale = rms(Wr) / ρ``;
3. BlockLDLQ with blocks of 8 inputs and the E8P / RVQ codebook as the block quantizer
   (``methods/ldlq.py``: feedback through the block LDL factor of Hr);
4. ``tune_iters`` passes of exact block coordinate descent on ``tr((X−Q) Hr (X−Q)ᵀ)``: each
   block is re-quantized at its unconstrained optimum given all the others,
   ``Q_k + R_k Hr_kk⁻¹`` with ``R = (X−Q) Hr``, and a row keeps the new code only if its loss
   drops, so the proxy loss never increases.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from jaxquant import hadamard
from jaxquant.codebooks import e8p
from jaxquant.formats.quip_sharp import QuIPSharpQuantized, pack_codes
from jaxquant.methods import ldlq as core
from jaxquant.methods.registry import register_method

BLOCK = e8p.DIM
# QuIP#'s recommended ρ: 0.9 for E8P (below its Gaussian optimum, since LDLQ feedback widens
# the targets), the codebook defaults 0.98 / 1.03 for RVQ3 / RVQ4.
DEFAULT_RHO = {2: 0.9, 3: 0.98, 4: 1.03}
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class QuIPSharpConfig:
    bits: int = 2  # 2: E8P12, 3: E8P12 + E8 1-bit RVQ, 4: E8P12 + E8P12 RVQ
    rho: float | None = None  # Wscale = rms(Wr) / rho; None: 0.9 / 0.98 / 1.03 for 2 / 3 / 4 bits
    tune_iters: int = 10  # exact block coordinate-descent passes after BlockLDLQ
    damp: float = 0.01  # relative diagonal damping of H (× mean diag H)
    seed: int = 0  # folded into the layer key for SU / SV; seeds any random-orthogonal factor
    lazy_batch: int = 128  # LDLQ lazy-batch width (columns)

    def __post_init__(self):
        if self.bits not in e8p.CODEBOOK_FOR_BITS:
            raise ValueError(f"QuIP# supports bits {sorted(e8p.CODEBOOK_FOR_BITS)}, got {self.bits!r}")
        if self.rho is not None and not (isinstance(self.rho, (int, float)) and self.rho > 0):
            raise ValueError(f"rho must be a positive number or None, got {self.rho!r}")
        if not (isinstance(self.tune_iters, int) and self.tune_iters >= 0):
            raise ValueError(f"tune_iters must be a non-negative int, got {self.tune_iters!r}")
        if not (isinstance(self.damp, (int, float)) and self.damp >= 0):
            raise ValueError(f"damp must be a non-negative number, got {self.damp!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if not (isinstance(self.lazy_batch, int) and self.lazy_batch >= BLOCK):
            raise ValueError(f"lazy_batch must be an int >= {BLOCK}, got {self.lazy_batch!r}")

    @property
    def codebook(self) -> str:
        return e8p.CODEBOOK_FOR_BITS[self.bits]

    @property
    def scale_rho(self) -> float:
        return float(self.rho) if self.rho is not None else DEFAULT_RHO[self.bits]


@register_method("quip#", QuIPSharpConfig, needs_hessian=True, takes_parts=True)
def quantize(w: jax.Array, cfg: QuIPSharpConfig, *, hessian=None, key=None, parts=None) -> QuIPSharpQuantized:
    """``parts``: output rows of each fused part of ``w`` (q/k/v or gate/up), or None for one layer."""
    if parts:
        if sum(parts) != w.shape[0]:
            raise ValueError(f"fused parts {tuple(parts)} do not add up to the weight's {w.shape[0]} rows")
        bounds = [0, *jnp.cumsum(jnp.asarray(parts)).tolist()]
        return quantize_fused([w[a:b] for a, b in zip(bounds[:-1], bounds[1:])], cfg, hessian=hessian, key=key)
    return quantize_fused([w], cfg, hessian=hessian, key=key)


def quantize_fused(ws, cfg: QuIPSharpConfig, *, hessian=None, key=None) -> QuIPSharpQuantized:
    """Quantize weights that read the same input (q/k/v, gate/up) as one ``[Σ out, in]`` matrix.

    Each part is divided by its own RMS first (QuIP# §5); the result's ``part_slices()`` give
    each part's output rows. With one weight this is the plain per-layer method.
    """
    if hessian is None:
        raise ValueError("QuIP# needs the layer's input Hessian (hessian=[in, in])")
    ws = [jnp.asarray(w, jnp.float32) for w in ws]
    n = ws[0].shape[1]
    if any(w.ndim != 2 or w.shape[1] != n for w in ws):
        raise ValueError(f"fused parts must share the input width; got {[tuple(w.shape) for w in ws]}")
    parts = tuple(int(w.shape[0]) for w in ws)
    m = sum(parts)
    if n % BLOCK:
        raise ValueError(f"QuIP# quantizes blocks of {BLOCK} inputs; input width {n} is not a multiple")
    for width in (m, n):
        hadamard.hadamard_factors(width)  # raises early, naming padded_width, if none applies
    key = jax.random.fold_in(jax.random.key(0) if key is None else key, cfg.seed)
    su = hadamard.random_signs(jax.random.fold_in(key, 0), n)
    sv = hadamard.random_signs(jax.random.fold_in(key, 1), m)
    H, dead = core.prepare_hessian(hessian, damp=cfg.damp)
    if len(ws) > 1:
        part_rms = jnp.stack([jnp.sqrt(jnp.mean(w**2)) for w in ws])
        part_rms = jnp.where(part_rms > 0, part_rms, 1.0)
        W = jnp.concatenate([w / r for w, r in zip(ws, part_rms)])
    else:
        part_rms, W = jnp.ones((1,), jnp.float32), ws[0]
    W = jnp.where(dead[None, :], 0.0, W)
    Wr, Hr = incoherence(W, H, su, sv, seed=cfg.seed)
    scale = jnp.sqrt(jnp.mean(Wr**2)) / cfg.scale_rho
    scale = jnp.where(scale > 0, scale, 1.0)
    U = core.inverse_cholesky_upper(Hr, damp=cfg.damp)
    codes, _ = quantize_rotated(Wr / scale, Hr, U, codebook=cfg.codebook, tune_iters=cfg.tune_iters,
                                lazy_batch=cfg.lazy_batch)
    return QuIPSharpQuantized(pack_codes(codes), su.astype(jnp.float16), sv.astype(jnp.float16),
                              (scale * part_rms).astype(jnp.float32), (m, n), cfg.bits, cfg.codebook,
                              cfg.seed, parts if len(parts) > 1 else ())


@partial(jax.jit, static_argnames=("seed",))
def incoherence(W, H, su, sv, *, seed: int = 0):
    """``(Wr, Hr) = (A_mᵀ SV W SU A_n, A_nᵀ SU H SU A_n)`` (QuIP# §3, with the RHT)."""
    Wr = hadamard.rht(hadamard.rht(W, su, seed=seed).T, sv, seed=seed).T
    Hr = hadamard.rht(hadamard.rht(H, su, seed=seed).T, su, seed=seed)
    return Wr, 0.5 * (Hr + Hr.T)


def quantize_rotated(X, H, U, *, codebook: str, tune_iters: int, lazy_batch: int = 128,
                     feedback: bool = True):
    """Quantize ``X [m, n]`` (already rotated and scaled) against the proxy metric ``H``.

    ``U`` is ``inverse_cholesky_upper(H)``. With ``feedback=False`` (and ``tune_iters=0``) this is
    plain nearest rounding with the same codebook. Returns ``(codes, Q)``: a tuple of per-stage
    code arrays ``[m, n / 8]`` and the dequantized ``Q [m, n]``.
    """
    return _quantize_rotated(jnp.asarray(X, jnp.float32), jnp.asarray(H, jnp.float32),
                             jnp.asarray(U, jnp.float32), codebook=codebook, tune_iters=tune_iters,
                             lazy_batch=lazy_batch, feedback=feedback)


@partial(jax.jit, static_argnames=("codebook", "tune_iters", "lazy_batch", "feedback"))
def _quantize_rotated(X, H, U, *, codebook, tune_iters, lazy_batch, feedback):
    cb = e8p.get_codebook(codebook)
    m, n = X.shape
    if feedback:
        def quantize_block(x, k):
            codes, q = cb.quantize(x)
            return q, codes

        Q, codes = core.ldlq(X, U, quantize_block, block_size=BLOCK, lazy_batch=lazy_batch)
        codes = tuple(jnp.moveaxis(c, 0, 1) for c in codes)  # [m, n / 8] each
    else:
        codes, q = cb.quantize(X.reshape(m, n // BLOCK, BLOCK))
        Q = q.reshape(m, n)
    if tune_iters:
        codes, Q = _block_coordinate_descent(X, H, codes, Q, cb, tune_iters)
    return codes, Q


def _block_coordinate_descent(X, H, codes, Q, cb, iters):
    m, n = X.shape
    nb = n // BLOCK
    Hkk = core.block_diagonal(H, BLOCK)
    Hkk_inv = jnp.linalg.inv(Hkk)
    R = jnp.matmul(X - Q, H, precision=HIGHEST)  # ½ the gradient of the loss in E = X − Q

    def block(carry, k):
        codes, Q, R = carry
        col = k * BLOCK
        Qk = jax.lax.dynamic_slice(Q, (0, col), (m, BLOCK))
        Rk = jax.lax.dynamic_slice(R, (0, col), (m, BLOCK))
        target = Qk + jnp.matmul(Rk, Hkk_inv[k], precision=HIGHEST)
        new_codes, new_q = cb.quantize(target)
        d = Qk - new_q  # change of E_k if the new codeword is taken
        change = 2.0 * jnp.sum(d * Rk, -1) + jnp.sum(jnp.matmul(d, Hkk[k], precision=HIGHEST) * d, -1)
        take = change < 0
        d = jnp.where(take[:, None], d, 0.0)
        Q = jax.lax.dynamic_update_slice(Q, jnp.where(take[:, None], new_q, Qk), (0, col))
        codes = tuple(c.at[:, k].set(jnp.where(take, nc, c[:, k])) for c, nc in zip(codes, new_codes))
        R = R + jnp.matmul(d, jax.lax.dynamic_slice(H, (col, 0), (BLOCK, n)), precision=HIGHEST)
        return (codes, Q, R), None

    def one_pass(_, carry):
        carry, _ = jax.lax.scan(block, carry, jnp.arange(nb))
        return carry

    codes, Q, _ = jax.lax.fori_loop(0, iters, one_pass, (codes, Q, R))
    return codes, Q


def proxy_loss_rotated(X, Q, H) -> float:
    """``tr((X − Q) H (X − Q)ᵀ)``."""
    return core.proxy_loss(X, Q, H)
