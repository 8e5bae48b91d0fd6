"""The GPTVQ decode-matvec in Pallas (``pallas_kernels.vq_matvec``) and ``backend="pallas"`` of the VQ formats.

CPU: interpret mode against ``x @ dequantize().T`` on fresh random weights (every index width
layout of ``packing``, straddling ones included), one-hot rows of x returning decoded columns
exactly, the formats' routing (``auto`` never picks the kernel, ``cuda`` has none), argument
errors, and that the kernel lowers to a Triton call for CUDA (lowering only).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from helpers import rel_err
from jaxquant.formats import dispatch, packing, vq
from jaxquant.methods import gptvq

HIGHEST = jax.lax.Precision.HIGHEST
INTERPRET = jax.default_backend() != "gpu"
# Jitted once per shape: op by op, packing and decoding cost a second per weight on this CPU.
pack = jax.jit(packing.pack, static_argnums=1)
dequantize = jax.jit(lambda qw: qw.dequantize())


def random_vq(rng, out, inp, D, bits, group_rows, group_cols) -> vq.VQQuantized:
    """Uniform random indices, int8 codebooks and positive float16 tile scales."""
    idx = rng.integers(0, 2**bits, (out, inp // D), np.uint32)
    tiles = (out // group_rows, inp // group_cols)
    codebook = jnp.asarray(rng.integers(-127, 128, (*tiles, 2**bits, D)), jnp.int8)
    scale = jnp.asarray(rng.uniform(1e-3, 1e-2, (*tiles, 1, 1)), jnp.float16)
    return vq.VQQuantized(pack(idx, bits), codebook, scale, (out, inp), D, bits,
                          group_rows, group_cols)


def random_scaled(rng, qw: vq.VQQuantized, scale_block=64, scale_bits=4) -> vq.VQScaledQuantized:
    out, inp = qw.shape
    codes = rng.integers(0, 2**scale_bits, out * inp // scale_block, np.uint32)
    return vq.VQScaledQuantized(qw.codes, qw.codebook, qw.codebook_scale, qw.shape, qw.vq_dim, qw.index_bits,
                                qw.group_rows, qw.group_cols, scale_codes=pack(codes, scale_bits),
                                scale_range=jnp.array([-3.0, 1.5], jnp.float32), scale_block=scale_block,
                                scale_bits=scale_bits)


def kernel(x, qw, **kw):
    return pallas_kernels.vq_matvec(x, qw.codes, qw.codebooks(), vq_dim=qw.vq_dim, index_bits=qw.index_bits,
                                    group_rows=qw.group_rows, group_cols=qw.group_cols, interpret=INTERPRET, **kw)


def normal(rng, shape) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


# (out, in, D, index bits, group rows, group cols, rows of x): non-square, tiles of one row and
# of non-power-of-two rows, tiles narrower than and as wide as the input, index widths that
# divide 32 and ones that straddle words, 1 to 16 rows of x.
SHAPES = [
    (48, 128, 2, 4, 12, 64, 1),
    (32, 96, 1, 3, 1, 48, 3),
    (16, 256, 2, 6, 16, 128, 16),
    (64, 64, 4, 8, 8, 64, 3),
    (24, 192, 1, 2, 8, 192, 2),
    (32, 128, 4, 5, 4, 32, 4),
    (16, 64, 1, 7, 2, 32, 1),
    (8, 64, 4, 1, 8, 64, 2),
]


@pytest.mark.parametrize("out,inp,D,bits,group_rows,group_cols,batch", SHAPES)
def test_vq_matvec_matches_dequantize(out, inp, D, bits, group_rows, group_cols, batch):
    rng = np.random.default_rng()
    qw = random_vq(rng, out, inp, D, bits, group_rows, group_cols)
    x = normal(rng, (batch, inp))
    y = kernel(x, qw)
    assert y.dtype == jnp.float32 and y.shape == (batch, out)
    assert rel_err(y, jnp.matmul(x, dequantize(qw).T, precision=HIGHEST)) < 2e-6


def test_one_hot_rows_return_decoded_columns_exactly():
    """x = e_j returns column j of the decoded weight bit for bit (one product by 1, the rest by 0),
    plain and with block scales; j covers both coordinates of a vector and indices straddling words.
    The scaled weight is built from the same scale values the kernel gets (the format's own
    ``dequantize`` may round its exp2 differently, by an ulp)."""
    rng = np.random.default_rng()
    inp = 192
    qw = random_vq(rng, 24, inp, 2, 7, 12, 96)
    cols = [0, 8, 9, 73, int(rng.integers(0, inp)), inp - 1]  # 7-bit indices 4 and 36 straddle two words
    x = jnp.asarray(np.eye(inp, dtype=np.float32)[cols])
    np.testing.assert_array_equal(np.asarray(kernel(x, qw)), np.asarray(dequantize(qw)[:, cols].T))
    sq = random_scaled(rng, qw)
    values = vq.log_scale_values(jnp.arange(2**sq.scale_bits), sq.scale_range, sq.scale_bits)
    codes = packing.unpack(sq.scale_codes, sq.scale_bits, 24 * inp // sq.scale_block).reshape(24, -1)
    w = dequantize(qw) * jnp.repeat(values[codes], sq.scale_block, axis=1)
    y = kernel(x, sq, scale_codes=sq.scale_codes, scale_values=values, scale_block=sq.scale_block,
               scale_bits=sq.scale_bits)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(w[:, cols].T))
    assert rel_err(w, dequantize(sq)) < 1e-6


def test_more_than_16_rows_and_bf16():
    rng = np.random.default_rng()
    qw = random_vq(rng, 32, 128, 2, 4, 8, 128)
    x = normal(rng, (3, 7, 128)).astype(jnp.bfloat16)
    y = kernel(x, qw)
    assert y.shape == (3, 7, 32)
    assert rel_err(y, jnp.matmul(x.astype(jnp.float32), dequantize(qw).T, precision=HIGHEST)) < 2e-6


# ------------------------------------------------------------------ the formats' matmul


@pytest.fixture(scope="module")
def quantized():
    """The three VQ formats as GPTVQ stores them (a few EM iterations: speed, not quality)."""
    rng = np.random.default_rng()
    out, n = 32, 256
    W = jnp.asarray(rng.standard_normal((out, n)) * 0.02, jnp.float32)
    X = rng.standard_normal((2 * n, n))
    H = (X.T @ X / (2 * n)).astype(np.float32)
    configs = {
        "vq": dict(vq_dim=2, bits=2, tile_size=512, group_size=128),
        "vq_scaled": dict(vq_dim=2, bits=2, tile_size=512, group_size=128, scale_block=64),
        "vq_svd": dict(vq_dim=1, bits=3, tile_size=256, group_size=128, svd_rank=0.5),
    }
    return {name: gptvq.quantize(W, gptvq.GPTVQConfig(kmeans_iters=3, update_iters=0, **kw), hessian=H)
            for name, kw in configs.items()}


@pytest.mark.parametrize("fmt", ["vq", "vq_scaled", "vq_svd"])
def test_matmul_backend_pallas_equals_reference(quantized, fmt):
    qw = quantized[fmt]
    assert qw.format_name == fmt
    rng = np.random.default_rng()
    for batch in (1, 5):
        x = normal(rng, (batch, qw.shape[1]))
        y = qw.matmul(x, backend="pallas")
        assert y.dtype == x.dtype
        assert rel_err(y, qw.matmul(x, backend="reference")) < 2e-6


def test_auto_takes_cuda_for_plain_2d_vq_else_the_reference(quantized, monkeypatch):
    qw = quantized["vq_scaled"]
    x = normal(np.random.default_rng(), (2, qw.shape[1]))
    ref = np.asarray(qw.matmul(x, backend="reference"))
    np.testing.assert_array_equal(np.asarray(qw.matmul(x)), ref)  # off the GPU: the reference
    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
    monkeypatch.setattr(dispatch, "_cuda_ready", lambda: True)

    def no_kernel(*args, **kwargs):
        raise AssertionError("auto took a kernel")

    monkeypatch.setattr(vq, "_matmul_pallas", no_kernel)
    monkeypatch.setattr(vq, "_matmul_cuda", no_kernel)
    assert vq.cuda_issue(quantized["vq"], x) is None  # D = 2, 4 index bits, 128-column tiles
    for backend in ("auto", "cuda"):  # both reach the CUDA kernel
        with pytest.raises(AssertionError, match="auto took a kernel"):
            quantized["vq"].matmul(x, backend=backend)
    for name, w in quantized.items():
        if name != "vq":
            np.testing.assert_array_equal(np.asarray(w.matmul(x, backend="auto")),
                                          np.asarray(w.matmul(x, backend="reference")))
    for name in ("vq_scaled", "vq_svd"):
        with pytest.raises(ValueError, match="backend 'cuda': the CUDA kernel reads plain VQ"):
            quantized[name].matmul(x, backend="cuda")
    odd = random_vq(np.random.default_rng(), 16, 96, 2, 4, 8, 32)
    assert "multiple of 64" in vq.cuda_issue(odd, jnp.ones((1, 96)))
    assert "2-D vectors" in vq.cuda_issue(random_vq(np.random.default_rng(), 16, 64, 1, 3, 8, 32), jnp.ones((1, 64)))
    with pytest.raises(ValueError, match="backend must be one of"):
        qw.matmul(x, backend="triton")


# ------------------------------------------------------------------ errors and lowering


def test_vq_matvec_errors():
    rng = np.random.default_rng()
    qw = random_vq(rng, 16, 64, 2, 4, 8, 32)
    x = jnp.ones((1, 64), jnp.float32)
    cb = qw.codebooks()
    with pytest.raises(ValueError, match="x has 128 inputs, the weight 64"):
        kernel(jnp.ones((1, 128)), qw)
    with pytest.raises(ValueError, match="vq_dim must be one of"):
        pallas_kernels.vq_matvec(jnp.ones((1, 96)), qw.codes, jnp.ones((2, 2, 16, 3)), vq_dim=3, index_bits=4,
                                 group_rows=8, group_cols=48, interpret=True)
    with pytest.raises(ValueError, match="index_bits must be in"):
        pallas_kernels.vq_matvec(x, qw.codes, cb, vq_dim=2, index_bits=17, group_rows=8, group_cols=32,
                                 interpret=True)
    with pytest.raises(ValueError, match="codebooks must hold 32 entries of 2 values"):
        pallas_kernels.vq_matvec(x, qw.codes, cb, vq_dim=2, index_bits=5, group_rows=8, group_cols=32,
                                 interpret=True)
    with pytest.raises(ValueError, match="codes hold 3 words a row"):
        pallas_kernels.vq_matvec(x, qw.codes[:, :3], cb, vq_dim=2, index_bits=4, group_rows=8, group_cols=32,
                                 interpret=True)
    with pytest.raises(ValueError, match="tile rows of 4 do not make the 16 rows"):
        pallas_kernels.vq_matvec(x, qw.codes, cb, vq_dim=2, index_bits=4, group_rows=4, group_cols=32,
                                 interpret=True)
    with pytest.raises(ValueError, match="scale_block 48 must be a multiple"):
        kernel(x, qw, scale_codes=jnp.zeros((8,), jnp.int32), scale_values=jnp.ones(16), scale_block=48,
               scale_bits=4)
    with pytest.raises(ValueError, match="need both"):
        kernel(x, qw, scale_codes=jnp.zeros((8,), jnp.int32), scale_block=32, scale_bits=4)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        kernel(x.astype(jnp.int32), qw)
    with pytest.raises(ValueError, match="backend 'pallas': x has 128 inputs"):
        qw.matmul(jnp.ones((1, 128)), backend="pallas")


def test_vq_matvec_lowers_to_triton_for_cuda():
    rng = np.random.default_rng()
    x = jnp.ones((3, 256), jnp.float32)
    for D, bits in ((1, 3), (2, 4), (2, 6), (4, 8)):
        qw = random_vq(rng, 32, 256, D, bits, 8, 128)
        cb = qw.codebooks()
        text = jax.jit(lambda x, qw=qw, cb=cb: pallas_kernels.vq_matvec(
            x, qw.codes, cb, vq_dim=qw.vq_dim, index_bits=qw.index_bits, group_rows=8, group_cols=128)).trace(
            x).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text, (D, bits)
    sq = random_scaled(rng, random_vq(rng, 32, 256, 2, 4, 8, 128))
    values = vq.log_scale_values(jnp.arange(16), sq.scale_range, 4)
    text = jax.jit(lambda x: pallas_kernels.vq_matvec(
        x, sq.codes, sq.codebooks(), vq_dim=2, index_bits=4, group_rows=8, group_cols=128, scale_codes=sq.scale_codes,
        scale_values=values, scale_block=64, scale_bits=4)).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text


def test_vq2_cuda_lowers_for_cuda():
    """The CUDA GPTVQ kernel: one ffi call per row of x, per-chunk partials [ceil(in / 2048), out]."""
    from cuda_ffi import ops as cuda_ops

    rng = np.random.default_rng()
    qw = random_vq(rng, 32, 4096, 2, 6, 8, 128)
    text = jax.jit(lambda x: cuda_ops.vq2_matvec(x, qw.codes, qw.codebooks(), index_bits=6, group_rows=8,
                                                 group_cols=128, register=False)).trace(
        jnp.ones((3, 4096), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "jaxquant_vq2_matvec" in line]
    assert len(calls) == 3 and all("-> tensor<2x32xf32>" in c for c in calls)
    with pytest.raises(ValueError, match="index_bits must be one of"):
        cuda_ops.vq2_matvec(jnp.ones((1, 256)), qw.codes, jnp.ones((4, 2, 8, 2)), index_bits=3, group_rows=8,
                            group_cols=128, register=False)


@pytest.mark.gpu
def test_vq2_cuda_gpu_llama_shapes():
    """The CUDA GPTVQ kernel (2-D vectors) on a GPU at Llama layer shapes, 2, 3 and 4 bits per weight."""
    rng = np.random.default_rng()
    for out, inp in ((4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192), (8192, 28672)):
        for bits in (4, 6, 8):
            qw = random_vq(rng, out, inp, 2, bits, 8, 256)
            w = dequantize(qw)
            for batch in (1, 3):
                x = normal(rng, (batch, inp)).astype(jnp.bfloat16)
                ref = jnp.matmul(x.astype(jnp.float32), w.T, precision=HIGHEST)
                assert rel_err(qw.matmul(x, backend="cuda"), ref) < 1e-2, (out, inp, bits, batch)
            del w


@pytest.mark.gpu
def test_vq_matvec_gpu_llama_shapes():
    """The Triton kernel on a GPU at Llama layer shapes (GPTVQ's default tiles: 8 rows x 256 columns)."""
    rng = np.random.default_rng()
    for out, inp in ((4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)):
        for D, bits in ((2, 4), (1, 3), (4, 8)):
            qw = random_vq(rng, out, inp, D, bits, 8, 256)
            w = dequantize(qw)
            for batch in (1, 4, 16):
                x = normal(rng, (batch, inp)).astype(jnp.bfloat16)
                ref = jnp.matmul(x.astype(jnp.float32), w.T, precision=HIGHEST)
                assert rel_err(qw.matmul(x, backend="pallas"), ref) < 1e-2, (out, inp, D, bits, batch)
            del w
