"""Bit packing, the scalar format and RTN."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant.formats import packing


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_roundtrip_exact_size(bits):
    rng = np.random.default_rng()
    n = int(rng.integers(1, 200))
    codes = rng.integers(0, 2**bits, size=(3, n), dtype=np.uint32)
    words = packing.pack(jnp.asarray(codes), bits)
    assert words.dtype == jnp.int32 and words.shape == (3, -(-n // 32) * bits)
    np.testing.assert_array_equal(np.asarray(packing.unpack(words, bits, n)), codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_rtn_bits_per_weight_and_error(bits, group):
    w = np.random.default_rng().standard_normal((48, 256)).astype(np.float32)
    qw = jq.quantize_weight(w, jq.RTNConfig(bits=bits, group_size=group))
    assert qw.bits_per_weight == bits + 32 / group  # codes + fp16 scale + fp16 zero
    w_hat = np.asarray(jq.dequantize(qw))
    # every weight lies within half a grid step of its reconstruction
    scale = np.repeat(np.asarray(qw.scale, np.float32).reshape(48, -1), group, axis=1)
    assert np.all(np.abs(w - w_hat) <= 0.5 * scale * (1 + 1e-2) + 1e-3 * np.abs(w))


def test_rtn_error_falls_with_bits():
    w = np.random.default_rng().standard_normal((64, 512)).astype(np.float32)
    errors = [np.mean((np.asarray(jq.dequantize(jq.quantize_weight(w, jq.RTNConfig(bits=b)))) - w) ** 2)
              for b in range(1, 9)]
    assert all(a > 3 * b for a, b in zip(errors, errors[1:]))


def test_matmul_matches_dequantize_and_jits():
    rng = np.random.default_rng()
    w = rng.standard_normal((40, 128)).astype(np.float32)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    qw = jq.quantize_weight(w, jq.RTNConfig(bits=3, group_size=32))
    ref = x @ np.asarray(jq.dequantize(qw)).T
    np.testing.assert_allclose(np.asarray(jq.matmul(x, qw)), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(jq.matmul)(x, qw)), ref, rtol=1e-5, atol=1e-5)


def test_group_not_dividing_width_pads_rows():
    w = np.random.default_rng().standard_normal((8, 576)).astype(np.float32)
    qw = jq.quantize_weight(w, jq.RTNConfig(bits=4, group_size=128))
    assert qw.bits_per_weight == pytest.approx((4 + 32 / 128) * 640 / 576)
    w_hat = np.asarray(jq.dequantize(qw))
    assert w_hat.shape == w.shape and np.mean((w_hat - w) ** 2) < 0.02


def test_per_channel_groups():
    w = np.random.default_rng().standard_normal((16, 96)).astype(np.float32)
    qw = jq.quantize_weight(w, jq.RTNConfig(bits=4, group_size=None))
    assert qw.scale.size == 16 and qw.bits_per_weight == 4 + 32 / 96


def test_bad_inputs_give_clear_errors():
    w = np.ones((8, 64), np.float32)
    with pytest.raises(ValueError, match="1 to 8 bits"):
        jq.RTNConfig(bits=9)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        jq.RTNConfig(bits=4, group_size=0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        jq.quantize_weight(np.where(np.eye(8, 64) > 0, np.nan, w), jq.RTNConfig())
    with pytest.raises(ValueError, match="2-D"):
        jq.quantize_weight(np.ones(64, np.float32), jq.RTNConfig())
    with pytest.raises(TypeError, match="not a registered quantization config"):
        jq.quantize_weight(w, {"bits": 4})
