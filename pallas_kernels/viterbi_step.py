"""One step of the bitshift-trellis Viterbi recursion (``jaxquant/viterbi.py``) in Pallas (Triton).

With P = 2^(L-kV) carried minima, D = 2^kV predecessors and H = P / D, output p = h·D + l is

    M'(p) = min_d  e(d·P + p) + M(d·H + h),     e(s) = ‖c_s‖² - 2⟨x_t, c_s⟩,

and the minimizing d is the back-pointer. XLA materializes this step poorly when D is small (the
reduction over the major axis d); here one program owns ``bh`` values of h (all D values of l)
for ``bb`` sequences and loops over d in registers, so M is read once and M' and the back-pointers
are written once per step. Viewed as ``[D, H, B]``, ``[V, D, H, D]`` and ``[H, D, B]`` (free
reshapes outside), every operand of a program is a contiguous block: no gathers.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # the Triton lowering (deprecated from jax 0.11 on, still present)
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None

MAX_KV = 4  # D = 2^kV predecessors are unrolled in the kernel


def _pow2_divisor(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _kernel(m_ref, x_ref, vals_ref, sqn_ref, mo_ref, bp_ref, *, D, V, bh, bb):
    h0 = pl.multiple_of(pl.program_id(0) * bh, bh)
    b0 = pl.multiple_of(pl.program_id(1) * bb, bb)
    hs, bs = pl.ds(h0, bh), pl.ds(b0, bb)
    xs = [-2.0 * x_ref[v, bs] for v in range(V)]  # [bb]
    best = arg = None
    for d in range(D):
        e = sqn_ref[d, hs, :][:, :, None]  # [bh, D(l), 1]
        for v in range(V):
            e = e + vals_ref[v, d, hs, :][:, :, None] * xs[v][None, None, :]
        cand = e + m_ref[d, hs, bs][:, None, :]  # [bh, D, bb]
        if d == 0:
            best, arg = cand, jnp.zeros(cand.shape, jnp.int32)
        else:
            take = cand < best
            best = jnp.where(take, cand, best)
            arg = jnp.where(take, d, arg)
    mo_ref[hs, :, bs] = best
    bp_ref[hs, :, bs] = arg.astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("L", "kV", "block_h", "block_b", "num_warps", "interpret"))
def viterbi_step(m: jax.Array, x_t: jax.Array, vals: jax.Array, sqn: jax.Array, *, L: int, kV: int,
                 block_h: int = 16, block_b: int = 64, num_warps: int = 4,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """M (P, B) fp32, x_t (V, B), vals (V, 2^L), sqn (2^L) -> (M' (P, B) fp32, back-pointers (P, B) uint8).

    ``block_h`` / ``block_b`` (powers of two) size a program's block; they shrink to divide H and B.
    """
    if not 1 <= kV <= MAX_KV or L < 2 * kV:
        raise ValueError(f"pallas viterbi_step needs 1 <= kV <= {MAX_KV} and L >= 2·kV, got L={L}, kV={kV}")
    P, B = m.shape
    V = x_t.shape[0]
    D, H = 1 << kV, 1 << (L - 2 * kV)
    if P != 1 << (L - kV) or vals.shape != (V, 1 << L) or sqn.shape != (1 << L,):
        raise ValueError(f"shapes do not match L={L}, kV={kV}: M {m.shape}, vals {vals.shape}, sqn {sqn.shape}")
    bh, bb = _pow2_divisor(H, block_h), _pow2_divisor(B, block_b)
    params = None
    if not interpret:
        if pltriton is None:
            raise RuntimeError("pallas viterbi_step needs jax.experimental.pallas.triton")
        params = pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
    kernel = functools.partial(_kernel, D=D, V=V, bh=bh, bb=bb)
    mo, bp = pl.pallas_call(
        kernel, grid=(H // bh, B // bb), compiler_params=params, interpret=interpret, name=f"viterbi_step_kv{kV}",
        out_shape=(jax.ShapeDtypeStruct((H, D, B), jnp.float32), jax.ShapeDtypeStruct((H, D, B), jnp.uint8)),
    )(m.reshape(D, H, B), x_t.astype(jnp.float32), vals.reshape(V, D, H, D), sqn.reshape(D, H, D))
    return mo.reshape(P, B), bp.reshape(P, B)
