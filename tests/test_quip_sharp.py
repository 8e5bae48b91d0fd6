"""QuIP#: BlockLDLQ with E8 codebooks, block coordinate descent, the format's dequantize/matmul."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.codebooks.e8p import get_codebook
from jaxquant.formats.base import FORMATS
from jaxquant.formats.quip_sharp import QuIPSharpQuantized, pack_codes
from jaxquant.methods import ldlq as core
from jaxquant.methods import quip_sharp as qs
from jaxquant.methods.registry import METHODS


SHAPE = (192, 576)  # SmolLM2 k_proj (Paley factors 12 and 36); one shape so jit compiles are shared


def _random_spd(key, n, *, rank_boost=4):
    """Ill-conditioned SPD Hessian with strongly correlated inputs (as real layer inputs are)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    a = jax.random.normal(k1, (2 * n, n)) * jnp.exp(jax.random.normal(k2, (n,)))
    a = a + 3 * jax.random.normal(k3, (2 * n, rank_boost)) @ jax.random.normal(k4, (rank_boost, n))
    return a.T @ a / (2 * n)


def _fresh_key():
    return jax.random.key(np.random.SeedSequence().entropy % 2**31)


@pytest.mark.parametrize("codebook", ["e8p", "e8p-rvq3", "e8p-rvq4"])
def test_block_ldlq_beats_nearest_and_tuning_never_hurts(codebook):
    key = _fresh_key()
    m, n = SHAPE
    X = 0.9 * jax.random.normal(jax.random.fold_in(key, 0), (m, n))
    H, _ = core.prepare_hessian(_random_spd(jax.random.fold_in(key, 1), n))
    U = core.inverse_cholesky_upper(H)
    loss = {}
    for name, feedback, iters in [("nearest", False, 0), ("ldlq", True, 0), ("tuned", True, 1)]:
        codes, Q = qs.quantize_rotated(X, H, U, codebook=codebook, tune_iters=iters, feedback=feedback)
        np.testing.assert_allclose(get_codebook(codebook).decode(codes).reshape(m, n), Q, atol=1e-6)
        loss[name] = qs.proxy_loss_rotated(X, Q, H)
    assert loss["ldlq"] < loss["nearest"], loss
    assert loss["tuned"] <= loss["ldlq"] * (1 + 1e-5), loss


def _quantize(m, n, bits, key, *, hessian=None, **kw):
    w = jax.random.normal(jax.random.fold_in(key, 0), (m, n)) * 0.02
    h = _random_spd(jax.random.fold_in(key, 1), n) if hessian is None else hessian
    qw = METHODS["quip#"].quantize(w, qs.QuIPSharpConfig(bits=bits, tune_iters=1, **kw), hessian=h,
                                   key=jax.random.fold_in(key, 2))
    return w, h, qw


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_roundtrip_identity_hessian_matches_codebook_distortion(bits):
    # With H = I feedback does nothing: the relative error is the codebook's MSE at input RMS ρ.
    m, n = SHAPE
    w, _, qw = _quantize(m, n, bits, _fresh_key(), hessian=jnp.eye(n))
    rel = float(jnp.sum((qw.dequantize() - w) ** 2) / jnp.sum(w**2))
    assert rel < {2: 0.12, 3: 0.04, 4: 0.013}[bits], rel
    assert qw.shape == (m, n) and qw.codes.shape == (m, n // 8, bits) and qw.codes.dtype == jnp.uint8
    stages = qw.stage_codes()
    assert [c.dtype for c in stages] == list(get_codebook(bits).code_dtypes)
    np.testing.assert_array_equal(pack_codes(stages), qw.codes)
    assert qw.bits_per_weight == pytest.approx(bits + (16 * (m + n) + 32) / (m * n), abs=1e-12)
    assert qw.parts == () and qw.part_slices() == [slice(0, m)]


def test_dequantize_matches_matmul_and_rotated_loss():
    key = _fresh_key()
    m, n = SHAPE
    w, h, qw = _quantize(m, n, 2, key)
    w_hat = qw.dequantize()
    x = jax.random.normal(jax.random.fold_in(key, 3), (5, n))
    np.testing.assert_allclose(qw.matmul(x), x @ w_hat.T, rtol=1e-4, atol=1e-5)
    xb = x.astype(jnp.bfloat16)
    yb = qw.matmul(xb)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float32), np.asarray(x @ w_hat.T), rtol=0.05, atol=0.02)
    # The RHT is orthogonal: the proxy loss is the same in the rotated basis.
    H, _ = core.prepare_hessian(h, damp=0.01)
    su, sv = qw.SU.astype(jnp.float32), qw.SV.astype(jnp.float32)
    wr, hr = qs.incoherence(w, H, su, sv)
    rotated = core.proxy_loss(wr, qw.rotated() * qw.scale, hr)
    np.testing.assert_allclose(core.proxy_loss(w, w_hat, H), rotated, rtol=1e-3)


