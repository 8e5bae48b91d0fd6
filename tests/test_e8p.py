"""E8P12 codebook, its exact search, the E8 1-bit set, RVQ, and the Gaussian distortion."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.codebooks import e8p
from jaxquant.codebooks.bench import gaussian_mse


def _in_e8(z: np.ndarray) -> np.ndarray:
    """Rows of z in E8 = D8 ∪ (D8 + ½)."""
    twice = 2 * z
    integral = np.isclose(twice, np.rint(twice)).all(1)
    t = np.rint(twice).astype(np.int64)
    all_int = (t % 2 == 0).all(1)
    all_half = (t % 2 != 0).all(1)
    even_sum = (t.sum(1) // 2) % 2 == 0
    return integral & (all_int | all_half) & even_sum


def test_source_set_from_definition():
    s = e8p.e8p_source_set()
    assert s.shape == (256, 8) and len(np.unique(s, axis=0)) == 256
    n2 = (s**2).sum(1)
    grid = np.array(list(itertools.product([0.5, 1.5, 2.5], repeat=8)))
    inner = {tuple(r) for r in grid[(grid**2).sum(1) <= 10]}
    assert len(inner) == 227 and {tuple(r) for r in s[n2 <= 10]} == inner
    outer = s[n2 > 10]
    assert len(outer) == 29 and np.all(n2[n2 > 10] == 12)
    assert np.all((outer == 1.5).sum(1) == 5) and np.all((outer == 0.5).sum(1) == 3)


def test_codewords_distinct_in_shifted_e8_and_match_definition():
    cw = e8p.e8p_codewords()
    assert cw.shape == (2**16, 8) and len(np.unique(cw, axis=0)) == 2**16
    assert _in_e8(cw.astype(np.float64) - 0.25).all()
    # Built independently: v ± ¼ for v in D̂8 (half-integers, even sum) with |v| in S.
    signs = np.array(list(itertools.product([1, -1], repeat=8)))
    built = []
    for a in e8p.e8p_source_set():
        v = signs * a
        v = v[np.rint(v.sum(1)).astype(int) % 2 == 0]
        built += [v + 0.25, v - 0.25]
    built = np.concatenate(built)
    assert len(built) == 2**16
    assert {tuple(r) for r in built} == {tuple(r) for r in cw.astype(np.float64)}
    np.testing.assert_array_equal(np.asarray(e8p.e8p_decode(jnp.arange(2**16, dtype=jnp.uint16))), cw)


def test_code_layout():
    cw = e8p.e8p_codewords()
    c = np.arange(2**16)
    np.testing.assert_array_equal(cw[:, :7] < 0, ((c[:, None] >> (8 + np.arange(7))) & 1) == 1)
    np.testing.assert_array_equal(np.abs(cw - np.where(c >> 15, 0.25, -0.25)[:, None]),
                                  e8p.e8p_source_set()[c & 0xFF])


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_search_equals_bruteforce(scale):
    key = jax.random.key(int(scale * 10))
    x = scale * jax.random.normal(key, (3000, 8))
    x = x.at[:8].set(jnp.asarray(e8p.e8p_codewords()[:8]) + 1e-3)  # near codewords too
    codes, q = jax.jit(e8p.e8p_quantize)(x)
    codes_bf, q_bf = e8p.e8p_quantize_bruteforce(x)
    d, d_bf = jnp.sum((x - q) ** 2, -1), jnp.sum((x - q_bf) ** 2, -1)
    np.testing.assert_allclose(d, d_bf, rtol=1e-5, atol=1e-6)
    assert float(jnp.mean(codes == codes_bf)) > 0.999  # differ only on exact ties
    np.testing.assert_array_equal(e8p.e8p_decode(codes), q)


def test_search_batched_shapes_and_chunks():
    x = jax.random.normal(jax.random.key(7), (3, 50, 8))
    codes, q = e8p.e8p_quantize(x, chunk=16)
    c2, q2 = e8p.e8p_quantize(x.reshape(-1, 8))
    assert codes.shape == (3, 50) and codes.dtype == jnp.uint16 and q.shape == x.shape
    np.testing.assert_array_equal(codes.reshape(-1), c2)


def test_e8_onebit_set():
    cb = e8p.e8_onebit_codebook()
    assert cb.shape == (256, 8) and len(np.unique(cb, axis=0)) == 256
    assert _in_e8(cb.astype(np.float64)).all()
    n2 = (cb**2).sum(1)
    assert (n2 == 0).sum() == 1 and (n2 == 2).sum() == 240 and (n2 == 4).sum() == 15
    x = jax.random.normal(jax.random.key(3), (500, 8))
    codes, q = e8p.e8_onebit_quantize(x)
    d_all = ((np.asarray(x)[:, None, :] - cb[None]) ** 2).sum(-1)
    np.testing.assert_allclose(((x - q) ** 2).sum(-1), d_all.min(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["e8p", "e8p-rvq3", "e8p-rvq4"])
def test_codebook_decode_roundtrip(name):
    cb = e8p.get_codebook(name)
    x = cb.opt_scale * jax.random.normal(jax.random.key(11), (2000, 8))
    codes, q = jax.jit(cb.quantize)(x)
    assert tuple(c.dtype for c in codes) == cb.code_dtypes
    assert sum(np.dtype(c.dtype).itemsize * 8 for c in codes) == 8 * cb.bits
    np.testing.assert_allclose(cb.decode(codes), q, atol=1e-6)


# Published (QuIP# Table 1, REFERENCE §7): E8P ≈ 0.0917 measured, RVQ3 ≈ 0.0296, RVQ4 ≈ 0.0089.
@pytest.mark.parametrize("name,bound,samples", [("e8p", 0.092, 2**19), ("e8p-rvq3", 0.030, 2**18),
                                                 ("e8p-rvq4", 0.0090, 2**17)])
def test_gaussian_mse(name, bound, samples):
    r = gaussian_mse(name, samples, seed=np.random.SeedSequence().entropy % 2**31, tol=0.01)
    assert r["mse"] <= bound, r
    assert abs(r["scale"] - e8p.get_codebook(name).opt_scale) < 0.08, r


@pytest.mark.slow
@pytest.mark.parametrize("name,bound", [("e8p", 0.092), ("e8p-rvq3", 0.030), ("e8p-rvq4", 0.0090)])
def test_gaussian_mse_large(name, bound):
    r = gaussian_mse(name, 2**22, seed=1)
    assert r["mse"] <= bound, r
