"""Viterbi search over QTIP's bitshift trellis (arXiv:2406.11235 §3, App. A), batched in JAX.

Notation: a sequence of T weights is n = T/V steps; step t emits the V values of its L-bit state
s_t, and consecutive states overlap in L - kV bits (``s_{t+1} >> kV == s_t mod 2^(L-kV)``).
Write P = 2^(L-kV) and D = 2^kV. The predecessors of s are ``d·P + (s >> kV)`` for d < D, so the
best predecessor depends on s only through ``s >> kV``. The recursion therefore carries

    M_t(p) = min_d C_t(d·P + p),   C_t(s) = e_t(s) + M_{t-1}(s >> kV),   p < P,

with C_t the best cost of a path ending in s at step t and e_t(s) = ‖c_s‖² - 2⟨x_t, c_s⟩ the
squared error up to the constant ‖x_t‖². One step maps M (P, B) and x_t (V, B) to M' and the
argmin d (uint8 back-pointers, P x B): with s = d·P + h·D + l it is a broadcast over the reshaped
code tables plus a min/argmin over the leading axis d -- reshapes, no gathers. Carrying M
(P entries) instead of C (2^L) divides the per-step memory traffic by D; the batch is the
minor axis so that a warp's sequences share each code-table load.

Tail-biting (QTIP App. A): the stream of a tile is the top kV bits of every state, n·kV = T·k
bits, read circularly, so the last state's low L-kV bits must equal the first state's high
L-kV bits ("overlap" O). Pass 1 runs unconstrained on the sequence rotated by n/2 steps and
reads O off the state where the two ends meet; pass 2 runs with M_{-1} = 0 only at p = O
(forcing s_0 >> kV = O) and ends in the state d·P + O with d the back-pointer of M_{n-1}(O).

The grouped steps ("group": one step, "pair": two steps per scan iteration) compute all G = D^S
outputs that depend on one group of G inputs in one thread, carry integer keys with the argmin in
their low bits, and pack the pointers S·kV bits each into words (see the section below); "pair"
halves the carried-cost traffic per step and is the H100 default for the 1MAD/3INST codes at k = 2.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_MAX_BACKPOINTER_BYTES = 1 << 30


def code_tables(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[2^L, V]`` code values -> (``[V, 2^L]`` values, ``[2^L]`` squared norms), float32."""
    values = jnp.asarray(values, jnp.float32)
    return values.T, jnp.sum(values * values, axis=-1)


def _check(L: int, kV: int, n: int) -> None:
    if not 1 <= kV <= 8:
        raise ValueError(f"k·V must be in [1, 8] (uint8 back-pointers), got {kV}")
    if L < 2 * kV:
        raise ValueError(f"the bitshift trellis needs L >= 2·k·V, got L={L}, kV={kV}")
    if n * kV < L:
        raise ValueError(f"a tail-biting sequence of {n} steps holds {n * kV} bits < L={L}")


STEP_IMPLS = ("reduce", "tree", "packed", "group", "pair")
UNREACHABLE = 1e30  # start cost of excluded states: finite, so that costs stay orderable as integers


