"""GPTVQ (van Baalen et al., 2024): vector quantization inside the GPTQ error-feedback sweep.

Per layer (REFERENCE §4):
1. the sweep (``ldlq`` with blocks of D columns, lazy batch = one column group): when it
   reaches a column group, each tile's codebook is initialized on the group's current
   (feedback-updated) weights, Mahalanobis or k-means++ seeding then Hessian-weighted EM, and
   quantized to int8; each D-vector is then assigned to the nearest entry under the block's
   loss metric and its error fed forward;
2. with the assignments fixed, the codebooks are refined by Adam on ``tr((W−Ŵ)H(W−Ŵ)ᵀ)``
   (lr ×0.1 and restart from the best point whenever the loss goes up), re-quantized to int8,
   and kept only if that lowers the loss;
3. optionally (1-D only) the codebooks are compressed by a truncated SVD of the stacked sorted
   codebooks, refined the same way (``VQSVDQuantized``).

``exact_block_update`` (default) uses the exact D×D metric ``(U_BB⁻¹)(U_BB⁻¹)ᵀ`` for
assignment and EM and the exact block feedback; ``False`` reproduces upstream's diagonal
approximation. Optional blockwise log-domain scales (``scale_block`` columns, 4 bits) normalize
each row block before VQ; errors, metrics and feedback stay in the weight's own units.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxquant.formats import packing
from jaxquant.formats.vq import (VQQuantized, VQScaledQuantized, VQSVDQuantized, decode,
                                 log_scale_values, quantize_codebooks)
from jaxquant.methods import ldlq as core
from jaxquant.methods.registry import register_method

INITS = ("mahalanobis", "kmeans++")


@dataclasses.dataclass(frozen=True)
class GPTVQConfig:
    bits: int = 2  # index bits per dimension: a codebook has 2^(bits·vq_dim) entries
    vq_dim: int = 2  # D: consecutive inputs of a row quantized together (1, 2 or 4)
    group_size: int = 256  # columns per codebook group
    tile_size: int = 2048  # l: weights sharing one codebook (group_size columns × l/group_size rows)
    kmeans_iters: int = 100  # Hessian-weighted EM iterations per codebook
    init: str = "mahalanobis"  # or "kmeans++"
    codebook_bits: int = 8  # signed integer codebook entries (stored as int8)
    update_iters: int = 25  # Adam steps of the codebook update after the sweep (0: off)
    update_lr: float = 1e-3
    svd_rank: float = 0.0  # ρ: 1-D codebooks stored as a rank int(K·ρ) product (SVD); 0: off
    scale_block: int = 0  # columns per blockwise log-domain scale (GPTVQ uses 64); 0: off
    scale_bits: int = 4
    exact_block_update: bool = True  # exact D×D metric and feedback (upstream: diagonal)
    damp: float = 0.01
    true_sequential: bool = True  # pipeline: re-collect inputs after each linear group of a block

    def __post_init__(self):
        def positive_int(name):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"GPTVQ {name} must be a positive int, got {v!r}")

        for name in ("bits", "vq_dim", "group_size", "tile_size", "kmeans_iters", "codebook_bits"):
            positive_int(name)
        if self.vq_dim not in (1, 2, 4):
            raise ValueError(f"GPTVQ vq_dim must be 1, 2 or 4, got {self.vq_dim!r}")
        if self.bits * self.vq_dim > 16:
            raise ValueError(f"GPTVQ index of bits·vq_dim = {self.bits * self.vq_dim} bits: at most 16")
        if self.group_size % self.vq_dim:
            raise ValueError(f"GPTVQ group_size {self.group_size} is not a multiple of vq_dim {self.vq_dim}")
        if self.tile_size % self.group_size:
            raise ValueError(f"GPTVQ tile_size {self.tile_size} is not a multiple of group_size {self.group_size}")
        if self.tile_size // self.vq_dim < self.num_entries:
            raise ValueError(f"GPTVQ tile of {self.tile_size} weights has fewer vectors than the "
                             f"{self.num_entries} codebook entries")
        if self.init not in INITS:
            raise ValueError(f"GPTVQ init must be one of {INITS}, got {self.init!r}")
        if not 2 <= self.codebook_bits <= 8:
            raise ValueError(f"GPTVQ codebook_bits must be 2 to 8 (int8 storage), got {self.codebook_bits!r}")
        if not (isinstance(self.update_iters, int) and self.update_iters >= 0):
            raise ValueError(f"GPTVQ update_iters must be a non-negative int, got {self.update_iters!r}")
        if self.scale_block and (self.scale_block % self.vq_dim or self.scale_block < 0):
            raise ValueError(f"GPTVQ scale_block {self.scale_block} must be a multiple of vq_dim")
        if not 1 <= self.scale_bits <= 8:
            raise ValueError(f"GPTVQ scale_bits must be 1 to 8, got {self.scale_bits!r}")
        if not (isinstance(self.damp, (int, float)) and self.damp >= 0):
            raise ValueError(f"damp must be a non-negative number, got {self.damp!r}")
        if self.svd_rank:
            if not 0 < self.svd_rank <= 1:
                raise ValueError(f"GPTVQ svd_rank is a fraction ρ in (0, 1], got {self.svd_rank!r}")
            if self.vq_dim != 1 or self.scale_block:
                raise ValueError("GPTVQ SVD codebook compression needs vq_dim=1 and no scale_block")

    @property
    def num_entries(self) -> int:
        return 2 ** (self.bits * self.vq_dim)

    @property
    def nominal_bits_per_weight(self) -> float:
        """The paper's bpv: ``b + K·D·b_c / l (+ scale_bits / scale_block)``; the stored
        weight's exact ``bits_per_weight`` adds each codebook's 16-bit scale and padding."""
        entries = self.num_entries * self.vq_dim
        if self.svd_rank:  # per tile: int(K·ρ) factors (the shared basis is not counted)
            entries = max(1, int(self.num_entries * self.svd_rank))
        bpv = self.bits + entries * self.codebook_bits / self.tile_size
        return bpv + (self.scale_bits / self.scale_block if self.scale_block else 0.0)


def tile_shape(out: int, n: int, cfg: GPTVQConfig) -> tuple[int, int]:
    """``(rows, cols)`` of a codebook tile: ``cols = group_size`` and ``rows = l / cols`` when
    they divide the weight; otherwise the largest multiple of D dividing ``in`` below
    ``group_size`` and the divisor of ``out`` nearest to ``l / cols`` (odd shapes)."""
    D = cfg.vq_dim
    if n % D:
        raise ValueError(f"GPTVQ vq_dim {D} does not divide the input width {n}")
    cols = max(c for c in range(D, min(cfg.group_size, n) + 1, D) if n % c == 0)
    target = cfg.tile_size / cols
    rows = min((r for r in range(1, out + 1) if out % r == 0), key=lambda r: (abs(np.log(r / target)), -r))
    if rows * cols // D < cfg.num_entries:
        raise ValueError(f"GPTVQ: a {rows}x{cols} tile of the {out}x{n} weight has fewer vectors "
                         f"than the {cfg.num_entries} codebook entries")
    return rows, cols


# ---------------------------------------------------------------- codebook initialization + EM

def _mahalanobis_init(x, K):
    """K points at evenly spaced ranks of the Mahalanobis distance to the mean. x [N, D]."""
    mu = x.mean(0)
    xc = x - mu
    cov = xc.T @ xc / x.shape[0] + 1e-8 * jnp.eye(x.shape[1]) * (1 + jnp.trace(xc.T @ xc) / x.shape[0])
    d = jnp.sum(xc * jnp.linalg.solve(cov, xc.T).T, axis=1)
    order = jnp.argsort(d)
    ranks = (jnp.arange(K) * x.shape[0]) // K
    return x[order[ranks]]


def _kmeanspp_init(x, w, M, K, key):
    """Weighted k-means++ seeding under the per-point metric. x [N, D], w [N], M [N, D, D]."""
    keys = jax.random.split(key, K)
    first = x[jax.random.choice(keys[0], x.shape[0], p=w / jnp.sum(w))]

    def dist_to(c):
        e = x - c
        return w * jnp.einsum("nd,nde,ne->n", e, M, e)

    def body(j, state):
        C, dmin = state
        p = dmin / jnp.maximum(jnp.sum(dmin), 1e-30)
        p = jnp.where(jnp.sum(dmin) > 0, p, w / jnp.sum(w))
        c = x[jax.random.choice(keys[j], x.shape[0], p=p)]
        return C.at[j].set(c), jnp.minimum(dmin, dist_to(c))

    C = jnp.zeros((K, x.shape[1]), x.dtype).at[0].set(first)
    C, _ = jax.lax.fori_loop(1, K, body, (C, dist_to(first)))
    return C


def _assign(x, M, C, xM=None):
    """argmin_k (x − c_k)ᵀ M (x − c_k) for points x [R, nb, D] with metric M [nb, D, D];
    ``xM = x M`` may be passed precomputed."""
    xM = jnp.einsum("rnd,nde->rne", x, M) if xM is None else xM
    dist = jnp.einsum("kd,nde,ke->nk", C, M, C)[None]
    for e in range(C.shape[1]):  # D <= 4: broadcast FMAs beat a batched dot here
        dist = dist - 2.0 * xM[..., e, None] * C[:, e]
    return jnp.argmin(dist, axis=-1)


def _spd_solve(S, T):
    """Solve ``S c = T`` for a batch of small SPD ``S [..., D, D]`` (D <= 4): an unrolled
    Cholesky, elementwise on the batch (no per-matrix LAPACK calls)."""
    D = S.shape[-1]
    L = [[None] * D for _ in range(D)]
    for j in range(D):
        d = S[..., j, j] - sum(L[j][k] ** 2 for k in range(j))
        L[j][j] = jnp.sqrt(jnp.maximum(d, 1e-30))
        for i in range(j + 1, D):
            L[i][j] = (S[..., i, j] - sum(L[i][k] * L[j][k] for k in range(j))) / L[j][j]
    y = []
    for i in range(D):
        y.append((T[..., i] - sum(L[i][k] * y[k] for k in range(i))) / L[i][i])
    c = [None] * D
    for i in reversed(range(D)):
        c[i] = (y[i] - sum(L[k][i] * c[k] for k in range(i + 1, D))) / L[i][i]
    return jnp.stack(c, axis=-1)


def _em(x, w, M, C, iters):
    """Hessian-weighted EM (Lloyd): E = metric argmin, M = weighted metric mean
    ``c_k = (Σ w M)⁻¹ Σ w M x`` over the points of cluster k; empty clusters stay put.
    x [R, nb, D], w [R, nb], M [nb, D, D], C [K, D]."""
    K, D = C.shape
    wM = (w[..., None, None] * M[None]).reshape(-1, D * D)  # [N, D²]
    wMx = jnp.einsum("rn,nde,rne->rnd", w, M, x).reshape(-1, D)
    stats = jnp.concatenate([wM, wMx, jnp.ones_like(wMx[:, :1])], axis=1)  # [N, D² + D + 1]
    xM = jnp.einsum("rnd,nde->rne", x, M)

    def step(_, C):
        onehot = jax.nn.one_hot(_assign(x, M, C, xM).reshape(-1), K, dtype=x.dtype)  # [N, K]
        acc = jnp.matmul(onehot.T, stats, precision=core.HIGHEST)  # cluster sums, no scatter
        S, T, count = acc[:, :D * D].reshape(K, D, D), acc[:, D * D:-1], acc[:, -1]
        ridge = 1e-7 * jnp.trace(S, axis1=1, axis2=2)[:, None, None] / D + 1e-30
        C_new = _spd_solve(S + ridge * jnp.eye(D, dtype=x.dtype), T)
        return jnp.where(count[:, None] > 0, C_new, C)

    return jax.lax.fori_loop(0, iters, step, C)


def _init_tile(x, w, M, key, *, K, init, iters):
    """One tile's float codebook [K, D]: seeding then EM. x [R, nb, D], w [R, nb]."""
    D = x.shape[-1]
    flat = x.reshape(-1, D)
    if init == "mahalanobis":
        C = _mahalanobis_init(flat, K)
    else:
        Mp = jnp.broadcast_to(M[None], (x.shape[0], *M.shape)).reshape(-1, D, D)
        C = _kmeanspp_init(flat, w.reshape(-1), Mp, K, key)
    return _em(x, w, M, C, iters)


