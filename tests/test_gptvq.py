"""GPTVQ: vector quantization in the GPTQ sweep, its EM, codebook update and exact format."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.formats import vq
from jaxquant.methods import gptq, gptvq
from jaxquant.methods.ldlq import proxy_loss
from jaxquant.quant import quantize_weight


def random_hessian(rng, n, samples, spread=0.5):
    X = rng.standard_normal((samples, n)) @ (np.eye(n) + 0.3 * rng.standard_normal((n, n)))
    X *= np.exp(spread * rng.standard_normal(n))
    return (X.T @ X / samples).astype(np.float32)


# One shape and one configuration for the tests that run the whole method: compiled once.
MAIN = gptvq.GPTVQConfig(bits=2, vq_dim=2, group_size=256, tile_size=2048, kmeans_iters=30)


@pytest.fixture
def layer():
    rng = np.random.default_rng()
    out, n = 64, 512
    W = jnp.asarray(rng.standard_normal((out, n)) * 0.02, jnp.float32)
    return W, random_hessian(rng, n, samples=n)


def test_gptvq_2d_at_2_125_bpw_beats_gptq_2bit_g128(layer):
    W, H = layer
    cfg = MAIN
    assert cfg.nominal_bits_per_weight == 2.125
    qv, W_sweep = gptvq.quantize_with_hat(W, cfg, H, key=jax.random.key(1))
    assert isinstance(qv, vq.VQQuantized) and (qv.group_rows, qv.group_cols) == (8, 256)
    # exact: 2-bit indices + 16 int8 2-D entries and one fp16 scale per 2048 weights
    assert qv.bits_per_weight == 2 + (16 * 2 * 8 + 16) / 2048
    q4 = quantize_weight(W, gptq.GPTQConfig(bits=2, group_size=128), hessian=H)
    loss_vq = proxy_loss(W, qv.dequantize(), H)
    assert loss_vq < proxy_loss(W, q4.dequantize(), H)
    assert loss_vq <= proxy_loss(W, W_sweep, H) * (1 + 1e-5)  # the update is kept only if better


@pytest.mark.parametrize("kwargs", [
    pytest.param(dict(vq_dim=1, bits=3, tile_size=256, group_size=128, init="kmeans++"),
                 marks=pytest.mark.slow),
    pytest.param(dict(vq_dim=4, bits=1, tile_size=512, group_size=128, exact_block_update=False),
                 marks=pytest.mark.slow),
    dict(vq_dim=2, bits=2, tile_size=1024, group_size=128, scale_block=64),
])
def test_stored_weight_is_the_sweeps_result(layer, kwargs):
    W, H = layer
    cfg = gptvq.GPTVQConfig(kmeans_iters=10, update_iters=0, **kwargs)
    qv, W_sweep = gptvq.quantize_with_hat(W, cfg, H)
    D = np.asarray(qv.dequantize())
    np.testing.assert_allclose(D, np.asarray(W_sweep), rtol=1e-6, atol=1e-7)
    extra = 0.0
    if cfg.scale_block:
        assert isinstance(qv, vq.VQScaledQuantized)
        extra = cfg.scale_bits / cfg.scale_block + 64 / W.size  # + the fp32 log range
    codebook_bits = (cfg.num_entries * cfg.vq_dim * 8 + 16) / cfg.tile_size
    assert qv.bits_per_weight == pytest.approx(cfg.bits + codebook_bits + extra, rel=1e-12)
    rt = jax.tree.unflatten(jax.tree.structure(qv), jax.tree.leaves(qv))
    np.testing.assert_array_equal(np.asarray(rt.dequantize()), D)
    x = jnp.asarray(np.random.default_rng().standard_normal((2, W.shape[1])), jnp.float32)
    np.testing.assert_allclose(np.asarray(qv.matmul(x)), np.asarray(x) @ D.T, rtol=1e-4, atol=1e-5)
    # Every entry is on the int8 grid and every row's indices address its own tile.
    assert np.abs(np.asarray(qv.codebook, np.int32)).max() <= 127
    assert int(qv.indices().max()) < cfg.num_entries


@pytest.mark.slow
def test_svd_compressed_1d_codebooks(layer):
    W, H = layer
    base = dict(vq_dim=1, bits=3, tile_size=256, group_size=128, kmeans_iters=20)
    plain = gptvq.quantize(W, gptvq.GPTVQConfig(**base), hessian=H)
    cfg = gptvq.GPTVQConfig(svd_rank=0.5, **base)
    qs = gptvq.quantize(W, cfg, hessian=H)
    assert isinstance(qs, vq.VQSVDQuantized) and qs.factor.shape[-1] == 4
    C = np.asarray(qs.codebooks())[..., 0]
    assert (np.diff(C, axis=-1) >= -1e-6 * np.abs(C).max()).mean() > 0.95  # sorted (up to rounding)
    assert qs.bits_per_weight < plain.bits_per_weight
    assert proxy_loss(W, qs.dequantize(), H) < 1.5 * proxy_loss(W, plain.dequantize(), H)


def test_em_is_monotone_and_m_step_is_the_weighted_metric_mean():
    rng = np.random.default_rng()
    R, nb, D, K = 16, 8, 2, 4
    x = jnp.asarray(rng.standard_normal((R, nb, D)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 2.0, (R, nb)), jnp.float32)
    B = rng.standard_normal((nb, D, D))
    M = jnp.asarray(B @ np.swapaxes(B, 1, 2) + 0.5 * np.eye(D), jnp.float32)

    em = jax.jit(gptvq._em, static_argnums=4)

    def objective(C):
        a = gptvq._assign(x, M, C)
        e = x - C[a]
        return float(jnp.sum(w * jnp.einsum("rnd,nde,rne->rn", e, M, e)))

    C = gptvq._mahalanobis_init(x.reshape(-1, D), K)
    losses = [objective(C)]
    for _ in range(5):
        C = em(x, w, M, C, 1)
        losses.append(objective(C))
    assert all(b <= a * (1 + 1e-5) for a, b in zip(losses, losses[1:]))
    # K = 1: the centroid is (Σ w M)⁻¹ Σ w M x.
    c = np.asarray(em(x, w, M, C[:1], 1))[0]
    wM = np.asarray(w)[..., None, None] * np.asarray(M)[None]
    ref = np.linalg.solve(wM.sum((0, 1)), np.einsum("rnde,rne->d", wM, np.asarray(x)))
    np.testing.assert_allclose(c, ref, rtol=1e-4, atol=1e-5)


def test_initializations_pick_distinct_data_points():
    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((256, 2)), jnp.float32)
    for C in (gptvq._mahalanobis_init(x, 16),
              gptvq._kmeanspp_init(x, jnp.ones(256), jnp.broadcast_to(jnp.eye(2), (256, 2, 2)), 16,
                                   jax.random.key(int(rng.integers(1 << 30))))):
        C = np.asarray(C)
        assert len({tuple(c) for c in C}) == 16
        assert all((np.asarray(x) == c).all(1).any() for c in C)


def test_codebook_int8_quantization():
    rng = np.random.default_rng()
    c = jnp.asarray(rng.standard_normal((3, 5, 16, 2)) * 0.05, jnp.float32)
    q, s = vq.quantize_codebooks(c, 8)
    assert q.dtype == jnp.int8 and s.dtype == jnp.float16 and s.shape == (3, 5, 1, 1)
    err = np.abs(np.asarray(q, np.float32) * np.asarray(s, np.float32) - np.asarray(c))
    assert (err <= np.asarray(s, np.float32) * 0.5 + 1e-7).all()
    assert (np.abs(np.asarray(q)).max(axis=(2, 3)) == 127).all()


def test_odd_shapes_choose_a_dividing_tile():
    cfg = gptvq.GPTVQConfig()
    assert gptvq.tile_shape(4096, 11008, cfg) == (8, 256)
    assert gptvq.tile_shape(576, 576, cfg) == (12, 192)  # SmolLM2: 576 = 3·192
    assert gptvq.tile_shape(192, 576, cfg) == (12, 192)
    assert gptvq.tile_shape(48, 96, gptvq.GPTVQConfig(group_size=64)) == (48, 48)


@pytest.mark.slow
def test_odd_shape_quantizes():
    rng = np.random.default_rng()
    W = jnp.asarray(rng.standard_normal((48, 96)), jnp.float32)
    qv = gptvq.quantize(W, gptvq.GPTVQConfig(group_size=64, kmeans_iters=5, update_iters=0),
                        hessian=random_hessian(rng, 96, 192))
    assert (qv.group_rows, qv.group_cols) == (48, 48)
    assert qv.dequantize().shape == (48, 96)
    assert np.isfinite(np.asarray(qv.dequantize())).all()


def test_bad_configs_and_singular_hessian():
    for kwargs in ({"vq_dim": 3}, {"bits": 0}, {"bits": 5, "vq_dim": 4}, {"init": "random"},
                   {"tile_size": 1000}, {"codebook_bits": 9}, {"group_size": 255},
                   {"bits": 4, "vq_dim": 2, "tile_size": 256}, {"update_iters": -1},
                   {"svd_rank": 0.5}, {"svd_rank": 2.0, "vq_dim": 1}):
        with pytest.raises(ValueError):
            gptvq.GPTVQConfig(**kwargs)
    with pytest.raises(ValueError, match="Hessian"):
        quantize_weight(jnp.zeros((8, 256)), gptvq.GPTVQConfig())
    rng = np.random.default_rng()
    X = rng.standard_normal((10, 512)).astype(np.float32)  # rank 10, three dead inputs
    X[:, :3] = 0
    W = jnp.asarray(rng.standard_normal((64, 512)), jnp.float32)
    qv = gptvq.quantize(W, MAIN, hessian=X.T @ X)
    assert np.isfinite(np.asarray(qv.dequantize())).all()