def _step(m, x_t, vals, sqn, *, L, kV, impl):
    """One trellis step: M_{t-1} (P, B), x_t (V, B) -> M_t (P, B), back-pointers (P, B) uint8.

    Batch is the minor axis: the 32 sequences of a GPU warp read the same code-table entry (one
    broadcast load) and consecutive cost entries (coalesced). ``impl``: "reduce" is one variadic
    (value, index) reduction over d; "tree" an elementwise compare/select tree. Both return the
    minimum and a minimizing d (on ties, any); their speed depends on the backend and kV
    (``scripts/bench_viterbi.py`` compares them).
    """
    V, B = x_t.shape
    D, H = 1 << kV, 1 << (L - 2 * kV)
    e = sqn[:, None]
    for v in range(V):  # ‖c‖² - 2<x, c>, state-major so that s = d·P + h·D + l
        e = e - vals[v][:, None] * (2.0 * x_t[v][None, :])
    cand = e.reshape(D, H, D, B) + m.reshape(D, H, 1, B)
    if impl == "packed":
        # One integer min instead of a (value, index) reduction: the cost's bits, made orderable as
        # int32, with d in its low kV bits. The costs lose those kV mantissa bits (2^-19 relative at
        # kV = 4), far below the differences between paths.
        key = lax.bitcast_convert_type(cand, jnp.int32)
        key = jnp.where(key < 0, key ^ 0x7FFFFFFF, key)
        key = (key & ~(D - 1)) | lax.broadcasted_iota(jnp.int32, cand.shape, 0)
        best = jnp.min(key, axis=0)
        arg = (best & (D - 1)).astype(jnp.uint8)
        best = best & ~(D - 1)
        best = lax.bitcast_convert_type(jnp.where(best < 0, best ^ 0x7FFFFFFF, best), jnp.float32)
        return best.reshape(-1, B), arg.reshape(-1, B)
    if impl == "reduce":
        idx = lax.broadcasted_iota(jnp.uint8, cand.shape, 0)

        def smaller(a, b):
            (va, ia), (vb, ib) = a, b
            take = vb < va  # no index tie-break: it defeats vectorization on XLA:CPU
            return jnp.where(take, vb, va), jnp.where(take, ib, ia)

        best, arg = lax.reduce((cand, idx), (jnp.float32(jnp.inf), jnp.uint8(0)), smaller, (0,))
        return best.reshape(-1, B), arg.reshape(-1, B)
    idx = lax.broadcasted_iota(jnp.uint8, (D, 1, 1, 1), 0)
    while cand.shape[0] > 1:
        half = cand.shape[0] // 2
        a, b = cand[:half], cand[half:]
        take = b < a
        cand = jnp.where(take, b, a)
        idx = jnp.where(take, idx[half:], idx[:half])
    return cand.reshape(-1, B), jnp.broadcast_to(idx, cand.shape).reshape(-1, B)


def default_impl(kV: int, V: int = 1, L: int | None = None, n: int | None = None) -> str:
    """The fastest step measured (``scripts/bench_viterbi.py``, 1M weights, ms per 65,536 weights).
    H100: the two-step groups ("pair", 8.9 vs 21.0 ms for the reduction) for the one-value codes
    (1MAD, 3INST) at kV = 2 where they apply (L >= 10, even n; L, n None: assumed to); the packed
    min for the two-value codes (HYB) up to kV = 6 (k = 2: 4.4 vs 4.8 ms, k = 3: 4.3 vs 9.4 ms);
    else the reduction. XLA:CPU: the reduction for D <= 16, else the tree."""
    if jax.default_backend() == "gpu":
        if V == 1 and kV == 2 and (L is None or n is None or _grouping("pair", L, kV, n, strict=False) == 2):
            return "pair"
        return "packed" if V == 2 and kV <= 6 else "reduce"
    return "reduce" if kV <= 4 else "tree"


def default_unroll(impl: str) -> int:
    """Scan unroll on a GPU (H100, ``scripts/bench_viterbi.py``, 1M weights per call): 4 for "pair"
    (1MAD k=2 in one 4096-sequence chunk: 7.74 ms per 65,536 weights against 8.85 at 2 and 12.1 at
    1; later iterations write their costs into the carry's buffer instead of a copy), 2 for "group",
    else 1 (the packed HYB step takes 8.6 instead of 4.4 ms unrolled). 1 off the GPU."""
    if jax.default_backend() != "gpu":
        return 1
    return {"pair": 4, "group": 2}.get(impl, 1)


def _forward(x, m0, vals, sqn, *, L, kV, impl, unroll):
    """x (n, V, B) -> (M_{n-1} (P, B), back-pointers (n, P, B) uint8)."""
    step = functools.partial(_step, vals=vals, sqn=sqn, L=L, kV=kV, impl=impl)

    def body(carry, x_next):
        # x_t arrives through the carry, not as this iteration's slice of xs: a dynamic slice
        # fused into the step's big fusion is re-evaluated per element (5x slower on XLA:CPU).
        m, x_t = carry
        m, bp = step(m, x_t)
        return (m, x_next), bp

    (m, _), bp = lax.scan(body, (m0, x[0]), jnp.roll(x, -1, axis=0), unroll=unroll)
    return m, bp


def _pick(bp_t, p):
    """``bp_t[p_b, b]`` for every sequence b: the stored d of row p."""
    return jnp.take_along_axis(bp_t, p[None, :], axis=0)[0].astype(jnp.int32)