# ---------------------------------------------------------------- the sweep

@partial(jax.jit, static_argnames=("rows", "cols", "D", "K", "init", "iters", "cb_bits", "exact"))
def _sweep(W, U, S, key, *, rows, cols, D, K, init, iters, cb_bits, exact):
    """Returns (indices [out, in/D], int8 codebooks [Tr, Tc, K, D], fp16 scales [Tr, Tc, 1, 1],
    Ŵ [out, in]). ``S`` [out, in]: blockwise scales (ones when off)."""
    out, n = W.shape
    Tr, nb = out // rows, cols // D
    A = core.block_metric_factor(U, D, diagonal=not exact)  # [n/D, D, D]
    metric = jnp.einsum("kde,kfe->kdf", A, A)  # A Aᵀ: the loss of a block error e is e M eᵀ
    Sv = S[:, ::D]  # one scale per vector (a scale block is a multiple of D)

    def setup(Wb, j):
        start = j * nb
        M = jax.lax.dynamic_slice(metric, (start, 0, 0), (nb, D, D))
        s = jax.lax.dynamic_slice(Sv, (0, start), (out, nb))
        x = (Wb.reshape(out, nb, D) / s[..., None]).reshape(Tr, rows, nb, D)
        w = (s**2).reshape(Tr, rows, nb)  # error in weight units = s² × error in scaled units
        keys = jax.random.split(jax.random.fold_in(key, j), Tr)
        C = jax.vmap(partial(_init_tile, M=M, K=K, init=init, iters=iters))(x, w, key=keys)
        C_int, C_scale = quantize_codebooks(C, cb_bits)
        return C_int, C_scale

    def quantize_vec(x, k, ctx):
        C = ctx[0].astype(jnp.float32) * ctx[1].astype(jnp.float32)  # [Tr, K, D]
        s = jax.lax.dynamic_slice(Sv, (0, k), (out, 1))
        xs = (x / s).reshape(Tr, rows, D)
        idx = jax.vmap(lambda xt, Ct: _assign(xt[:, None], metric[k][None], Ct)[:, 0])(xs, C)
        q = jnp.take_along_axis(C, idx[..., None], axis=1).reshape(out, D) * s
        return q, idx.reshape(out).astype(jnp.uint32)

    W_hat, ((C_int, C_scale), idx) = core.ldlq(W, U, quantize_vec, block_size=D, lazy_batch=cols,
                                               batch_setup=setup, diagonal_feedback=not exact)
    # ctx is stacked over column groups: [Tc, Tr, ...] -> [Tr, Tc, ...]
    return idx.T, jnp.swapaxes(C_int, 0, 1), jnp.swapaxes(C_scale, 0, 1), W_hat


