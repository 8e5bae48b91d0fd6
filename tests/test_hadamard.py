"""Hadamard constructions and the randomized Hadamard transform."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import hadamard as had

LLAMA_K = [12, 20, 28, 36, 52, 60, 108, 140, 156, 172]
# Linear in/out widths: Llama-2-7B/13B/70B, Llama-3-8B, SmolLM2-135M (k/v project 576 -> 192).
MODEL_WIDTHS = [4096, 11008, 5120, 13824, 8192, 28672, 1024, 14336, 576, 1536, 192]


@pytest.mark.parametrize("k", LLAMA_K)
def test_llama_k_are_hadamard(k):
    h = had.hadamard_factor(k)
    assert h.shape == (k, k)
    assert set(np.unique(h)) == {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, k * np.eye(k))
    assert "random" not in had.hadamard_construction(k)


def test_small_orders_cover_constructions():
    # Paley I over a prime and a prime power, Paley II over a prime power, Williamson, GS, Kronecker.
    for k, kind in [(12, "paley1"), (28, "paley1(q=27)"), (52, "paley2(q=25)"), (172, "williamson"),
                    (156, "goethals-seidel"), (1904, "paley1(q=27) ⊗ paley1(q=67)")]:
        assert kind in had.hadamard_construction(k)
        h = had.hadamard_factor(had.hadamard_factors(k)[0])
        np.testing.assert_array_equal(h @ h.T, len(h) * np.eye(len(h)))


@pytest.mark.parametrize("n", MODEL_WIDTHS)
def test_model_widths_get_orthogonal_transform(n):
    k, p = had.hadamard_factors(n)
    assert k * 2**p == n and had.is_exact_hadamard(n)
    hk = had.hadamard_factor(k)
    np.testing.assert_array_equal(hk @ hk.T, k * np.eye(k))
    # The fast transform preserves the Gram matrix of random vectors and inverts exactly.
    key = jax.random.key(n)
    x = jax.random.normal(key, (8, n), jnp.float32)
    signs = had.random_signs(jax.random.fold_in(key, 1), n)
    y = had.rht(x, signs)
    np.testing.assert_allclose(y @ y.T, x @ x.T, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(had.rht_inverse(y, signs), x, atol=2e-5)


@pytest.mark.parametrize("n", [8, 192, 576, 1536, 20 * 8, 7, 3 * 5 * 7 * 2, 100])
def test_rht_matches_dense(n):
    rng = np.random.default_rng(n)
    h = had.hadamard_matrix(n, seed=3)
    np.testing.assert_allclose(h @ h.T, n * np.eye(n), atol=1e-9)
    x = rng.standard_normal((3, 2, n))
    signs = had.random_signs(jax.random.key(n), n)
    s = np.asarray(signs, np.float64)
    y = had.rht(jnp.asarray(x, jnp.float32), signs, seed=3)
    np.testing.assert_allclose(y, (x * s) @ h / np.sqrt(n), atol=2e-5)
    np.testing.assert_allclose(had.rht_inverse(jnp.asarray(x, jnp.float32), signs, seed=3),
                               (x @ h.T / np.sqrt(n)) * s, atol=2e-5)


def test_fallback_is_reported_and_seeded():
    n = 3 * 5 * 7 * 2  # odd part 105: no Hadamard of order 420 or 210 here
    assert "random-orthogonal" in had.hadamard_construction(n)
    assert not had.is_exact_hadamard(n)
    assert not np.allclose(had.hadamard_matrix(n, seed=0), had.hadamard_matrix(n, seed=1))


def test_error_names_padding_when_nothing_applies():
    n = 8191  # prime, larger than the random-orthogonal limit
    with pytest.raises(ValueError, match="padded_width"):
        had.hadamard_factors(n)
    assert had.padded_width(n) == 8192
    assert had.padded_width(11007) == 11008


def test_rht_jit_dtype_and_signs():
    signs = had.random_signs(jax.random.key(0), 1536)
    assert set(np.unique(np.asarray(signs))) == {-1.0, 1.0}
    assert abs(float(signs.mean())) < 0.15
    x = jax.random.normal(jax.random.key(1), (4, 1536), jnp.bfloat16)
    y = jax.jit(had.rht)(x, signs)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(had.rht(x.astype(jnp.float32), signs)),
                               np.asarray(y, np.float32), rtol=0.02, atol=0.03)