def _backtrace(bp, s_last, *, L, kV):
    """Back-pointers (n, P, B) and the last states (B,) -> states (B, n) int32."""
    P = 1 << (L - kV)

    def back(s, bp_t):  # s_t -> s_{t-1}
        p = s >> kV
        prev = _pick(bp_t, p) * P + p
        return prev, prev

    _, prev = lax.scan(back, s_last, bp[:-1], reverse=True)
    return jnp.concatenate([prev, s_last[None]], axis=0).T


def _solve(x, m0, vals, sqn, overlap, *, L, kV, impl, unroll):
    """One Viterbi pass on x (n, V, B); ``overlap`` (B,) fixes the end state's low bits, or None."""
    if impl in GROUP_STEPS:
        return _solve_grouped(x, m0, vals, overlap, L=L, kV=kV, impl=impl, unroll=unroll)
    P = 1 << (L - kV)
    m_last, bp = _forward(x, m0, vals, sqn, L=L, kV=kV, impl=impl, unroll=unroll)
    p = jnp.argmin(m_last, axis=0).astype(jnp.int32) if overlap is None else overlap
    return _backtrace(bp, _pick(bp[-1], p) * P + p, L=L, kV=kV)


# -- grouped steps ("group", "pair"): S trellis steps per scan iteration, one group of G = D^S
# states per thread --------------------------------------------------------------------------------
#
# With R = P/G, the entries M_{t-1}(u·R + g), u < G, of one row g < R are all that the S steps
# t .. t+S-1 need to produce M_{t+S-1}(g·G + c), c < G: u is the S·kV bits that the S steps shift
# out, c the S·kV bits they shift in. Each output is one joint minimum over the G paths u,
#
#     M_{t+S-1}(g·G + c) = min_u [ M_{t-1}(u·R + g) + sum_sig e_{t+sig}(state_sig(u, g, c)) ],
#
# so no intermediate M is formed (XLA would store it: a multi-output fusion is not fused into its
# consumer) and the step is one loop fusion over (R, B) that reads and writes every cost entry once
# per S steps, each input loaded once by the thread that owns its group. The partial sums over the
# first steps are shared by the outputs that extend them. Costs are sums of (x - c)^2 >= 0, so
# their float bits order as int32 and the argmin u rides in the low S·kV bits of one integer
# minimum (exact up to those mantissa bits, as in "packed"); the key is carried as is. The next
# iteration, which reads the keys of a row group anyway, packs their pointer bits into words
# (S·kV bits per entry, uint8 or uint32 words, i.e. a few 2-bit pointers per byte) that the scan
# stacks: ``ys[i]`` holds the pointers of iteration i - 1, the final keys those of the last.
#
# The carry is one int32 array Z (G, R, B): Z[c, g] = key of M(g·G + c). Row g of the next
# iteration reads Z[g mod G, u·R/G + g // G] for u < G (a transpose of the leading axes, no
# gather); the G outputs are stacked into the next Z (one copy: the trellis' shuffle).

GROUP_STEPS = {"group": 1, "pair": 2}


def _grouping(impl: str, L: int, kV: int, n: int, strict: bool = True) -> int:
    """Steps per iteration of a grouped impl ("pair" falls back to 1 where 2 does not apply);
    0 where none applies and not ``strict``."""
    for S in range(GROUP_STEPS[impl], 0, -1):
        G, P = 1 << (S * kV), 1 << (L - kV)
        if n % S == 0 and S * kV <= 4 and P % (G * G) == 0:
            return S
    if not strict:
        return 0
    raise ValueError(f"no grouped Viterbi step for L={L}, kV={kV} (needs kV <= 4 and L >= 5·kV)")


