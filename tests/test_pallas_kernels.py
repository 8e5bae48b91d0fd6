"""Pallas kernels for the codebook formats and the Hadamard transform (``pallas_kernels``).

CPU: interpret mode against the jnp references (decode then matmul; ``jaxquant.hadamard``), the
routing of ``backend="pallas"``, argument errors, and that each kernel lowers to a Triton call
for CUDA (lowering only: compiling the Triton IR to PTX needs a GPU). GPU (``-m gpu``): the same
products at model-sized shapes with the real Triton kernels.
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from helpers import rel_err
from jaxquant import hadamard as jq_hadamard
from jaxquant.codebooks import e8p as jq_e8p
from jaxquant.codebooks import trellis as jq_trellis
from jaxquant.formats import dispatch
from jaxquant.formats.qtip import QTIPQuantized, decode_tiles
from jaxquant.formats.quip_sharp import QuIPSharpQuantized

HIGHEST = jax.lax.Precision.HIGHEST
INTERPRET = jax.default_backend() != "gpu"


def lower_for_cuda(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def normal(seed: int, shape) -> jax.Array:
    """Test inputs from numpy (a jax.random call compiles per shape: seconds on this CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def pm1(rng, n: int) -> jax.Array:
    return jnp.asarray(rng.choice([-1.0, 1.0], n), jnp.float16)


def random_quip(seed: int, out: int, inp: int, bits: int) -> QuIPSharpQuantized:
    """Uniform random E8P (or RVQ) code bytes, random +-1 signs and a positive scale."""
    rng = np.random.default_rng(seed)
    codes = jnp.asarray(rng.integers(0, 256, (out, inp // 8, bits), np.uint8))
    return QuIPSharpQuantized(codes, pm1(rng, inp), pm1(rng, out), jnp.array([0.03], jnp.float32), (out, inp),
                              bits, jq_e8p.CODEBOOK_FOR_BITS[bits])


def random_qtip(seed: int, out: int, inp: int, code: str, k: int) -> QTIPQuantized:
    """Random streams (every word sequence is a valid tail-biting stream) and +-1 signs."""
    rng = np.random.default_rng(seed)
    codes = jnp.asarray(rng.integers(0, 2**32, (out // 16, inp // 16, 8 * k), np.uint32).view(np.int32))
    tc = jq_trellis.TrellisCode(code)
    table = jnp.asarray(tc.default_table() if code == "hyb" else np.zeros((1, 1), np.float16))
    return QTIPQuantized(codes, jnp.array([0.05], jnp.float32), pm1(rng, inp), pm1(rng, out), table, (out, inp), k,
                         code, 16, tc.V, 9)


def qtip_code_values(qt: QTIPQuantized) -> jax.Array:
    return decode_tiles(qt.codes, qt.table, code=qt.trellis, k=qt.bits, tile=(16, 16))


# ------------------------------------------------------------------ Hadamard


@pytest.mark.parametrize("n", [2, 8, 128, 512, 32768])
def test_hadamard_matches_rht(n):
    rows = 1 if n == 32768 else 3
    x = normal(n, (rows, n))
    s = jnp.sign(normal(n + 1, (n,)))
    y = pallas_kernels.hadamard(x, s, interpret=INTERPRET)
    assert rel_err(y, jq_hadamard.rht(x, s)) < 1e-5
    back = pallas_kernels.hadamard(y, s, signs_after=True, interpret=INTERPRET)
    assert rel_err(back, jq_hadamard.rht_inverse(y, s)) < 1e-5
    assert rel_err(back, x) < 1e-5


def test_hadamard_unnormalized_batched_and_bf16():
    n = 256
    h = jnp.asarray(jq_hadamard.hadamard_matrix(n), jnp.float32)
    x = normal(0, (2, 3, n))
    y = pallas_kernels.hadamard(x, normalize=False, interpret=INTERPRET)
    assert y.shape == x.shape
    assert rel_err(y, jnp.matmul(x, h, precision=HIGHEST)) < 1e-5
    xb = x.astype(jnp.bfloat16)
    yb = pallas_kernels.hadamard(xb, interpret=INTERPRET)
    assert yb.dtype == jnp.bfloat16
    assert rel_err(yb, jnp.matmul(xb.astype(jnp.float32), h, precision=HIGHEST) / 16) < 1e-2


def test_hadamard_errors():
    with pytest.raises(ValueError, match="power of two"):
        pallas_kernels.hadamard(jnp.ones((2, 12)), interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        pallas_kernels.hadamard(jnp.ones((1, 65536)), interpret=True)
    with pytest.raises(ValueError, match="signs must have shape"):
        pallas_kernels.hadamard(jnp.ones((2, 16)), jnp.ones((8,)), interpret=True)
    with pytest.raises(TypeError, match="float32"):
        pallas_kernels.hadamard(jnp.ones((2, 16), jnp.int32), interpret=True)


# ------------------------------------------------------------------ QTIP


def test_trellis_constants_agree():
    pq = importlib.import_module("pallas_kernels.qtip_matvec")  # the package attribute is the function
    assert (pq.MAD1_A, pq.MAD1_B, pq.MAD1_CENTER) == (jq_trellis.MAD1_A, jq_trellis.MAD1_B, jq_trellis.MAD1_CENTER)
    assert pq.MAD1_SCALE == jq_trellis.MAD1_SCALE
    assert (pq.INST3_A, pq.INST3_B, pq.INST3_MASK, pq.INST3_XOR) == (
        jq_trellis.INST3_A, jq_trellis.INST3_B, jq_trellis.INST3_MASK, jq_trellis.INST3_XOR)


@pytest.mark.parametrize("code", ["1mad", "3inst", "hyb"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_qtip_matvec_matches_decode(code, k):
    """Random rows of x to fp32 accuracy; a last one-hot row e_j returns column j of the decoded
    code values exactly (the decode is bit-exact)."""
    batch = {2: 1, 3: 4, 4: 3}[k]
    qt = random_qtip(10 * k + len(code), 32, 128, code, k)
    x = normal(k, (batch, 128))
    j = 37 * k % 128
    x = jnp.concatenate([x, jnp.asarray(np.eye(128, dtype=np.float32)[j:j + 1])])
    y = pallas_kernels.qtip_matvec(x, qt.codes, qt.table if code == "hyb" else None, code=code, k=k,
                                   interpret=INTERPRET)
    assert y.dtype == jnp.float32
    wc = qtip_code_values(qt)
    assert rel_err(y, jnp.matmul(x, wc.T, precision=HIGHEST)) < 1e-5
    np.testing.assert_array_equal(np.asarray(y[-1]), np.asarray(wc[:, j]))


def test_qtip_matvec_more_than_16_rows_and_bf16():
    qt = random_qtip(7, 32, 64, "3inst", 2)
    x = normal(8, (17, 64)).astype(jnp.bfloat16)
    y = pallas_kernels.qtip_matvec(x, qt.codes, None, code="3inst", k=2, interpret=INTERPRET)
    ref = jnp.matmul(x.astype(jnp.float32), qtip_code_values(qt).T, precision=HIGHEST)
    assert rel_err(y, ref) < 1e-5


def test_qtip_matmul_backend_pallas():
    """The whole product: Pallas RHT of x, the decode-matvec, scale, inverse RHT."""
    qt = random_qtip(22, 64, 256, "hyb", 2)
    x = normal(21, (4, 256))
    ref = jnp.matmul(x, qt.dequantize().T, precision=HIGHEST)
    assert rel_err(qt.matmul(x, backend="pallas"), ref) < 1e-5


def test_qtip_matvec_errors():
    qt = random_qtip(1, 32, 64, "1mad", 2)
    x = jnp.ones((1, 64), jnp.float32)
    with pytest.raises(ValueError, match="k must be one of"):
        pallas_kernels.qtip_matvec(x, qt.codes, None, code="1mad", k=5, interpret=True)
    with pytest.raises(ValueError, match="code must be one of"):
        pallas_kernels.qtip_matvec(x, qt.codes, None, code="lut", k=2, interpret=True)
    with pytest.raises(ValueError, match=r"codes must be \[out/16, in/16, 24\]"):
        pallas_kernels.qtip_matvec(x, qt.codes, None, code="1mad", k=3, interpret=True)
    with pytest.raises(ValueError, match="x has 128 inputs"):
        pallas_kernels.qtip_matvec(jnp.ones((1, 128)), qt.codes, None, code="1mad", k=2, interpret=True)
    with pytest.raises(ValueError, match="hyb needs"):
        pallas_kernels.qtip_matvec(x, qt.codes, None, code="hyb", k=2, interpret=True)
    with pytest.raises(ValueError, match="L must be in"):
        pallas_kernels.qtip_matvec(x, qt.codes, None, code="1mad", k=2, L=28, interpret=True)
    lut = QTIPQuantized(jnp.zeros((2, 4, 16), jnp.int32), jnp.ones((1,)), jnp.ones((64,), jnp.float16),
                        jnp.ones((32,), jnp.float16), jnp.zeros((1 << 12, 1), jnp.float16), (32, 64), 2, "lut", 12, 1)
    with pytest.raises(ValueError, match="backend 'pallas': code lut has no kernel"):
        lut.matmul(x, backend="pallas")


# ------------------------------------------------------------------ E8P


def resid_table(bits: int):
    """The residual codebook the 3-bit kernel takes (None at 2 and 4 bits)."""
    return jnp.asarray(jq_e8p.e8_onebit_codebook()) if bits == 3 else None


@pytest.mark.parametrize("bits,batch", [(2, 1), (3, 1), (3, 3), (4, 4)])
def test_e8p_matvec_matches_decode(bits, batch):
    qw = random_quip(30 + bits, 32, 128, bits)
    x = normal(batch, (batch, 128))
    table = pallas_kernels.e8p_table(jq_e8p.e8p_source_set())
    y = pallas_kernels.e8p_matvec(x, qw.codes, table, bits=bits, resid_table=resid_table(bits),
                                  resid_scale=jq_e8p.get_codebook(bits).resid_scale or 1.0, interpret=INTERPRET)
    assert rel_err(y, jnp.matmul(x, qw.rotated().T, precision=HIGHEST)) < 1e-5


@pytest.mark.parametrize("bits,batch", [(2, 5), (3, 8), (4, 16)])
def test_e8p_matmul_matches_decode(bits, batch):
    """Tensor-core version: x rounded to fp16 (relative 2^-11 per element), RVQ's decoded sums too."""
    qw = random_quip(40 + bits, 48, 256, bits)
    x = normal(batch, (batch, 256))
    table = pallas_kernels.e8p_table(jq_e8p.e8p_source_set())
    y = pallas_kernels.e8p_matmul(x, qw.codes, table, bits=bits, block_rows=16, resid_table=resid_table(bits),
                                  resid_scale=jq_e8p.get_codebook(bits).resid_scale or 1.0, interpret=INTERPRET)
    assert y.shape == (batch, 48) and y.dtype == jnp.float32
    assert rel_err(y, jnp.matmul(x, qw.rotated().T, precision=HIGHEST)) < 2.0**-11
    with pytest.raises(ValueError, match="1 to 16 rows"):
        pallas_kernels.e8p_matmul(normal(1, (17, 256)), qw.codes, table, bits=bits, resid_table=resid_table(bits),
                                  interpret=True)
    with pytest.raises(ValueError, match="16-aligned"):
        pallas_kernels.e8p_matmul(x, qw.codes[:8], table, bits=bits, resid_table=resid_table(bits), interpret=True)


def test_e8p_table_decodes_every_code():
    """The kernel's decode rule (table + sign bits + shift) on all 2^16 codes, as one matvec per
    coordinate: x = e_d picks coordinate d of every codeword."""
    codes = np.arange(1 << 16, dtype=np.uint32)
    packed = np.stack([codes & 0xFF, codes >> 8], -1).astype(np.uint8).reshape(1 << 13, 8, 2)
    eye = jnp.eye(8, dtype=jnp.float32)
    table = pallas_kernels.e8p_table(jq_e8p.e8p_source_set())
    cw = jq_e8p.e8p_codewords().reshape(1 << 13, 64)  # 8 codewords per row of 64 weights
    for d in (0, 7):
        x = jnp.tile(eye[d], 8)[None]  # coordinate d of each of the 8 codewords of a row
        y = pallas_kernels.e8p_matvec(x, jnp.asarray(packed), table, bits=2, interpret=INTERPRET)
        np.testing.assert_array_equal(np.asarray(y[0]), cw[:, d::8].sum(1))


@pytest.mark.parametrize("bits", [3, 4])
def test_quip_matmul_backend_pallas(bits):
    """The whole product (RVQ3, RVQ4): 384 = 3 · 128 inputs take the Pallas FWHT plus the 3 x 3 factor."""
    qw = random_quip(44, 32, 384, bits)
    x = normal(41, (2, 384))
    ref = jnp.matmul(x, qw.dequantize().T, precision=HIGHEST)
    assert rel_err(qw.matmul(x[:1], backend="pallas"), ref[:1]) < 1e-5
    assert rel_err(qw.matmul(x, backend="pallas"), ref) < 2.0**-11  # 2 rows: tensor cores, x in fp16


def test_e8p_matvec_errors():
    qw = random_quip(1, 32, 64, 2)
    table = pallas_kernels.e8p_table(jq_e8p.e8p_source_set())
    x = jnp.ones((1, 64), jnp.float32)
    with pytest.raises(ValueError, match="bits must be one of"):
        pallas_kernels.e8p_matvec(x, qw.codes, table, bits=5, interpret=True)
    with pytest.raises(ValueError, match="3 bits need resid_table"):
        pallas_kernels.e8p_matvec(x, random_quip(3, 32, 64, 3).codes, table, bits=3, interpret=True)
    with pytest.raises(ValueError, match="do not fit x"):
        pallas_kernels.e8p_matvec(jnp.ones((1, 128)), qw.codes, table, bits=2, interpret=True)
    with pytest.raises(ValueError, match="table must be"):
        pallas_kernels.e8p_matvec(x, qw.codes, table[:128], bits=2, interpret=True)
    with pytest.raises(ValueError, match=r"source set must be \[256, 8\]"):
        pallas_kernels.e8p_table(np.zeros((128, 8)))
    rvq3 = random_quip(2, 32, 64, 3)
    with pytest.raises(ValueError, match="backend 'cuda': codebook e8p-rvq3 has no CUDA kernel"):
        rvq3.matmul(x, backend="cuda")


# ------------------------------------------------------------------ lowering and dispatch


def test_kernels_lower_to_triton_for_cuda():
    x = jnp.ones((2, 256), jnp.float32)
    for code in ("1mad", "3inst", "hyb"):
        qt = random_qtip(2, 32, 256, code, 3)
        text = lower_for_cuda(lambda x, qt=qt, code=code: pallas_kernels.qtip_matvec(
            x, qt.codes, qt.table if code == "hyb" else None, code=code, k=3), x)
        assert "triton" in text, code
    qw = random_quip(1, 64, 256, 4)
    table = pallas_kernels.e8p_table(jq_e8p.e8p_source_set())
    assert "triton" in lower_for_cuda(lambda x: pallas_kernels.e8p_matvec(x, qw.codes, table, bits=4,
                                                                           resid_scale=3.45), x)
    assert "triton" in lower_for_cuda(lambda x: pallas_kernels.e8p_matmul(x, qw.codes, table, bits=4,
                                                                           resid_scale=3.45), x)
    rvq3 = random_quip(2, 64, 256, 3)
    for kernel in (pallas_kernels.e8p_matvec, pallas_kernels.e8p_matmul):
        assert "triton" in lower_for_cuda(lambda x, kernel=kernel: kernel(
            x, rvq3.codes, table, bits=3, resid_scale=2.04, resid_table=resid_table(3)), x)
    for n in (8, 64, 4096, 32768):
        s = jnp.ones((n,), jnp.float32)
        assert "triton" in lower_for_cuda(lambda x, s=s: pallas_kernels.hadamard(x, s, signs_after=True),
                                          jnp.ones((3, n), jnp.bfloat16)), n


def test_auto_picks_pallas_only_where_measured(monkeypatch):
    x = jnp.ones((2, 256), jnp.float32)
    assert dispatch.vq_choice("qtip", None, x, "auto") == "reference" or dispatch.on_gpu()
    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
    monkeypatch.setattr(dispatch, "_cuda_ready", lambda: False)
    assert dispatch.vq_choice("qtip", None, x, "auto") == "reference"
    assert dispatch.vq_choice("quip#", None, x, "pallas") == "pallas"
    from jaxquant.formats import tuning  # where the table measured the Pallas linear fastest, if it serves

    monkeypatch.setattr(tuning, "load", lambda path=None: {"choices": {"e8p/2/1": "reference", "e8p/2/8": "pallas"}})
    assert dispatch.vq_choice("quip#", None, x, "auto", tuned="e8p", bits=2, pallas_issue=None) == "reference"
    x8 = jnp.ones((8, 256), jnp.float32)
    assert dispatch.vq_choice("quip#", None, x8, "auto", tuned="e8p", bits=2, pallas_issue=None) == "pallas"
    assert dispatch.vq_choice("quip#", None, x8, "auto", tuned="e8p", bits=2) == "reference"  # not measured
    with pytest.raises(ValueError, match="backend 'pallas': x dtype int32"):
        dispatch.vq_choice("quip#", None, x.astype(jnp.int32), "pallas")


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("code", ["1mad", "3inst", "hyb"])
def test_qtip_matvec_gpu(code):
    for k in (2, 3, 4):
        qt = random_qtip(100 + k, 4096, 4096, code, k)
        wc = qtip_code_values(qt)
        for batch in (1, 4, 16):
            x = normal(batch, (batch, 4096))
            y = pallas_kernels.qtip_matvec(x, qt.codes, qt.table if code == "hyb" else None, code=code, k=k)
            assert rel_err(y, jnp.matmul(x, wc.T, precision=HIGHEST)) < 1e-5, (k, batch)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_e8p_matvec_gpu(bits):
    qw = random_quip(200 + bits, 4096, 4096, bits)
    table = pallas_kernels.e8p_table(jq_e8p.e8p_source_set())
    for batch in (1, 4, 16):
        x = normal(batch, (batch, 4096))
        y = pallas_kernels.e8p_matvec(x, qw.codes, table, bits=bits, resid_table=resid_table(bits),
                                      resid_scale=jq_e8p.get_codebook(bits).resid_scale or 1.0)
        assert rel_err(y, jnp.matmul(x, qw.rotated().T, precision=HIGHEST)) < 1e-5, batch


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_e8p_matmul_gpu(bits):
    table = pallas_kernels.e8p_table(jq_e8p.e8p_source_set())
    for out, inp in ((4096, 4096), (11008, 4096), (8192, 28672)):
        qw = random_quip(300 + bits + out, out, inp, bits)
        q = qw.rotated()
        for batch in (2, 8, 16):
            x = normal(batch, (batch, inp))
            y = pallas_kernels.e8p_matmul(x, qw.codes, table, bits=bits, resid_table=resid_table(bits),
                                          resid_scale=jq_e8p.get_codebook(bits).resid_scale or 1.0)
            assert rel_err(y, jnp.matmul(x, q.T, precision=HIGHEST)) < 2.0**-11, (out, inp, batch)


@pytest.mark.gpu
def test_hadamard_gpu():
    for n in (2, 8, 64, 1024, 8192, 16384, 32768):
        x = normal(n, (16, n))
        s = jnp.sign(normal(1, (n,)))
        assert rel_err(pallas_kernels.hadamard(x, s), jq_hadamard.rht(x, s)) < 1e-5, n
        assert rel_err(pallas_kernels.hadamard(x, s, signs_after=True), jq_hadamard.rht_inverse(x, s)) < 1e-5, n
