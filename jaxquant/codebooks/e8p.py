"""QuIP#'s E8 lattice codebooks (Tseng et al. 2024, §4.2 and App. C): E8P12 and its RVQ stacks.

E8P12 ("E8 padded", 2 bits per weight, 8 weights per 16-bit code). The source set S holds 256
vectors of positive half-integers: the 227 vectors of {½, 3/2, 5/2}^8 with squared norm ≤ 10
and 29 of the 56 vectors with five 3/2 and three ½ (squared norm 12). Codewords are
``v ± ¼·1`` for every ``v ∈ D̂8 = {(ℤ+½)^8, even coordinate sum}`` with ``|v| ∈ S``: for each
source vector exactly half of the 256 sign patterns give an even sum, so
256 · 128 · 2 = 2^16 codewords, all in E8 + ¼·1.

Which 29 norm-12 vectors: all 56 are images of each other under coordinate permutations, which
leave the rest of the codebook invariant, so only how the chosen ones sit relative to each other
matters. We take the 29 whose three ½ positions are spread most evenly over the coordinates
(greedy, lexicographic tie-break; see ``_norm12_choice``): on the same 2^21 Gaussian weights at
scale 1.04 that gave MSE 0.09125, against 0.09132 for a random choice and 0.09142 for the
lexicographically first 29.

16-bit code layout (ours; kernels decode exactly this):
    bits 0-7   index of |v| in S (``e8p_source_set()`` order)
    bits 8-14  sign of coordinates 0..6 (1 = negative)
    bit  15    shift: 1 → +¼, 0 → −¼
The sign of coordinate 7 is implied: the number of negative coordinates is ≡ sum(|v|) (mod 2),
which is what makes the coordinate sum of v even.

Nearest-codeword search is exact: for each shift t = ±¼ and each source vector a, the best
signs for y = x − t are sign(y); if they break the parity, flipping the coordinate with the
smallest a_i|y_i| is optimal. So one [N, 8] × [8, 256] product per shift scores every codeword
(16× less work than brute force over 2^16; ``e8p_quantize_bruteforce`` is the check).

RVQ (App. D): 4 bits = E8P(x) + E8P(r·3.45)/3.45, 3 bits = E8P(x) + E8₁(r·2.04)/2.04 with
r = x − E8P(x) and E8₁ the 256-point E8 set (origin, 240 roots, 15 of the 16 vectors ±2e_i).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

DIM = 8
NUM_CODES = 2**16
RVQ3_RESID_SCALE = 2.04
RVQ4_RESID_SCALE = 3.45


# ----------------------------------------------------------------------------- E8P12
def _norm12_choice() -> list[tuple[int, ...]]:
    """29 of the 56 three-element position sets (where the ½ entries go), chosen greedily so
    that each coordinate carries a ½ as evenly as possible, then pairs of coordinates as evenly
    as possible, lexicographic order breaking ties."""
    chosen: list[tuple[int, ...]] = []
    single = np.zeros(DIM, int)
    pair = np.zeros((DIM, DIM), int)
    remaining = list(itertools.combinations(range(DIM), 3))
    for _ in range(29):
        def cost(c):
            return (sum(single[i] for i in c), sum(pair[i, j] for i, j in itertools.combinations(c, 2)))
        best = min(remaining, key=cost)
        remaining.remove(best)
        chosen.append(best)
        for i in best:
            single[i] += 1
        for i, j in itertools.combinations(best, 2):
            pair[i, j] += 1
    return chosen


@functools.cache
def _source_set() -> np.ndarray:
    levels = np.array([0.5, 1.5, 2.5])
    grid = np.array(list(itertools.product(levels, repeat=DIM)))
    inner = grid[(grid**2).sum(1) <= 10]
    inner = inner[np.lexsort(inner.T[::-1])]  # lexicographic
    inner = inner[np.argsort((inner**2).sum(1), kind="stable")]  # then by norm
    outer = np.full((29, DIM), 1.5)
    for row, halves in zip(outer, _norm12_choice()):
        row[list(halves)] = 0.5
    s = np.concatenate([inner, outer])
    assert s.shape == (256, DIM)
    s.setflags(write=False)
    return s


def e8p_source_set() -> np.ndarray:
    """S: the 256 absolute-value patterns [256, 8] (float64), in code-index order."""
    return _source_set()


def _source_parity() -> np.ndarray:
    return (np.rint(_source_set().sum(1)).astype(np.int64) % 2).astype(np.uint16)


@jax.jit
def e8p_decode(codes: jax.Array) -> jax.Array:
    """uint16 codes ``[...]`` -> codewords ``[..., 8]`` float32."""
    c = jnp.asarray(codes).astype(jnp.uint32)
    a = jnp.asarray(_source_set(), jnp.float32)[c & 0xFF]
    signs = (c[..., None] >> (8 + jnp.arange(DIM - 1, dtype=jnp.uint32))) & 1
    last = (jnp.asarray(_source_parity(), jnp.uint32)[c & 0xFF] + signs.sum(-1)) & 1
    neg = jnp.concatenate([signs, last[..., None]], axis=-1).astype(jnp.float32)
    shift = jnp.where((c >> 15) & 1 == 1, 0.25, -0.25)[..., None]
    return a * (1.0 - 2.0 * neg) + shift


@functools.cache
def e8p_codewords() -> np.ndarray:
    """All 2^16 codewords ``[65536, 8]`` float32 (numpy); row c is ``e8p_decode(c)``."""
    c = np.arange(NUM_CODES)
    signs = (c[:, None] >> (8 + np.arange(DIM - 1))) & 1
    last = (_source_parity()[c & 0xFF] + signs.sum(-1)) & 1
    neg = np.concatenate([signs, last[:, None]], axis=1)
    out = (_source_set()[c & 0xFF] * (1 - 2 * neg) + np.where(c >> 15, 0.25, -0.25)[:, None])
    out = out.astype(np.float32)
    out.setflags(write=False)
    return out


def _best_for_shift(x: jax.Array, t: float):
    """Best codeword ``v + t`` for each row of ``x``: (score, source index, negative mask)."""
    src = jnp.asarray(_source_set(), jnp.float32)  # [256, 8]
    parity = jnp.asarray(_source_parity(), jnp.int32)
    y = x - t
    ay = jnp.abs(y)
    neg = (y < 0).astype(jnp.int32)
    corr = jnp.matmul(ay, src.T, precision=jax.lax.Precision.HIGHEST)  # [N, 256]
    prod = ay[:, None, :] * src[None, :, :]  # [N, 256, 8]: a_i |y_i|
    violated = (neg.sum(-1, keepdims=True) & 1) != parity[None, :]
    # score = 2 <x - t, v> - |v|^2 up to a per-row constant; a forced flip costs 4 a_i |y_i|.
    score = 2.0 * corr - jnp.sum(src**2, axis=1) - jnp.where(violated, 4.0 * prod.min(-1), 0.0)
    idx = jnp.argmax(score, axis=-1)
    best = jnp.take_along_axis(score, idx[:, None], axis=-1)[:, 0]
    flip = jnp.take_along_axis(violated, idx[:, None], axis=-1)
    flip_at = jnp.argmin(jnp.take_along_axis(prod, idx[:, None, None], axis=1)[:, 0], axis=-1)
    neg = jnp.where(flip & (jnp.arange(DIM) == flip_at[:, None]), 1 - neg, neg)
    # Compare across shifts on the true squared distance (the dropped constants differ).
    return jnp.sum(y**2, axis=-1) - best, idx, neg


def _e8p_search(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact nearest E8P codeword of each row of ``x [N, 8]`` (float32)."""
    d_plus, idx_plus, neg_plus = _best_for_shift(x, 0.25)
    d_minus, idx_minus, neg_minus = _best_for_shift(x, -0.25)
    minus = d_minus < d_plus  # ties keep the +¼ codeword
    idx = jnp.where(minus, idx_minus, idx_plus).astype(jnp.uint32)
    neg = jnp.where(minus[:, None], neg_minus, neg_plus).astype(jnp.uint32)
    sign_bits = jnp.sum(neg[:, : DIM - 1] << (8 + jnp.arange(DIM - 1, dtype=jnp.uint32)), axis=-1)
    code = idx | sign_bits | (jnp.where(minus, 0, 1).astype(jnp.uint32) << 15)
    return code.astype(jnp.uint16), e8p_decode(code)