def _words(G, bits):
    """(number of pointer words per row, their dtype) for G pointers of ``bits`` bits."""
    return -(-G * bits // 32), (jnp.uint8 if G * bits <= 8 else jnp.uint32)


def _group_step(z, x_t, vals, *, L, kV, S):
    """Z (G, R, B) int32 and x for S steps (S, V, B) -> next Z, W pointer words of Z (R, B)."""
    V, B = x_t.shape[1:]
    D, G, P = 1 << kV, 1 << (S * kV), 1 << (L - kV)
    R = P // G
    W, wdt = _words(G, S * kV)
    keys = z.reshape(G, G, R // G, B)
    keys = [keys[:, u].transpose(1, 0, 2).reshape(R, B) for u in range(G)]  # M_{t-1}(u·R + g)
    per_word = G // W
    words = []
    for w in range(W):
        word = None
        for i, u in enumerate(range(w * per_word, (w + 1) * per_word)):
            bits = keys[u] & (G - 1)
            bits = bits if i == 0 else bits << (S * kV * i)
            word = bits if word is None else word | bits
        words.append(word)
    # partial[u][lo] = M_{t-1}(u·R + g) + e over steps 0..sig, lo = n_0..n_sig
    partial = [[lax.bitcast_convert_type(k & ~(G - 1), jnp.float32)] for k in keys]
    for sig in range(S):
        # state at step sig: (u_sig .. u_{S-1}) | g | (n_0 .. n_sig), the top part u mod D^(S-sig)
        tabs = [vals[v].reshape(D ** (S - sig), R, D ** (sig + 1)) for v in range(V)]
        err = {}
        for top in range(D ** (S - sig)):
            for lo in range(D ** (sig + 1)):
                e = None
                for v in range(V):
                    diff = x_t[sig, v][None, :] - tabs[v][top, :, lo][:, None]
                    e = diff * diff if e is None else e + diff * diff
                err[top, lo] = e
        partial = [[partial[u][lo >> kV] + err[u % D ** (S - sig), lo] for lo in range(D ** (sig + 1))]
                   for u in range(G)]
    out = []
    for c in range(G):
        best = None
        for u in range(G):
            key = (lax.bitcast_convert_type(partial[u][c], jnp.int32) & ~(G - 1)) | u
            best = key if best is None else jnp.minimum(best, key)
        out.append(best)
    if jax.default_backend() == "gpu":
        # The barrier keeps the G minima one multi-output fusion: fused into the stack (a
        # concatenate), every output element is computed on its own, rereading the group's inputs
        # G times. (XLA:CPU fuses nothing across it: 15x slower there.)
        out, words = lax.optimization_barrier((out, words))
    return jnp.stack(out), tuple(lax.bitcast_convert_type(w, jnp.uint32).astype(wdt) for w in words)


def _forward_grouped(x, m0, vals, *, L, kV, S, unroll):
    """x (n, V, B), M_{-1} (P, B) -> (final Z (G, R, B), pointer words W x (n/S, R, B))."""
    n, V, B = x.shape
    G = 1 << (S * kV)
    R = m0.shape[0] // G
    z0 = lax.bitcast_convert_type(m0, jnp.int32).reshape(R, G, B).transpose(1, 0, 2)
    xg = x.reshape(n // S, S, V, B)
    step = functools.partial(_group_step, vals=vals, L=L, kV=kV, S=S)

    def body(carry, x_next):
        z, x_t = carry  # x_t via the carry, as in _forward
        z, words = step(z, x_t)
        return (z, x_next), words

    (z, _), words = lax.scan(body, (z0, xg[0]), jnp.roll(xg, -1, axis=0), unroll=unroll)
    return z, words


def _backtrace_grouped(z, words, p_last, *, L, kV, S):
    """Final Z, pointer words and p_{n-1} = s_{n-1} mod P (B,) -> states (B, n)."""
    D, G, P = 1 << kV, 1 << (S * kV), 1 << (L - kV)
    R = P // G
    bits = S * kV
    W, _ = _words(G, bits)
    per_word = G // W
    I = words[0].shape[0]
    B = p_last.shape[0]
    cols = jnp.arange(B)

    def states(u, p):  # joint pointer u of the entry p of an iteration's output -> its S states
        out = [((u & (D - 1)) * P + p)]
        for sig in range(S - 2, -1, -1):
            out.append(((u >> (kV * (S - 1 - sig))) & (D - 1)) * P + (out[-1] >> kV))
        return out[::-1]

    u_last = z[p_last & (G - 1), p_last >> bits, cols] & (G - 1)  # Z[c, g] holds M(g·G + c)
    last = states(u_last, p_last)

    def back(p, i):  # iteration i < I - 1: its pointers are packed in words[.][i + 1]
        g, u = p & (R - 1), p >> (P.bit_length() - 1 - bits)
        w = jnp.zeros_like(p)
        for j in range(W):
            w = jnp.where(u // per_word == j, words[j][i + 1, g, cols].astype(jnp.int32), w)
        s = states((w >> (bits * (u % per_word))) & (G - 1), p)
        return s[0] >> kV, jnp.stack(s)

    _, prev = lax.scan(back, last[0] >> kV, jnp.arange(I - 1), reverse=True)
    st = jnp.concatenate([prev.reshape(-1, B), jnp.stack(last)])
    return st.T


def _solve_grouped(x, m0, vals, overlap, *, L, kV, impl, unroll):
    S = _grouping(impl, L, kV, x.shape[0])
    G = 1 << (S * kV)
    z, words = _forward_grouped(x, m0, vals, L=L, kV=kV, S=S, unroll=unroll)
    if overlap is None:
        m_last = lax.bitcast_convert_type(z & ~(G - 1), jnp.float32).transpose(1, 0, 2)
        overlap = jnp.argmin(m_last.reshape(-1, x.shape[-1]), axis=0).astype(jnp.int32)
    return _backtrace_grouped(z, words, overlap, L=L, kV=kV, S=S)


def _start_costs(overlap, P):
    """M_{-1} (P, B): zero only at p = overlap (tail-biting pass 2)."""
    return jnp.where(jnp.arange(P, dtype=jnp.int32)[:, None] == overlap[None, :], 0.0, UNREACHABLE
                     ).astype(jnp.float32)


def _to_steps(x, V):
    """[B, T] -> [T/V, V, B] float32 (steps, coordinates, batch-minor)."""
    B, T = x.shape
    return jnp.asarray(x, jnp.float32).reshape(B, T // V, V).transpose(1, 2, 0)


@functools.partial(jax.jit, static_argnames=("L", "k", "V", "chunk", "impl", "unroll"))
def _viterbi_chunked(x, overlap, values, *, L, k, V, chunk, impl, unroll):
    kV = k * V
    P = 1 << (L - kV)
    vals, sqn = code_tables(values)
    free = overlap is None

    def solve(args):
        xc, oc = args
        m0 = jnp.zeros((P, xc.shape[0]), jnp.float32) if free else _start_costs(oc, P)
        return _solve(_to_steps(xc, V), m0, vals, sqn, None if free else oc, L=L, kV=kV, impl=impl,
                      unroll=unroll)

    return _map_chunks(solve, x, overlap if not free else jnp.zeros(x.shape[0], jnp.int32), chunk)


@functools.partial(jax.jit, static_argnames=("L", "k", "V", "chunk", "impl", "unroll"))
def _tailbiting_chunked(x, values, *, L, k, V, chunk, impl, unroll):
    kV = k * V
    P = 1 << (L - kV)
    vals, sqn = code_tables(values)

    def solve(args):
        xc, _ = args
        Bc, T = xc.shape
        n = T // V
        half = n // 2
        # Pass 1: rotate by n/2 steps so that the tile's two ends meet mid-sequence.
        rot = jnp.roll(xc, -half * V, axis=1)
        s_rot = _solve(_to_steps(rot, V), jnp.zeros((P, Bc), jnp.float32), vals, sqn, None,
                       L=L, kV=kV, impl=impl, unroll=unroll)
        overlap = s_rot[:, n - half] >> kV  # rotated step n - half is original step 0
        # Pass 2: the original order with s_0 >> kV = overlap = s_{n-1} mod P.
        return _solve(_to_steps(xc, V), _start_costs(overlap, P), vals, sqn, overlap,
                      L=L, kV=kV, impl=impl, unroll=unroll)

    return _map_chunks(solve, x, jnp.zeros(x.shape[0], jnp.int32), chunk)


def _map_chunks(fn, x, aux, chunk):
    """``fn`` over row chunks of ``chunk`` sequences (sequential ``lax.map``), padded, unpadded."""
    B = x.shape[0]
    if B <= chunk:
        return fn((x, aux))
    nchunk = -(-B // chunk)
    pad = nchunk * chunk - B
    x = jnp.pad(x, ((0, pad), (0, 0)))
    aux = jnp.pad(aux, (0, pad))
    out = lax.map(fn, (x.reshape(nchunk, chunk, -1), aux.reshape(nchunk, chunk)))
    return out.reshape(nchunk * chunk, -1)[:B]


def chunk_size(B: int, T: int, *, L: int, k: int, V: int,
               max_backpointer_bytes: int = DEFAULT_MAX_BACKPOINTER_BYTES, impl: str | None = None) -> int:
    """Sequences per chunk so that one chunk's back-pointers fit in the byte budget: one uint8 per
    state and step, or kV bits for the grouped steps (``impl`` "group"/"pair"; None: the default)."""
    n, kV = T // V, k * V
    impl = _impl(impl, kV, V, L, n)
    if impl in GROUP_STEPS:
        S = _grouping(impl, L, kV, n)
        G = 1 << (S * kV)
        W, wdt = _words(G, S * kV)
        per_seq = (n // S) * W * ((1 << (L - kV)) // G) * jnp.dtype(wdt).itemsize
    else:
        per_seq = n << (L - kV)
    return max(1, min(B, max_backpointer_bytes // per_seq))


def viterbi(x: jax.Array, values: jax.Array, *, L: int, k: int, overlap: jax.Array | None = None,
            max_backpointer_bytes: int = DEFAULT_MAX_BACKPOINTER_BYTES, impl: str | None = None,
            unroll: int | None = None) -> jax.Array:
    """Minimum squared-error state paths of the bitshift trellis (one Viterbi pass).

    x: ``[B, T]`` targets in code units; values: ``[2^L, V]`` code values by state.
    overlap: ``[B]`` optional; fixes ``s_0 >> kV = s_{n-1} mod 2^(L-kV) = overlap`` (the
    tail-biting constraint with known overlap bits). Returns ``[B, T/V]`` int32 states.
    impl: the step (``STEP_IMPLS``; None: ``default_impl``); unroll: the scan's (None:
    ``default_unroll``).
    """
    V = _shape_check(x, values, L, k)
    impl = _impl(impl, k * V, V, L, x.shape[1] // V)
    chunk = chunk_size(x.shape[0], x.shape[1], L=L, k=k, V=V, max_backpointer_bytes=max_backpointer_bytes,
                       impl=impl)
    if overlap is not None:
        overlap = jnp.asarray(overlap, jnp.int32)
    return _viterbi_chunked(x, overlap, values, L=L, k=k, V=V, chunk=chunk, impl=impl,
                            unroll=unroll or default_unroll(impl))


def viterbi_tailbiting(x: jax.Array, values: jax.Array, *, L: int, k: int,
                       max_backpointer_bytes: int = DEFAULT_MAX_BACKPOINTER_BYTES,
                       impl: str | None = None, unroll: int | None = None) -> jax.Array:
    """Tail-biting state paths by QTIP's two-pass approximation (App. A): ``[B, T]`` -> ``[B, T/V]``.

    Every returned path satisfies ``s_0 >> kV == s_{n-1} mod 2^(L-kV)``, so its n·kV = T·k stream
    bits (``formats.qtip.pack_stream``) alone determine it. Sequences are processed ``chunk_size`` at a
    time so that back-pointers stay within ``max_backpointer_bytes``.
    """
    V = _shape_check(x, values, L, k)
    impl = _impl(impl, k * V, V, L, x.shape[1] // V)
    chunk = chunk_size(x.shape[0], x.shape[1], L=L, k=k, V=V, max_backpointer_bytes=max_backpointer_bytes,
                       impl=impl)
    return _tailbiting_chunked(x, values, L=L, k=k, V=V, chunk=chunk, impl=impl,
                               unroll=unroll or default_unroll(impl))


def _impl(impl, kV, V, L, n):
    impl = impl or default_impl(kV, V, L, n)
    if impl not in STEP_IMPLS:
        raise ValueError(f"unknown Viterbi step {impl!r}; known: {STEP_IMPLS}")
    if impl in GROUP_STEPS:
        _grouping(impl, L, kV, n)  # raises where no grouped step applies
    return impl


def _shape_check(x, values, L, k) -> int:
    if x.ndim != 2 or values.ndim != 2 or values.shape[0] != 1 << L:
        raise ValueError(f"expected x [B, T] and values [2^L={1 << L}, V], got {x.shape}, {values.shape}")
    V = values.shape[1]
    if x.shape[1] % V:
        raise ValueError(f"sequence length {x.shape[1]} is not a multiple of V={V}")
    _check(L, k * V, x.shape[1] // V)
    return V


def path_cost(x: jax.Array, states: jax.Array, values: jax.Array) -> jax.Array:
    """Squared error per sequence of the reconstruction along ``states``: ``[B]``."""
    B, T = x.shape
    rec = jnp.asarray(values, jnp.float32)[states].reshape(B, T)
    return jnp.sum((x - rec) ** 2, axis=1)

