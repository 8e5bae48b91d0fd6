"""The shared error-feedback core against a float64 numpy implementation of the GPTQ recursion."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.methods import ldlq as core


def random_hessian(rng, n, samples=None, scale_spread=1.0):
    """A random SPD second moment ``XᵀX / m`` with correlated, unevenly scaled inputs."""
    m = samples or 4 * n
    X = rng.standard_normal((m, n)) @ (np.eye(n) + 0.3 * rng.standard_normal((n, n)))
    X *= np.exp(scale_spread * rng.standard_normal(n))
    return X.T @ X / m


def float32_factorable_hessian(rng, n):
    """A random_hessian whose float32 factorization needs no extra damping, and that factor: a
    damped U quantizes against another H than the float64 reference (random H reach cond 1e10;
    about 1 draw in 200 needs the damping, and then most codes differ)."""
    while True:
        H = random_hessian(rng, n)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            try:
                return H, core.inverse_cholesky_upper(jnp.asarray(H, jnp.float32))
            except RuntimeWarning:
                continue


def numpy_gptq(W, H, quantize, block_size, U=None):
    """float64 reference: plain (non-lazy) recursion with U from numpy's inverse and Cholesky (or the
    given factor)."""
    W = np.array(W, np.float64)
    U = np.linalg.cholesky(np.linalg.inv(H)).T if U is None else np.asarray(U, np.float64)
    Q = np.zeros_like(W)
    n = W.shape[1]
    for s in range(0, n, block_size):
        B = slice(s, s + block_size)
        Q[:, B] = quantize(W[:, B])
        err = np.linalg.solve(U[B, B].T, (W[:, B] - Q[:, B]).T).T  # (x − q) U_BB⁻¹
        W[:, s + block_size:] -= err @ U[B, s + block_size:]
    return Q


def smooth_quantizer(x):
    # Nonlinear but continuous: float32 and float64 runs stay close (no rounding flips).
    xp = jnp if isinstance(x, jax.Array) else np
    return x - 0.4 * xp.sin(2.0 * x)


def test_prepare_hessian_dead_inputs_and_damping():
    rng = np.random.default_rng()
    n = 24
    H = random_hessian(rng, n)
    dead_idx = rng.choice(n, 3, replace=False)
    H[dead_idx, :] = 0
    H[:, dead_idx] = 0
    Hd, dead = core.prepare_hessian(H, damp=0.05)
    Hd, dead = np.asarray(Hd), np.asarray(dead)
    assert Hd.dtype == np.float32 and set(np.flatnonzero(dead)) == set(dead_idx)
    ref = H.copy()
    ref[dead_idx, dead_idx] = 1.0
    ref += 0.05 * np.mean(np.diag(ref)) * np.eye(n)
    np.testing.assert_allclose(Hd, ref, rtol=1e-5, atol=1e-6)
    assert np.linalg.eigvalsh(Hd.astype(np.float64)).min() > 0


def test_inverse_cholesky_upper_matches_float64():
    rng = np.random.default_rng()
    n = 40
    H = random_hessian(rng, n)
    U = np.asarray(core.inverse_cholesky_upper(H.astype(np.float32)), np.float64)
    U_ref = np.linalg.cholesky(np.linalg.inv(H)).T
    assert np.allclose(U, np.triu(U)) and (np.diag(U) > 0).all()
    # fp32 factorization error grows with the condition number (random H reach cond 1e9)
    bound = max(2e-4, 0.05 * np.linalg.cond(H) * np.finfo(np.float32).eps)
    assert np.abs(U - U_ref).max() <= bound * np.abs(U_ref).max()


@pytest.mark.parametrize("block_size,lazy_batch", [(1, 8), (1, 10), (1, 128), (4, 12), (8, 16), (3, 9)])
def test_ldlq_matches_numpy_recursion(block_size, lazy_batch):
    rng = np.random.default_rng()
    out, n = 12, 48
    H, U = float32_factorable_hessian(rng, n)
    W = rng.standard_normal((out, n))
    # the float32 factor drives the float64 recursion too: the lazy batches are what is compared
    # (numpy's own factor differs by up to ~3e-3 of max |Q| at the H's condition numbers drawn here;
    # one CI run in many crossed 2e-3), leaving ~2e-6 of float32 rounding
    Q_ref = numpy_gptq(W, H, smooth_quantizer, block_size, U=U)
    W_hat, ks = jax.jit(lambda W, U: core.ldlq(
        W, U, lambda x, k: (smooth_quantizer(x), k), block_size=block_size,
        lazy_batch=lazy_batch))(jnp.asarray(W, jnp.float32), U)
    np.testing.assert_array_equal(np.asarray(ks), np.arange(n // block_size))
    np.testing.assert_allclose(np.asarray(W_hat), Q_ref, atol=1e-4 * np.abs(Q_ref).max())


@pytest.mark.parametrize("block_size", [1, 4])
def test_ldlq_rounding_quantizer_and_loss_decomposition(block_size):
    """With a rounding grid the float32 run agrees with float64 on (nearly) every row, and the
    proxy loss equals Σ_B ‖(X_B − Q_B) U_BB⁻¹‖² (the LDL identity the feedback is built on)."""
    rng = np.random.default_rng()
    out, n = 16, 48
    H, U = float32_factorable_hessian(rng, n)
    W = rng.standard_normal((out, n))
    grid = lambda x: np.round(x * 2) / 2  # noqa: E731
    Q_ref = numpy_gptq(W, H, grid, block_size)
    W_hat, X = core.ldlq(jnp.asarray(W, jnp.float32), U, lambda x, k: (jnp.round(x * 2) / 2, x),
                         block_size=block_size, lazy_batch=16)
    W_hat = np.asarray(W_hat, np.float64)
    # fp32 may flip a rare tie, and the feedback carries the difference along that row (one flip cost
    # 20 of 768 codes in a CI run); rows are independent, so all but one or two match exactly
    assert np.mean(np.any(W_hat != Q_ref, axis=1)) <= 2 / out
    # X: [blocks, out, b] values at quantization time.
    A = np.asarray(core.block_metric_factor(U, block_size), np.float64)
    E = np.asarray(X, np.float64) - np.moveaxis(W_hat.reshape(out, -1, block_size), 1, 0)
    decomposed = np.einsum("kob,kbc->koc", E, A)
    loss = core.proxy_loss(W, W_hat, H)
    np.testing.assert_allclose(loss, np.sum(decomposed**2), rtol=1e-3)


def test_ldlq_beats_rounding_without_feedback():
    rng = np.random.default_rng()
    out, n = 32, 64
    H = random_hessian(rng, n, samples=n // 2 + 8)  # strongly correlated inputs
    Hd, _ = core.prepare_hessian(H)
    W = jnp.asarray(rng.standard_normal((out, n)), jnp.float32)
    U = core.inverse_cholesky_upper(Hd)
    W_hat, _ = core.ldlq(W, U, lambda x, k: (jnp.round(x), None), block_size=1)
    assert core.proxy_loss(W, W_hat, Hd) < 0.8 * core.proxy_loss(W, jnp.round(W), Hd)


def test_batch_setup_sees_updated_columns():
    """batch_setup receives each lazy batch after all earlier feedback; its ctx is stacked."""
    rng = np.random.default_rng()
    out, n, lb = 8, 24, 8
    H = random_hessian(rng, n)
    W = rng.standard_normal((out, n))
    U = core.inverse_cholesky_upper(jnp.asarray(H, jnp.float32))
    W_hat, (ctx, xs) = core.ldlq(jnp.asarray(W, jnp.float32), U,
                                 lambda x, k, c: (smooth_quantizer(x), x), block_size=1,
                                 lazy_batch=lb, batch_setup=lambda Wb, j: Wb)
    ctx, xs = np.asarray(ctx), np.asarray(xs)
    assert ctx.shape == (n // lb, out, lb) and xs.shape == (n, out, 1)
    for j in range(n // lb):  # the first column of each batch is quantized as given
        np.testing.assert_allclose(ctx[j][:, 0], xs[j * lb, :, 0], rtol=1e-6)


def test_singular_hessian_damped_not_nan():
    rng = np.random.default_rng()
    n = 32
    X = rng.standard_normal((5, n))  # rank 5
    X[:, :4] = 0  # four dead inputs
    H = X.T @ X
    W = rng.standard_normal((8, n)).astype(np.float32)
    Hd, dead = core.prepare_hessian(H)
    assert np.asarray(dead)[:4].all()
    U = core.inverse_cholesky_upper(Hd)
    W = jnp.where(dead[None, :], 0.0, W)
    W_hat, _ = core.ldlq(W, U, lambda x, k: (jnp.round(x), None), block_size=1)
    assert np.isfinite(np.asarray(U)).all() and np.isfinite(np.asarray(W_hat)).all()
    assert np.isfinite(core.proxy_loss(W, W_hat, H))


def test_indefinite_hessian_retries_with_more_damping():
    rng = np.random.default_rng()
    n = 16
    H = random_hessian(rng, n)
    H[3, 3] = -0.5 * np.mean(np.diag(H))  # not PSD: damp 0.01 is not enough, 10× more is
    H = H.astype(np.float32)
    with pytest.warns(RuntimeWarning, match="damping"):
        U = core.inverse_cholesky_upper(H, damp=0.1)
    assert np.isfinite(np.asarray(U)).all()
    with pytest.raises(FloatingPointError, match="Cholesky"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            core.inverse_cholesky_upper(-np.eye(n, dtype=np.float32), max_tries=2)


def test_bad_arguments():
    U = jnp.eye(6)
    with pytest.raises(ValueError, match="block size"):
        core.ldlq(jnp.zeros((2, 6)), U, lambda x, k: (x, None), block_size=4)
    with pytest.raises(ValueError, match="square"):
        core.prepare_hessian(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        core.inverse_cholesky_upper(jnp.full((3, 3), jnp.nan))
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(core.inverse_cholesky_upper)(jnp.eye(3))