def _chunked(fn: Callable, x: jax.Array, chunk: int):
    """Apply a row-wise ``fn([N, 8]) -> (codes, q)`` over ``x [..., 8]`` in chunks of rows."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, DIM).astype(jnp.float32)
    n = flat.shape[0]
    if n <= chunk:
        codes, q = fn(flat)
    else:
        pad = -n % chunk
        blocks = jnp.pad(flat, ((0, pad), (0, 0))).reshape(-1, chunk, DIM)
        codes, q = jax.lax.map(fn, blocks)
        codes = jax.tree.map(lambda c: c.reshape(-1, *c.shape[2:])[:n], codes)
        q = q.reshape(-1, DIM)[:n]
    return jax.tree.map(lambda c: c.reshape(lead + c.shape[1:]), codes), q.reshape(lead + (DIM,))


@functools.partial(jax.jit, static_argnames=("chunk",))
def e8p_quantize(x: jax.Array, *, chunk: int = 4096) -> tuple[jax.Array, jax.Array]:
    """Nearest E8P codeword of each 8-vector: ``x [..., 8] -> (codes uint16 [...], q [..., 8])``."""
    return _chunked(_e8p_search, jnp.asarray(x), chunk)


@functools.partial(jax.jit, static_argnames=("chunk",))
def e8p_quantize_bruteforce(x: jax.Array, *, chunk: int = 512) -> tuple[jax.Array, jax.Array]:
    """Reference search: argmax over all 2^16 codewords of ``2 xᵀc − ‖c‖²``."""
    cw = jnp.asarray(e8p_codewords())
    norm2 = jnp.sum(cw**2, axis=1)

    def search(xb):
        score = 2.0 * jnp.matmul(xb, cw.T, precision=jax.lax.Precision.HIGHEST) - norm2
        code = jnp.argmax(score, axis=-1)
        return code.astype(jnp.uint16), cw[code]

    return _chunked(search, jnp.asarray(x), chunk)


# ----------------------------------------------------------------------------- E8 "1-bit"
@functools.cache
def e8_onebit_codebook() -> np.ndarray:
    """The 256-point E8 set [256, 8] float32: origin, the 240 roots, ±2e_i without −2e_7."""
    roots = []
    for i, j in itertools.combinations(range(DIM), 2):
        for si, sj in itertools.product((1, -1), repeat=2):
            v = np.zeros(DIM)
            v[i], v[j] = si, sj
            roots.append(v)
    for signs in itertools.product((0.5, -0.5), repeat=DIM):
        if sum(s < 0 for s in signs) % 2 == 0:
            roots.append(np.array(signs))
    twos = [2 * s * np.eye(DIM)[i] for i in range(DIM) for s in (1, -1)][:-1]
    out = np.concatenate([np.zeros((1, DIM)), np.array(roots), np.array(twos)]).astype(np.float32)
    assert out.shape == (256, DIM)
    out.setflags(write=False)
    return out


@jax.jit
def e8_onebit_decode(codes: jax.Array) -> jax.Array:
    return jnp.asarray(e8_onebit_codebook())[jnp.asarray(codes).astype(jnp.int32)]


def _e8_onebit_search(x):
    cb = jnp.asarray(e8_onebit_codebook())
    score = 2.0 * jnp.matmul(x, cb.T, precision=jax.lax.Precision.HIGHEST) - jnp.sum(cb**2, axis=1)
    code = jnp.argmax(score, axis=-1)
    return code.astype(jnp.uint8), cb[code]


@functools.partial(jax.jit, static_argnames=("chunk",))
def e8_onebit_quantize(x: jax.Array, *, chunk: int = 8192) -> tuple[jax.Array, jax.Array]:
    """Nearest point of the 256-point E8 set (exhaustive: 256 scores per vector)."""
    return _chunked(_e8_onebit_search, jnp.asarray(x), chunk)


# ----------------------------------------------------------------------------- codebooks
@dataclasses.dataclass(frozen=True)
class E8Codebook:
    """An 8-dimensional codebook with ``bits`` per weight, as QuIP# stacks them.

    ``quantize(x [..., 8]) -> (codes, q)`` where ``codes`` is a tuple with one integer array per
    stage and ``q`` the dequantized vectors; ``decode(codes) -> q``. ``opt_scale`` is the input
    RMS at which i.i.d. Gaussian data has the least MSE, as measured by ``bench.gaussian_mse``
    (1.04, 0.985, 0.93; QuIP# uses 1.03, 0.98 and 1.03).
    """

    name: str
    bits: int
    opt_scale: float
    resid_scale: float = 0.0  # 0: single stage
    resid: str = ""  # "e8p" or "e8-1bit"

    @property
    def code_dtypes(self) -> tuple:
        return (jnp.uint16,) if not self.resid else (
            jnp.uint16, jnp.uint16 if self.resid == "e8p" else jnp.uint8)

    def quantize(self, x: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
        c1, q1 = e8p_quantize(x)
        if not self.resid:
            return (c1,), q1
        r = (jnp.asarray(x, jnp.float32) - q1) * self.resid_scale
        c2, q2 = e8p_quantize(r) if self.resid == "e8p" else e8_onebit_quantize(r)
        return (c1, c2), q1 + q2 / self.resid_scale

    def decode(self, codes: tuple[jax.Array, ...]) -> jax.Array:
        q = e8p_decode(codes[0])
        if self.resid:
            q2 = e8p_decode(codes[1]) if self.resid == "e8p" else e8_onebit_decode(codes[1])
            q = q + q2 / self.resid_scale
        return q


CODEBOOKS = {
    "e8p": E8Codebook("e8p", 2, 1.04),
    "e8p-rvq3": E8Codebook("e8p-rvq3", 3, 0.98, RVQ3_RESID_SCALE, "e8-1bit"),
    "e8p-rvq4": E8Codebook("e8p-rvq4", 4, 0.93, RVQ4_RESID_SCALE, "e8p"),
}
CODEBOOK_FOR_BITS = {2: "e8p", 3: "e8p-rvq3", 4: "e8p-rvq4"}


def get_codebook(name_or_bits: str | int) -> E8Codebook:
    name = CODEBOOK_FOR_BITS.get(name_or_bits, name_or_bits)
    if name not in CODEBOOKS:
        raise ValueError(f"unknown E8 codebook {name_or_bits!r}; known: {sorted(CODEBOOKS)} "
                         f"or bits {sorted(CODEBOOK_FOR_BITS)}")
    return CODEBOOKS[name]