# ---------------------------------------------------------------- codebook update

def _adam_with_restarts(loss, p0, lr, steps):
    """Minimize ``loss`` from the pytree ``p0`` with Adam; whenever the loss goes up, return to
    the best point with a fresh Adam state and lr × 0.1. Returns (best params, best loss)."""
    adam = optax.scale_by_adam()
    where = lambda c, a, b: jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)  # noqa: E731
    L0, g0 = jax.value_and_grad(loss)(p0)

    def step(_, st):
        p, opt, best, lr = st
        L, g = jax.value_and_grad(loss)(p)
        better = L < best[1]
        best = where(better, (p, L, g), best)
        p, g = where(better, (p, g), (best[0], best[2]))
        opt = where(better, opt, adam.init(best[0]))
        lr = jnp.where(better, lr, lr * 0.1)
        u, opt = adam.update(g, opt)
        return jax.tree.map(lambda x, d: x - lr * d, p, u), opt, best, lr

    best = (p0, L0 * (1 + 1e-6) + 1e-30, g0)  # the first step always counts as "better"
    p, _, best, _ = jax.lax.fori_loop(0, steps, step, (p0, adam.init(p0), best, lr))
    L = loss(p)
    return where(L < best[1], p, best[0]), jnp.minimum(L, best[1])


