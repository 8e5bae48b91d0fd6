"""Hadamard matrices of real model widths and the randomized Hadamard transform (RHT).

A width ``n = K * 2**p`` is transformed by ``A_n = (H_K ⊗ H_{2^p}) / sqrt(n)``: a fast
Walsh-Hadamard transform for the power-of-two part (O(n log n), reshapes only) and one K×K
matmul. QuIP# (Tseng et al. 2024, §3) and QTIP use it for incoherence processing.

H_K is built by code, never stored:
- Paley I (q ≡ 3 mod 4 a prime power, order q+1) and Paley II (q ≡ 1 mod 4, order 2(q+1)), with
  the quadratic character of GF(p^m) computed from a primitive polynomial found by search;
- Williamson (order 4w): symmetric circulant A, B, C, D with A²+B²+C²+D² = 4wI, found by a
  meet-in-the-middle search over sequences invariant under a multiplicative subgroup of Z_w^*
  that contains -1 (Ðoković's restriction), plugged into the Williamson array;
- Goethals-Seidel (order 12w): the T-matrices of order 3 combined with Williamson matrices of
  order w (Cooper-Wallis), which for 3 ∤ w are circulant of order 3w by the CRT;
- Kronecker products of the above.
Llama needs K ∈ {12, 20, 28, 36, 52, 60, 108, 140, 156, 172}; ``hadamard_construction`` names
the recipe used for any width. Where no Hadamard factor exists, K is the odd part of n and H_K is
a seeded random orthogonal matrix scaled by sqrt(K) (QuIP# reports < 0.1 ppl loss for such
non-Hadamard incoherence). Dense factors are limited to K ≤ MAX_K; only when the odd part of n
exceeds it does this module raise, and ``padded_width`` names the nearest larger width with an
exact Hadamard factor (zero padding is the caller's choice).
"""
from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

MAX_K = 4096  # largest dense K×K factor, Hadamard or random orthogonal (64 MiB in float32)
_MAX_SEARCH_ORBITS = 12  # Williamson search: at most 2**12 candidate sequences per order
_MAX_SEARCH_PAIRS = 500_000
_MAX_WILLIAMSON_W = 255


# ----------------------------------------------------------------------------- finite fields
def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, m) with q = p**m, p prime; None otherwise."""
    if q < 2:
        return None
    for p in range(2, math.isqrt(q) + 1):
        if q % p == 0:
            m = 0
            while q % p == 0:
                q //= p
                m += 1
            return (p, m) if q == 1 else None
    return q, 1


@functools.cache
def _gf_tables(q: int) -> tuple[np.ndarray, np.ndarray]:
    """For GF(q), q = p^m: elements are ints 0..q-1 whose base-p digits are polynomial
    coefficients. Returns (digits [q, m], chi [q]) with chi the quadratic character."""
    p, m = _prime_power(q)
    digits = (np.arange(q)[:, None] // p ** np.arange(m)) % p
    # A primitive polynomial x^m - c(x): x then has order q-1, so GF(p)[x]/(f) is a field.
    for coeffs in itertools.product(range(p), repeat=m):
        if coeffs[0] == 0:
            continue
        power = np.zeros(m, np.int64)
        power[0] = 1
        seen = np.zeros(q, bool)
        log = np.zeros(q, np.int64)
        for k in range(q - 1):
            idx = int(power @ p ** np.arange(m))
            if seen[idx]:
                break
            seen[idx], log[idx] = True, k
            top = power[-1]
            power = np.concatenate([[0], power[:-1]])  # multiply by x
            power = (power + top * np.asarray(coeffs)) % p  # x^m = c(x)
        else:
            chi = np.where(log % 2 == 0, 1, -1)
            chi[0] = 0
            return digits, chi
    raise AssertionError(f"no primitive polynomial found for GF({q})")


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) over GF(q)."""
    p, _ = _prime_power(q)
    digits, chi = _gf_tables(q)
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[diff @ p ** np.arange(digits.shape[1])]