def test_pytree_registration_seed_and_errors():
    key = jax.random.key(0)
    m, n = SHAPE
    w, h, qw = _quantize(m, n, 2, key)
    assert FORMATS["quip#"] is QuIPSharpQuantized and METHODS["quip#"].needs_hessian
    leaves, tree = jax.tree.flatten(qw)
    again = jax.tree.unflatten(tree, leaves)
    np.testing.assert_allclose(jax.jit(lambda q: q.dequantize())(again), qw.dequantize(), atol=1e-7)
    rebuilt = QuIPSharpQuantized.from_leaves(qw.static_metadata(),
                                             qw.arrays())
    np.testing.assert_array_equal(rebuilt.dequantize(), qw.dequantize())
    _, _, same = _quantize(m, n, 2, key)
    np.testing.assert_array_equal(same.codes, qw.codes)
    _, _, other = _quantize(m, n, 2, key, seed=1)
    assert not np.array_equal(np.asarray(other.SU), np.asarray(qw.SU))
    with pytest.raises(ValueError, match="Hessian"):
        METHODS["quip#"].quantize(w, qs.QuIPSharpConfig(), hessian=None, key=key)
    with pytest.raises(ValueError, match="multiple"):
        METHODS["quip#"].quantize(w[:, :60], qs.QuIPSharpConfig(), hessian=h[:60, :60], key=key)
    with pytest.raises(ValueError, match="bits"):
        qs.QuIPSharpConfig(bits=5)


def test_fused_parts_each_keep_their_scale():
    key = _fresh_key()
    n = SHAPE[1]
    ws = [s * jax.random.normal(jax.random.fold_in(key, i), (rows, n))
          for i, (rows, s) in enumerate([(96, 0.02), (48, 2.0), (48, 2e-4)])]
    qw = qs.quantize_fused(ws, qs.QuIPSharpConfig(bits=2, tune_iters=1), hessian=jnp.eye(n), key=key)
    assert qw.parts == (96, 48, 48) and qw.shape == SHAPE and qw.scale.shape == (3,)
    w_hat = qw.dequantize()
    for w, rows in zip(ws, qw.part_slices()):
        rel = float(jnp.sum((w_hat[rows] - w) ** 2) / jnp.sum(w**2))
        assert rel < 0.2, rel  # each part at the codebook's distortion, whatever its magnitude
    x = jax.random.normal(jax.random.fold_in(key, 9), (3, n))
    y, y_ref = qw.matmul(x), x @ w_hat.T
    for rows in qw.part_slices():
        np.testing.assert_allclose(y[:, rows], y_ref[:, rows], atol=1e-5 * float(jnp.abs(y_ref[:, rows]).max()))
    assert qw.bits_per_weight == pytest.approx(2 + (16 * (192 + n) + 3 * 32) / (192 * n), abs=1e-12)