@partial(jax.jit, static_argnames=("rows", "cols", "steps", "cb_bits"))
def _update_codebooks(W, H, S, idx, C_int, C_scale, lr, *, rows, cols, steps, cb_bits):
    """Adam on the float codebooks with the assignments fixed, then int8 re-quantization; the
    update is kept only if the quantized result lowers the proxy loss."""
    def loss(C):
        return core.proxy_loss_jnp(W, decode(idx, C, group_rows=rows, group_cols=cols) * S, H)

    C0 = C_int.astype(jnp.float32) * C_scale.astype(jnp.float32)
    L0 = loss(C0)
    C, _ = _adam_with_restarts(loss, C0, lr, steps)
    C_int_new, C_scale_new = quantize_codebooks(C, cb_bits)
    L_new = loss(C_int_new.astype(jnp.float32) * C_scale_new.astype(jnp.float32))
    keep = L_new < L0
    return jnp.where(keep, C_int_new, C_int), jnp.where(keep, C_scale_new, C_scale), L0, L_new


@partial(jax.jit, static_argnames=("rows", "cols", "rank", "steps", "cb_bits"))
def _svd_codebooks(W, H, S, idx, C_int, C_scale, lr, *, rows, cols, rank, steps, cb_bits):
    """GPTVQ's SVD compression of 1-D codebooks: sort each codebook (and remap the indices)
    so the stacked ``[tiles, K]`` matrix is near low rank, truncate its SVD to ``rank``, refine
    both factors with Adam on the proxy loss, then store the per-tile factors as integers."""
    Tr, Tc, K, _ = C_int.shape
    C = (C_int.astype(jnp.float32) * C_scale.astype(jnp.float32))[..., 0]
    order = jnp.argsort(C, axis=-1)
    rank_of = jnp.argsort(order, axis=-1)
    out, nv = idx.shape
    flat = ((jnp.arange(out) // rows)[:, None] * Tc + (jnp.arange(nv) // cols)[None, :]) * K
    idx = rank_of.reshape(-1)[flat + idx.astype(jnp.int32)].astype(jnp.uint32)
    u, s, vt = jnp.linalg.svd(jnp.take_along_axis(C, order, -1).reshape(-1, K), full_matrices=False)

    def codebooks(p):
        return (p[0] @ p[1]).reshape(Tr, Tc, K, 1)

    def loss(p):
        return core.proxy_loss_jnp(W, decode(idx, codebooks(p), group_rows=rows, group_cols=cols) * S, H)

    (A, B), _ = _adam_with_restarts(loss, (u[:, :rank] * s[:rank], vt[:rank]), lr, steps)
    B = B.astype(jnp.float16)
    A_int, A_scale = quantize_codebooks(A.reshape(Tr, Tc, 1, rank), cb_bits)
    return idx, A_int.reshape(Tr, Tc, rank), A_scale.reshape(Tr, Tc, 1), B


# ---------------------------------------------------------------- blockwise scales

def _block_scales(W, block, bits):
    """Log-domain ``bits``-bit scales, max|w| per row and ``block`` columns."""
    out, n = W.shape
    amax = jnp.max(jnp.abs(W.reshape(out, n // block, block)), axis=-1)
    log = jnp.log2(jnp.maximum(amax, 1e-30))
    hi = jnp.max(log)
    lo = jnp.min(jnp.where(amax > 0, log, hi))  # all-zero blocks must not stretch the range
    step = jnp.maximum(hi - lo, 1e-12) / (2**bits - 1)
    codes = jnp.clip(jnp.round((log - lo) / step), 0, 2**bits - 1).astype(jnp.uint32)
    scale_range = jnp.stack([lo, lo + step * (2**bits - 1)]).astype(jnp.float32)
    return codes, scale_range


# ---------------------------------------------------------------- entry point

@register_method("gptvq", GPTVQConfig, needs_hessian=True)
def quantize(w: jax.Array, cfg: GPTVQConfig, *, hessian=None, key=None):
    if hessian is None:
        raise ValueError("GPTVQ needs the layer's input Hessian (hessian=[in, in])")
    return quantize_with_hat(w, cfg, hessian, key=key)[0]


def quantize_with_hat(w, cfg: GPTVQConfig, hessian, *, key=None):
    """``(quantized weight, Ŵ from the sweep before the codebook update)``."""
    out, n = w.shape
    D, K = cfg.vq_dim, cfg.num_entries
    rows, cols = tile_shape(out, n, cfg)
    if cfg.scale_block and n % cfg.scale_block:
        raise ValueError(f"GPTVQ scale_block {cfg.scale_block} does not divide the input width {n}")
    key = jax.random.key(0) if key is None else key
    H, dead = core.prepare_hessian(hessian, damp=cfg.damp)
    W = jnp.where(dead[None, :], 0.0, jnp.asarray(w, jnp.float32))
    U = core.inverse_cholesky_upper(H, damp=cfg.damp)
    if cfg.scale_block:
        scale_codes, scale_range = _block_scales(W, cfg.scale_block, cfg.scale_bits)
        S = jnp.repeat(log_scale_values(scale_codes, scale_range, cfg.scale_bits), cfg.scale_block, axis=1)
    else:
        S = jnp.ones_like(W)
    idx, C_int, C_scale, W_hat = _sweep(W, U, S, key, rows=rows, cols=cols, D=D, K=K, init=cfg.init,
                                        iters=cfg.kmeans_iters, cb_bits=cfg.codebook_bits,
                                        exact=cfg.exact_block_update)
    if cfg.update_iters:
        C_int, C_scale, _, _ = _update_codebooks(W, H, S, idx, C_int, C_scale, jnp.float32(cfg.update_lr),
                                                 rows=rows, cols=cols, steps=cfg.update_iters,
                                                 cb_bits=cfg.codebook_bits)
    common = dict(shape=(out, n), vq_dim=D, index_bits=cfg.bits * D, group_rows=rows, group_cols=cols)
    if cfg.svd_rank:
        idx, A, A_scale, B = _svd_codebooks(W, H, S, idx, C_int, C_scale, jnp.float32(cfg.update_lr),
                                            rows=rows, cols=cols, rank=max(1, int(K * cfg.svd_rank)),
                                            steps=cfg.update_iters, cb_bits=cfg.codebook_bits)
        return VQSVDQuantized(packing.pack(idx, cfg.bits * D), A, A_scale, B, **common), W_hat
    codes = packing.pack(idx, cfg.bits * D)
    if cfg.scale_block:
        qw = VQScaledQuantized(codes, C_int, C_scale, scale_codes=packing.pack(scale_codes.reshape(-1), cfg.scale_bits),
                               scale_range=scale_range, scale_block=cfg.scale_block,
                               scale_bits=cfg.scale_bits, **common)
    else:
        qw = VQQuantized(codes, C_int, C_scale, **common)
    return qw, W_hat
