"""QTIP format and method: stream packing, RHT dequantize/matmul, tiled LDLQ, bits per weight."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.formats.qtip import QTIPQuantized, pack_stream, unpack_states
from jaxquant.methods import ldlq as core
from jaxquant.methods.qtip import QTIPConfig, quantize_with_hat
from jaxquant.methods.registry import METHODS, config_from_dict, config_to_dict
from jaxquant.quant import quantize_weight


@pytest.fixture
def rng():
    return np.random.default_rng()


def ref_windows(stream_bits: np.ndarray, L: int, kV: int, n: int) -> np.ndarray:
    """State t = the L stream bits from t·kV on, circularly, MSB first (python ints)."""
    N = len(stream_bits)
    return np.array([int("".join(str(stream_bits[(t * kV + i) % N]) for i in range(L)), 2) for t in range(n)])


@pytest.mark.parametrize("L,kV", [(16, 2), (16, 3), (16, 4), (16, 6), (16, 8), (12, 1), (20, 5)])
def test_stream_windows_and_roundtrip(rng, L, kV):
    n = 256 if kV != 5 else 128  # 256·kV or 128·5 bits: whole 32-bit words
    bits = rng.integers(0, 2, size=n * kV)
    words = np.packbits(bits, bitorder="big").view(">u4").astype(np.uint32).view(np.int32)[None]
    states = np.asarray(unpack_states(jnp.asarray(words), L=L, kV=kV, n=n))[0]
    np.testing.assert_array_equal(states, ref_windows(bits, L, kV, n))
    # consecutive windows form a tail-biting trellis path, and packing gives the stream back
    mask = (1 << (L - kV)) - 1
    assert np.all(states[1:] >> kV == states[:-1] & mask) and states[0] >> kV == states[-1] & mask
    np.testing.assert_array_equal(np.asarray(pack_stream(jnp.asarray(states)[None], L=L, kV=kV)), words)


def layer(rng, out=32, n=64, tokens=512):
    w = rng.standard_normal((out, n)).astype(np.float32)
    mix = rng.standard_normal((n, n)).astype(np.float32) / np.sqrt(n)
    x = rng.standard_normal((tokens, n)).astype(np.float32) @ (np.eye(n, dtype=np.float32) + 2 * mix)
    return w, (x.T @ x / tokens).astype(np.float32)


@pytest.mark.parametrize("code,bits,L,V", [("1mad", 2, 16, 0), ("hyb", 2, 16, 0), ("3inst", 3, 16, 0),
                                           ("lut", 2, 10, 2)])
def test_format_reproduces_the_sweep(rng, code, bits, L, V):
    w, h = layer(rng)
    key = jax.random.key(int(rng.integers(1 << 30)))
    cfg = QTIPConfig(bits=bits, code=code, L=L, V=V)
    qw, hat = quantize_with_hat(w, cfg, hessian=h, key=key)
    assert isinstance(qw, QTIPQuantized) and qw.codes.shape == (2, 4, 8 * bits)
    np.testing.assert_array_equal(np.asarray(qw.rotated()), np.asarray(hat))
    # dequantize goes back through the inverse RHT; matmul never forms W but agrees with it
    wd = np.asarray(qw.dequantize())
    from jaxquant import hadamard
    back = hadamard.rht(hadamard.rht(jnp.asarray(wd), qw.su).T, qw.sv).T
    np.testing.assert_allclose(np.asarray(back), np.asarray(hat), atol=1e-5)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(qw.matmul(jnp.asarray(x))), x @ wd.T, rtol=1e-4, atol=1e-4)
    # exact bits: k per weight in the streams, plus scale, fp16 signs and the fp16 table
    tb = {"hyb": 512 * 2, "lut": (1 << L) * 2}.get(code, 1)
    assert qw.bits_per_weight == (32 * 64 * bits + 32 + 16 * (32 + 64) + 16 * tb) / (32 * 64)
    # rebuild from the checkpoint view (static metadata + arrays)
    leaves = {k: np.asarray(v) for k, v in qw.arrays().items()}
    again = QTIPQuantized.from_leaves(qw.static_metadata(), leaves)
    np.testing.assert_array_equal(np.asarray(again.dequantize()), wd)


def test_ldlq_feedback_beats_independent_tiles(rng):
    w, h = layer(rng, out=32, n=128)
    key = jax.random.key(int(rng.integers(1 << 30)))
    cfg = QTIPConfig(bits=2, code="1mad")
    with_h = quantize_with_hat(w, cfg, hessian=h, key=key)[0]
    no_feedback = quantize_with_hat(w, cfg, hessian=np.eye(128, dtype=np.float32), key=key)[0]
    loss = lambda qw: core.proxy_loss(w, np.asarray(qw.dequantize()), h)  # noqa: E731
    assert loss(with_h) < 0.9 * loss(no_feedback)


def test_more_bits_less_error(rng):
    w, h = layer(rng)
    key = jax.random.key(int(rng.integers(1 << 30)))
    rel = []
    for bits in (2, 3, 4):
        qw = quantize_weight(w, QTIPConfig(bits=bits, code="3inst"), hessian=h, key=key)
        rel.append(core.proxy_loss(w, np.asarray(qw.dequantize()), h) / core.proxy_loss(w, 0 * w, h))
    assert rel[0] > 2.5 * rel[1] > 2.5 ** 2 * rel[2]  # roughly 4x per bit (distortion ~ 2^-2R)
    assert rel[0] < 0.118  # better than Lloyd-Max scalar MSE at 2 bits, with feedback on top


def test_registry_and_config():
    m = METHODS["qtip"]
    assert m.config is QTIPConfig and m.needs_hessian
    cfg = QTIPConfig(bits=3, code="1mad", tile=(16, 16))
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert dataclasses.replace(cfg, tile=[8, 32]).tile == (8, 32)
    for bad in (dict(code="e8p"), dict(bits=0), dict(tile=(3, 5)), dict(L=6, bits=4)):
        with pytest.raises(ValueError):
            QTIPConfig(**bad)
    with pytest.raises(ValueError):
        quantize_weight(np.zeros((24, 32), np.float32), QTIPConfig(), hessian=np.eye(32))  # 24 % 16