def _paley1(q: int) -> np.ndarray:
    """Order q+1 for a prime power q ≡ 3 (mod 4): I + [[0, 1ᵀ], [-1, Q]] (Q skew)."""
    s = np.zeros((q + 1, q + 1), np.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return s + np.eye(q + 1, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    """Order 2(q+1) for a prime power q ≡ 1 (mod 4) from the symmetric conference matrix."""
    c = np.zeros((q + 1, q + 1), np.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    return np.kron(c, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]])


# ----------------------------------------------------------------------------- Williamson
def _circulant(seq: np.ndarray) -> np.ndarray:
    n = len(seq)
    return seq[(np.arange(n)[None, :] - np.arange(n)[:, None]) % n]


def _subgroup_orbits(w: int, gens: tuple[int, ...]) -> list[list[int]]:
    group, frontier = {1}, [1]
    while frontier:
        g = frontier.pop()
        for h in gens:
            if (x := g * h % w) not in group:
                group.add(x)
                frontier.append(x)
    seen, orbits = set(), []
    for x in range(w):
        if x not in seen:
            orbit = sorted({g * x % w for g in group})
            seen.update(orbit)
            orbits.append(orbit)
    return orbits


def _williamson_search(w: int, orbits: list[list[int]]):
    """Four ±1 sequences, constant on the orbits, with PAF_A+PAF_B+PAF_C+PAF_D = 0 off zero."""
    r = len(orbits)
    member = np.zeros((r, w))
    for i, orbit in enumerate(orbits):
        member[i, orbit] = 1
    bits = (np.arange(2**r)[:, None] >> np.arange(r)) & 1
    seqs = (1 - 2 * bits) @ member
    psd = np.abs(np.fft.fft(seqs, axis=1)) ** 2
    keep = (psd <= 4 * w + 1e-6).all(axis=1)  # PSD test: each PSD is at most the total 4w
    seqs, psd = seqs[keep], psd[keep]
    paf = np.rint(np.fft.ifft(psd, axis=1).real).astype(np.int64)
    reps = [orbit[0] for orbit in orbits if orbit[0] != 0]  # PAF is constant on orbits too
    i, j = np.triu_indices(len(seqs))
    ok = ((psd[i] + psd[j]) <= 4 * w + 1e-6).all(axis=1)
    i, j = i[ok], j[ok]
    if len(i) > _MAX_SEARCH_PAIRS:
        return None
    sums = np.ascontiguousarray(paf[i][:, reps] + paf[j][:, reps])
    row = np.dtype((np.void, sums.dtype.itemsize * sums.shape[1]))
    _, ab, cd = np.intersect1d(sums.view(row).ravel(), np.ascontiguousarray(-sums).view(row).ravel(),
                               return_indices=True)
    if len(ab) == 0:
        return None
    return seqs[i[ab[0]]], seqs[j[ab[0]]], seqs[i[cd[0]]], seqs[j[cd[0]]]


@functools.cache
def _williamson_sequences(w: int):
    """Williamson sequences of odd order w, or None if the restricted search finds none."""
    if w == 1:
        one = np.ones(1, np.int64)
        return one, one, one, one
    if w > _MAX_WILLIAMSON_W:
        return None
    searched = set()
    candidates = []
    for g in range(2, w - 1):
        if math.gcd(g, w) == 1:
            orbits = _subgroup_orbits(w, (w - 1, g))
            key = tuple(map(tuple, orbits))
            if len(orbits) <= _MAX_SEARCH_ORBITS and key not in searched:
                searched.add(key)
                candidates.append(orbits)
    orbits = _subgroup_orbits(w, (w - 1,))
    if len(orbits) <= _MAX_SEARCH_ORBITS and tuple(map(tuple, orbits)) not in searched:
        candidates.append(orbits)
    for orbits in sorted(candidates, key=len):  # fewest orbits first: the cheapest searches
        found = _williamson_search(w, orbits)
        if found is not None:
            return tuple(np.asarray(s, np.int64) for s in found)
    return None


def _williamson_array(a, b, c, d) -> np.ndarray:
    a, b, c, d = (_circulant(s) for s in (a, b, c, d))
    return np.block([[a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a]])


def _goethals_seidel(x1, x2, x3, x4) -> np.ndarray:
    """GS array for circulant X1..X4 with ΣXXᵀ = 4vI (R = back-identity)."""
    v = len(x1)
    r = np.eye(v, dtype=np.int64)[::-1]
    a, b, c, d = (_circulant(s) for s in (x1, x2, x3, x4))
    return np.block([[a, b @ r, c @ r, d @ r],
                     [-b @ r, a, d.T @ r, -c.T @ r],
                     [-c @ r, -d.T @ r, a, b.T @ r],
                     [-d @ r, c.T @ r, -b.T @ r, a]])


def _t3_williamson(w: int) -> np.ndarray:
    """Order 12w: T-matrices of order 3 (T_i = shift by i-1, T4 = 0) times Williamson of order w,
    one circulant of order 3w each by the CRT (3 ∤ w), in the Goethals-Seidel array."""
    a, b, c, d = _williamson_sequences(w)
    rows = [(a, b, c), (-b, a, -d), (-c, d, a), (-d, -c, b)]  # Williamson array, T4 column dropped
    k = np.arange(3 * w)
    xs = [np.choose(k % 3, [part[k % w] for part in row]) for row in rows]
    return _goethals_seidel(*xs)


# ----------------------------------------------------------------------------- recipes
@functools.cache
def _recipe(k: int) -> tuple | None:
    """How to build a Hadamard matrix of order k, or None if no construction here applies."""
    if k in (1, 2):
        return ("sylvester", k)
    if k % 4:
        return None
    if k & (k - 1) == 0:
        return ("sylvester", k)
    if _prime_power(k - 1) and (k - 1) % 4 == 3:
        return ("paley1", k - 1)
    if k % 8 == 4 and _prime_power(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return ("paley2", k // 2 - 1)
    if k % 12 == 0 and (k // 12) % 2 and (k // 12) % 3 and _williamson_sequences(k // 12) is not None:
        return ("goethals-seidel", k // 12)
    if (k // 4) % 2 and _williamson_sequences(k // 4) is not None:
        return ("williamson", k // 4)
    for a in range(4, math.isqrt(k) + 1, 4):
        if k % a == 0 and (k // a) % 4 == 0 and _recipe(a) and _recipe(k // a):
            return ("kronecker", a, k // a)
    if k % 8 == 0 and _recipe(k // 2):
        return ("kronecker", 2, k // 2)
    return None


def _describe(recipe: tuple) -> str:
    kind = recipe[0]
    if kind == "sylvester":
        return f"sylvester({recipe[1]})"
    if kind in ("paley1", "paley2"):
        return f"{kind}(q={recipe[1]})"
    if kind == "williamson":
        return f"williamson(w={recipe[1]})"
    if kind == "goethals-seidel":
        return f"goethals-seidel(T3 x williamson(w={recipe[1]}))"
    return f"{_describe(_recipe(recipe[1]))} ⊗ {_describe(_recipe(recipe[2]))}"


@functools.cache
def _build(k: int) -> np.ndarray:
    recipe = _recipe(k)
    if recipe is None:
        raise ValueError(f"no Hadamard construction of order {k}")
    kind = recipe[0]
    if kind == "sylvester":
        h = np.ones((1, 1), np.int64)
        while len(h) < k:
            h = np.kron([[1, 1], [1, -1]], h)
    elif kind == "paley1":
        h = _paley1(recipe[1])
    elif kind == "paley2":
        h = _paley2(recipe[1])
    elif kind == "williamson":
        h = _williamson_array(*_williamson_sequences(recipe[1]))
    elif kind == "goethals-seidel":
        h = _t3_williamson(recipe[1])
    else:
        h = np.kron(_build(recipe[1]), _build(recipe[2]))
    hf = h.astype(np.float64)  # exact: integer sums below 2**53
    if not np.array_equal(hf @ hf.T, k * np.eye(k)):  # every build is verified
        raise AssertionError(f"{_describe(recipe)} did not give a Hadamard matrix")
    h.setflags(write=False)
    return h


# ----------------------------------------------------------------------------- public API
@functools.cache
def hadamard_factors(n: int) -> tuple[int, int]:
    """(K, p) with n = K * 2**p and K as small as the constructions allow.

    K is an exact Hadamard order when one of the constructions reaches ``odd(n) * 2**j``;
    otherwise K is the odd part of n and its factor is a random orthogonal matrix.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"Hadamard width must be a positive int, got {n!r}")
    n = int(n)
    s = (n & -n).bit_length() - 1
    m = n >> s
    if m == 1:
        return 1, s
    for j in range(2, s + 1):
        if (m << j) <= MAX_K and _recipe(m << j) is not None:
            return m << j, s - j
    if m > MAX_K:
        raise ValueError(
            f"width {n} = {m} * 2**{s}: no Hadamard factor of order <= {MAX_K} and the odd part "
            f"{m} exceeds the random-orthogonal limit; pad to padded_width({n}) = {padded_width(n)}")
    return m, s


def hadamard_construction(n: int) -> str:
    """Human-readable recipe of ``A_n``, e.g. ``'paley1(q=11) ⊗ sylvester(16)'``."""
    k, p = hadamard_factors(n)
    recipe = _recipe(k)
    head = _describe(recipe) if recipe else f"random-orthogonal({k})"
    if k == 1 or p == 0:
        return f"sylvester({2**p})" if k == 1 else head
    return f"{head} ⊗ sylvester({2**p})"


def is_exact_hadamard(n: int) -> bool:
    """True when ``A_n`` is a true (±1) Hadamard matrix, not the random-orthogonal fallback."""
    return _recipe(hadamard_factors(n)[0]) is not None


def padded_width(n: int, *, max_k: int = 256) -> int:
    """The smallest width ≥ n with an exact Hadamard factor K ≤ max_k (for zero padding)."""
    n2 = n
    while True:
        s = (n2 & -n2).bit_length() - 1
        m = n2 >> s
        if m == 1 or any((m << j) <= max_k and _recipe(m << j) is not None for j in range(2, s + 1)):
            return n2
        n2 += 1


@functools.cache
def _factor(k: int, seed: int) -> np.ndarray:
    if _recipe(k) is not None:
        out = _build(k).astype(np.float64)
    else:
        q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((k, k)))
        out = q * np.sign(np.diag(r)) * math.sqrt(k)  # Haar distributed, scaled like H_K
    out.setflags(write=False)
    return out


def hadamard_factor(k: int, *, seed: int = 0) -> np.ndarray:
    """The K×K factor (float64, H Hᵀ = K I): a Hadamard matrix, or the scaled random fallback."""
    return _factor(int(k), int(seed))


def hadamard_matrix(n: int, *, seed: int = 0) -> np.ndarray:
    """Dense H_K ⊗ H_{2^p} with H Hᵀ = n I (float64). For tests and small widths."""
    k, p = hadamard_factors(n)
    return np.kron(hadamard_factor(k, seed=seed), _build(2**p).astype(np.float64))


def random_signs(key: jax.Array, n: int) -> jax.Array:
    """n independent ±1 (float32)."""
    return jax.random.rademacher(key, (n,), dtype=jnp.float32)


def _fwht(x: jax.Array) -> jax.Array:
    """Unnormalized Sylvester-ordered Walsh-Hadamard transform of the last axis (a power of 2)."""
    n = x.shape[-1]
    batch = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*batch, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*batch, n)
        h *= 2
    return x


def _apply(x: jax.Array, *, transpose: bool, seed: int) -> jax.Array:
    """x @ A_n (or x @ A_nᵀ) along the last axis."""
    n = x.shape[-1]
    k, p = hadamard_factors(n)
    y = _fwht(x.reshape(*x.shape[:-1], k, 2**p))  # H_{2^p} is symmetric
    if k > 1:
        hk = jnp.asarray(hadamard_factor(k, seed=seed), y.dtype)
        y = jnp.einsum("...ij,ik->...kj" if not transpose else "...ij,ki->...kj", y, hk,
                       precision=jax.lax.Precision.HIGHEST)
    return (y * (1.0 / math.sqrt(n))).reshape(x.shape)


def _compute_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


@functools.partial(jax.jit, static_argnames=("seed",))
def rht(x: jax.Array, signs: jax.Array, *, seed: int = 0) -> jax.Array:
    """Randomized Hadamard transform along the last axis: ``(x * signs) @ A_n``.

    ``seed`` only matters for widths that use the random-orthogonal fallback factor.
    """
    x = jnp.asarray(x)
    y = x.astype(_compute_dtype(x)) * signs.astype(_compute_dtype(x))
    return _apply(y, transpose=False, seed=seed).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("seed",))
def rht_inverse(y: jax.Array, signs: jax.Array, *, seed: int = 0) -> jax.Array:
    """Exact inverse of ``rht``: ``(y @ A_nᵀ) * signs``."""
    y = jnp.asarray(y)
    x = _apply(y.astype(_compute_dtype(y)), transpose=True, seed=seed)
    return (x * signs.astype(x.dtype)).astype(y.dtype)
