"""GPU kernels against their jnp references: the scalar decode-matvec (Pallas, CUDA) and the
Walsh-Hadamard transform (CUDA).

On CPU: Pallas in interpret mode, lowering of the Pallas (Triton) and FFI calls for the CUDA
platform, nvcc compilation of the CUDA sources, backend dispatch. On a GPU (``-m gpu``): every
kernel against the reference on fresh random inputs.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cuda_ffi
import pallas_kernels
from cuda_ffi import build as cuda_build
from cuda_ffi import ops as cuda_ops
from jaxquant import hadamard as jq_hadamard
from jaxquant.formats import dispatch, packing
from jaxquant.formats.scalar import PermutedScalarQuantized, ScalarQuantized, padded_width

HIGHEST = jax.lax.Precision.HIGHEST


def random_scalar(key, out: int, inp: int, bits: int, group_size: int) -> ScalarQuantized:
    """Uniform random codes, positive scales and zeros in code units (fp16, as stored)."""
    kq, ks, kz = jax.random.split(key, 3)
    width = padded_width((out, inp), group_size, 1)
    q = jax.random.randint(kq, (out, width), 0, 2**bits).astype(jnp.uint32)
    groups = out * width // group_size
    scale = jax.random.uniform(ks, (groups, 1), jnp.float32, 0.5, 1.5) / 2**bits
    zero = jax.random.uniform(kz, (groups, 1), jnp.float32, 0.0, 2.0**bits - 1)
    return ScalarQuantized(packing.pack(q, bits), scale.astype(jnp.float16), zero.astype(jnp.float16),
                           (out, inp), bits, group_size)


def reference(qw: ScalarQuantized, x: jax.Array) -> np.ndarray:
    return np.asarray(jnp.matmul(x.astype(jnp.float32), qw.dequantize(jnp.float32).T, precision=HIGHEST))


def rel_err(y, ref) -> float:
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.all(np.isfinite(y)), "non-finite output"
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


TOL = {jnp.float32: 1e-4, jnp.float16: 2e-3, jnp.bfloat16: 1e-2}


# ------------------------------------------------------------------ CPU: Pallas in interpret mode

@pytest.mark.parametrize("bits,out,inp,group,batch", [
    (4, 64, 256, 64, 1),
    (2, 32, 200, 64, 3),   # rows padded to whole groups; x padded inside the wrapper
    (8, 48, 128, 32, 1),
])
def test_pallas_scalar_matvec_interpret(bits, out, inp, group, batch):
    qw = random_scalar(jax.random.key(bits * 1000 + out), out, inp, bits, group)
    x = jax.random.normal(jax.random.key(7 + batch), (batch, inp), jnp.float32)
    y = pallas_kernels.scalar_matvec(x, qw.codes, qw.scale, qw.zero, bits=bits, group_size=group,
                                     block_rows=16, block_words=8, interpret=True)
    assert y.shape == (batch, out) and y.dtype == x.dtype
    assert rel_err(y, reference(qw, x)) < 1e-5


def test_pallas_plan_blocks_are_powers_of_two():
    # Llama-2-7B down_proj at 2 bits: 11008 inputs -> 688 words, groups of 8 words.
    bn, bw = pallas_kernels.plan(4096, 688, 2, 128, block_rows=64, block_words=64)
    assert (bn, bw) == (64, 8)
    with pytest.raises(ValueError, match="bits"):
        pallas_kernels.plan(64, 96, 3, 128)


# unit roundoff of x's dtype: the tensor-core kernel's only rounding is its output's (and, for groups
# under 16 words, the weights', as the reference dequantizes them)
UNIT_ROUNDOFF = {jnp.float16: 2.0**-11, jnp.bfloat16: 2.0**-8}


@pytest.mark.parametrize("bits,out,inp,group,batch,dtype,splits,offset", [
    (4, 64, 512, 128, 5, jnp.bfloat16, None, None),  # scale and zero applied to the dots' sums; 128 + q
    (4, 64, 512, 128, 16, jnp.float16, 2, False),     # the input axis split over two programs; q converted
    (4, 32, 768, 128, 4, jnp.bfloat16, 4, None),      # 6 steps over 4 splits: 2 repeated steps weighted 0
    (8, 32, 256, 64, 2, jnp.bfloat16, None, None),    # 8-bit codes do not fit bf16's offset: converted
    (8, 32, 256, 64, 3, jnp.float16, None, True),     # 1024 + q
    (2, 32, 1024, 64, 9, jnp.float16, None, None),    # 4-word groups: weights decoded before the dots
    (4, 48, 500, 32, 3, jnp.bfloat16, 3, None),       # 4-word groups; x padded to the rows' whole groups
])
def test_pallas_scalar_matmul_interpret(bits, out, inp, group, batch, dtype, splits, offset):
    qw = random_scalar(jax.random.key(bits * 1000 + out + batch), out, inp, bits, group)
    x = jax.random.normal(jax.random.key(7 + batch), (batch, inp), jnp.float32).astype(dtype)
    y = pallas_kernels.scalar_matmul(x, qw.codes, qw.scale, qw.zero, bits=bits, group_size=group,
                                     block_rows=16, splits=splits, offset=offset, interpret=True)
    assert y.shape == (batch, out) and y.dtype == x.dtype
    assert rel_err(y, reference(qw, x)) < UNIT_ROUNDOFF[dtype]


def test_pallas_scalar_matmul_plan_and_errors():
    # 4 bits, groups of 128: 16-word steps inside a group; groups of 64 (8 words) decode weights
    assert pallas_kernels.plan_tc(4096, 1024, 4, 128) == (128, 16, True)
    assert pallas_kernels.plan_tc(4096, 1024, 4, 64) == (128, 16, False)
    with pytest.raises(ValueError, match="16-aligned"):
        pallas_kernels.plan_tc(32, 40, 2, 64)  # 40 words per row: no 16-word step
    qw = random_scalar(jax.random.key(5), 64, 512, 4, 128)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        pallas_kernels.scalar_matmul(jnp.ones((2, 512)), qw.codes, qw.scale, qw.zero, bits=4, group_size=128)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        pallas_kernels.scalar_matmul(jnp.ones((17, 512), jnp.bfloat16), qw.codes, qw.scale, qw.zero, bits=4,
                                     group_size=128)
    with pytest.raises(ValueError, match="offset decode"):  # 8-bit codes beyond bf16's 8 significant bits
        q8 = random_scalar(jax.random.key(6), 32, 256, 8, 64)
        pallas_kernels.scalar_matmul(jnp.ones((2, 256), jnp.bfloat16), q8.codes, q8.scale, q8.zero, bits=8,
                                     group_size=64, offset=True)
    with pytest.raises(ValueError, match="splits"):  # 64 words: 4 steps of 16
        pallas_kernels.scalar_matmul(jnp.ones((2, 512), jnp.bfloat16), qw.codes, qw.scale, qw.zero, bits=4,
                                     group_size=128, splits=5)


def test_pallas_backend_takes_tensor_cores_for_2_to_16_rows_of_16_bit_x():
    qw = random_scalar(jax.random.key(6), 64, 512, 4, 128)
    for rows, dtype, expected in ((1, jnp.bfloat16, False), (2, jnp.bfloat16, True), (16, jnp.float16, True),
                                  (17, jnp.bfloat16, False), (8, jnp.float32, False)):
        assert dispatch.pallas_tensor_cores(qw, jnp.ones((rows, 512), dtype)) == expected, (rows, dtype)
    narrow = random_scalar(jax.random.key(7), 8, 512, 4, 128)  # 8 output rows: below the dot's N
    assert not dispatch.pallas_tensor_cores(narrow, jnp.ones((4, 512), jnp.bfloat16))


def _halves(u: int, dtype) -> tuple[float, float]:
    return tuple(float(v) for v in np.array([u & 0xFFFF, u >> 16], np.uint16).view(dtype))


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_scalar_mma_fragment_mapping_emulated(dtype):
    """scalar_mma4_kernel's per-lane work, step by step in Python, for one 16-row tile, 8 rows of x and
    one 128-input group: its A registers from the lane's code words (OFFSET + q by shift and mask), its
    B registers from 8 inputs of x by byte permutes, mma.m16n8k16 placed by the PTX fragment layout,
    the fold with scale, zero and the group's sum of x -- against (q - z) * s @ x."""
    import ml_dtypes

    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    offset_bits, offset = (0x64006400, 1024.0) if dt == np.float16 else (0x43004300, 128.0)
    rng = np.random.default_rng()
    q = rng.integers(0, 16, (16, 128))
    codes = np.asarray(packing.pack(jnp.asarray(q, jnp.uint32), 4)).astype(np.uint32)  # [16, 16 words]
    x = rng.standard_normal((8, 128)).astype(dt)
    xbits = x.view(np.uint16).astype(np.uint64)
    scale, zero = rng.uniform(0.5, 1.5, 16), rng.uniform(0, 15, 16)
    a_mat, d = np.zeros((16, 16)), np.zeros((32, 4))
    for j in range(4):  # word j of each lane: two k-tiles
        for half in range(2):  # k-tile 2j + half
            a_mat = np.full((16, 16), np.nan)
            b_mat = np.full((16, 8), np.nan)
            for lane in range(32):
                g, qq = lane // 4, lane % 4
                lo, hi = int(codes[g, 4 * qq + j]), int(codes[g + 8, 4 * qq + j])
                sh = 8 * half
                regs = [((w >> s) & 0x000F000F) | offset_bits for w, s in ((lo, sh), (hi, sh), (lo, sh + 4), (hi, sh + 4))]
                for r, (row, col) in enumerate(((g, 2 * qq), (g + 8, 2 * qq), (g, 2 * qq + 8), (g + 8, 2 * qq + 8))):
                    a_mat[row, col:col + 2] = _halves(regs[r], dt)
                v = [int(xbits[g, 32 * qq + 8 * j + 2 * e]) | int(xbits[g, 32 * qq + 8 * j + 2 * e + 1]) << 16
                     for e in range(4)]  # the uint4 of inputs 32q + 8j + 0..7
                pair = (v[0], v[2]) if half == 0 else (v[1], v[3])
                b0, b1 = _byte_perm(*pair, 0x5410), _byte_perm(*pair, 0x7632)
                b_mat[2 * qq:2 * qq + 2, g] = _halves(b0, dt)
                b_mat[2 * qq + 8:2 * qq + 10, g] = _halves(b1, dt)
            assert not np.isnan(a_mat).any() and not np.isnan(b_mat).any()  # every fragment slot written
            dd = a_mat @ b_mat
            for lane in range(32):
                g, qq = lane // 4, lane % 4
                d[lane] += [dd[g, 2 * qq], dd[g, 2 * qq + 1], dd[g + 8, 2 * qq], dd[g + 8, 2 * qq + 1]]
    xsum = x.astype(np.float64).sum(1)
    y = np.zeros((8, 16))
    for lane in range(32):
        g, qq = lane // 4, lane % 4
        for e in range(4):
            row, xrow = g + 8 * (e // 2), 2 * qq + (e & 1)
            y[xrow, row] = scale[row] * (d[lane, e] - (zero[row] + offset) * xsum[xrow])
    ref = x.astype(np.float64) @ ((q - zero[:, None]) * scale[:, None]).T
    np.testing.assert_allclose(y, ref, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ CPU: lowering for CUDA

def _lower_for_cuda(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pallas_lowers_to_triton_for_cuda(bits):
    qw = random_scalar(jax.random.key(bits), 256, 1024, bits, 128)
    x = jnp.ones((1, 1024), jnp.bfloat16)
    text = _lower_for_cuda(lambda x: pallas_kernels.scalar_matvec(
        x, qw.codes, qw.scale, qw.zero, bits=bits, group_size=128), x)
    assert "triton" in text
    for dtype in (jnp.bfloat16, jnp.float16):
        text = _lower_for_cuda(lambda x: pallas_kernels.scalar_matmul(
            x, qw.codes, qw.scale, qw.zero, bits=bits, group_size=128), jnp.ones((8, 1024), dtype))
        assert "triton" in text


def test_cuda_ffi_calls_lower_for_cuda():
    qw = random_scalar(jax.random.key(3), 128, 512, 3, 128)
    x = jnp.ones((2, 512), jnp.float16)
    text = _lower_for_cuda(lambda x: cuda_ops.scalar_matvec(
        x, qw.codes, qw.scale, qw.zero, bits=3, group_size=128, register=False), x)
    assert "jaxquant_scalar_matvec" in text
    text = _lower_for_cuda(lambda x: cuda_ops.scalar_matvec(  # 9 rows: calls of 4, 4 and 1
        x, qw.codes, qw.scale, qw.zero, bits=3, group_size=128, register=False), jnp.ones((9, 512), jnp.float16))
    assert text.count("custom_call @jaxquant_scalar_matvec(") == 3
    qw4 = random_scalar(jax.random.key(4), 256, 1024, 4, 128)
    text = _lower_for_cuda(lambda x: cuda_ops.scalar_mma(x, qw4.codes, qw4.scale, qw4.zero, group_size=128,
                                                         register=False), jnp.ones((5, 1024), jnp.bfloat16))
    assert "jaxquant_scalar_mma" in text
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        cuda_ops.scalar_mma(jnp.ones((2, 1024)), qw4.codes, qw4.scale, qw4.zero, group_size=128, register=False)
    with pytest.raises(ValueError, match="multiple of 128"):
        cuda_ops.scalar_mma(jnp.ones((2, 1024), jnp.float16), qw4.codes, qw4.scale, qw4.zero, group_size=64,
                            register=False)
    qw2 = random_scalar(jax.random.key(5), 256, 1024, 2, 128)  # 2-bit: 64 words hold the 1024 inputs
    text = _lower_for_cuda(lambda x: cuda_ops.scalar_mma(x, qw2.codes, qw2.scale, qw2.zero, group_size=128, bits=2,
                                                         register=False), jnp.ones((5, 1024), jnp.float16))
    call = [line for line in text.splitlines() if "jaxquant_scalar_mma" in line]
    assert call and "tensor<8x1024xf16>" in call[0] and "bits = 2" in call[0]
    with pytest.raises(ValueError, match="bits must be 2 or 4"):
        cuda_ops.scalar_mma(jnp.ones((2, 1024), jnp.float16), qw2.codes, qw2.scale, qw2.zero, group_size=128, bits=3,
                            register=False)
    signs = jnp.ones((1024,), jnp.float32)
    text = _lower_for_cuda(lambda x: cuda_ops.hadamard(x, signs, register=False), jnp.ones((4, 1024), jnp.bfloat16))
    assert "jaxquant_hadamard" in text
    signs = jnp.ones((28672,), jnp.float32)
    text = _lower_for_cuda(lambda x: cuda_ops.hadamard_k(x, signs, inverse=True, register=False),
                           jnp.ones((2, 28672), jnp.float32))
    assert "jaxquant_hadamard_k" in text and "stablehlo.abs" in text  # the kernel flips; magnitudes in XLA
    text = _lower_for_cuda(lambda x: cuda_ops.hadamard_k(x, signs, unit_signs=True, register=False),
                           jnp.ones((2, 28672), jnp.float32))
    assert "jaxquant_hadamard_k" in text and "stablehlo.abs" not in text
    with pytest.raises(ValueError, match="K \\* 2\\^p"):
        cuda_ops.hadamard_k(jnp.ones((1, 11008)), register=False)  # K = 172: the einsum path's


def test_cuda_sources_compile():
    if cuda_build.nvcc_path() is None:
        pytest.skip("nvcc not found: the CUDA sources cannot be compiled on this machine")
    lib = cuda_build.compile_library()  # cached by source hash after the first build
    import subprocess

    symbols = subprocess.run(["nm", "-D", str(lib)], capture_output=True, text=True).stdout
    for symbol in cuda_build.TARGETS.values():
        assert symbol in symbols


# ------------------------------------------------------------------ CPU: dispatch

def test_dispatch_on_cpu():
    qw = random_scalar(jax.random.key(11), 32, 256, 4, 128)
    x = jax.random.normal(jax.random.key(12), (2, 256), jnp.float32)
    ref = reference(qw, x)
    if jax.default_backend() == "cpu":
        assert dispatch.choose_scalar(qw, x, "auto") == "reference"
        with pytest.raises(cuda_ffi.CudaFFIUnavailable):
            qw.matmul(x, backend="cuda")
        with pytest.raises(cuda_ffi.CudaFFIUnavailable, match="GPU"):
            cuda_ffi.load()
    assert rel_err(qw.matmul(x), ref) < 1e-5
    assert rel_err(qw.matmul(x, backend="pallas"), ref) < 1e-5  # interpret mode off the GPU
    with pytest.raises(ValueError, match="backend"):
        qw.matmul(x, backend="triton")
    qw3 = random_scalar(jax.random.key(13), 32, 256, 3, 128)
    with pytest.raises(ValueError, match="3-bit"):
        qw3.matmul(x, backend="pallas")
    perm = jax.random.permutation(jax.random.key(14), 256).astype(jnp.int16)
    pq = PermutedScalarQuantized(qw.codes, qw.scale, qw.zero, perm, qw.shape, qw.bits, qw.group_size)
    expected = np.asarray(x @ pq.dequantize().T)
    assert rel_err(pq.matmul(x), expected) < 1e-5


def test_cuda_tensor_cores_choice():
    """backend="cuda" takes scalar_mma only where it can run: 2 or 4 bits, 2-16 rows of 16-bit x, groups
    of a multiple of 128 (rows are stored padded to whole groups)."""
    rows = lambda n, dtype=jnp.bfloat16: jnp.zeros((n, 1024), dtype)  # noqa: E731
    for bits in (2, 4):
        qw = random_scalar(jax.random.key(15), 64, 1024, bits, 128)
        assert all(dispatch.cuda_tensor_cores(qw, rows(n)) for n in (2, 9, 16))
        assert dispatch.cuda_tensor_cores(qw, jnp.zeros((2, 3, 1024), jnp.float16))
        assert not any(dispatch.cuda_tensor_cores(qw, rows(n)) for n in (1, 17))
        assert not dispatch.cuda_tensor_cores(qw, rows(4, jnp.float32))
    for bits, group in ((3, 128), (8, 128), (4, 64), (2, 32)):
        other = random_scalar(jax.random.key(16), 64, 1024, bits, group)
        assert not dispatch.cuda_tensor_cores(other, rows(4)), (bits, group)
    for bits in (2, 4):
        smol = random_scalar(jax.random.key(17), 64, 576, bits, 128)  # rows padded to whole groups (640)
        assert dispatch.cuda_tensor_cores(smol, jnp.zeros((4, 576), jnp.bfloat16)), bits


# ------------------------------------------------------------------ GPU

SHAPES = [(256, 1024, 128), (96, 576, 64), (4096, 4096, 128), (1000, 2048, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_cuda_scalar_matvec_gpu(bits, dtype):
    for i, (out, inp, group) in enumerate(SHAPES):
        for batch in (1, 3, 16):
            key = jax.random.key(100 * bits + 10 * i + batch)
            qw = random_scalar(key, out, inp, bits, group)
            x = jax.random.normal(jax.random.fold_in(key, 1), (batch, inp), jnp.float32).astype(dtype)
            y = jax.jit(lambda x, qw: qw.matmul(x, backend="cuda"))(x, qw)
            assert y.dtype == dtype
            err = rel_err(y, reference(qw, x))
            assert err < TOL[dtype], (out, inp, group, batch, err)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pallas_scalar_matvec_gpu(bits):
    for i, (out, inp, group) in enumerate(SHAPES):
        for batch in (1, 4):
            key = jax.random.key(10_000 + 100 * bits + 10 * i + batch)
            qw = random_scalar(key, out, inp, bits, group)
            x = jax.random.normal(jax.random.fold_in(key, 1), (batch, inp), jnp.bfloat16)
            y = jax.jit(lambda x, qw: qw.matmul(x, backend="pallas"))(x, qw)
            assert rel_err(y, reference(qw, x)) < TOL[jnp.bfloat16], (out, inp, group, batch)


@pytest.mark.gpu
def test_pallas_scalar_matmul_gpu():
    """The tensor-core kernel at Llama and small shapes: each decode (128 + q, 1024 + q, converted,
    weights decoded for small groups), 2 to 16 rows, both 16-bit types."""
    cases = [(4, 4096, 4096, 128, 8, jnp.float16), (4, 8192, 28672, 128, 16, jnp.bfloat16),
             (4, 4096, 11008, 128, 2, jnp.bfloat16), (2, 11008, 4096, 128, 16, jnp.bfloat16),
             (2, 4096, 4096, 256, 4, jnp.float16), (8, 4096, 4096, 128, 8, jnp.bfloat16),
             (8, 1024, 4096, 64, 5, jnp.float16), (4, 1024, 4096, 32, 3, jnp.bfloat16),
             (4, 256, 1024, 64, 16, jnp.float16)]
    for i, (bits, out, inp, group, batch, dtype) in enumerate(cases):
        key = jax.random.key(20_000 + i)
        qw = random_scalar(key, out, inp, bits, group)
        x = jax.random.normal(jax.random.fold_in(key, 1), (batch, inp), jnp.float32).astype(dtype)
        y = jax.jit(lambda x, qw: qw.matmul(x, backend="pallas"))(x, qw)
        assert dispatch.pallas_tensor_cores(qw, x)
        assert rel_err(y, reference(qw, x)) < UNIT_ROUNDOFF[dtype], (bits, out, inp, group, batch, dtype)


@pytest.mark.gpu
def test_cuda_scalar_mma_gpu():
    """The tensor-core CUDA kernel: Llama and small shapes, groups of 128 and 256, 1-16 rows, both 16-bit
    types, default and forced splits, 2 and 4 tiles per warp, with and without the prefetch, 4-bit and
    2-bit codes; and backend="cuda" taking it for 2-16 rows of 2- and 4-bit codes."""
    cases = [(4096, 4096, 128), (11008, 4096, 128), (4096, 11008, 128), (8192, 28672, 128), (300, 1024, 256)]
    runs = ((1, jnp.bfloat16, 0, 4, True), (5, jnp.float16, 0, 2, True), (8, jnp.bfloat16, 3, 4, False),
            (16, jnp.float16, 0, 4, True), (13, jnp.bfloat16, 1, 2, False))
    for i, (out, inp, group) in enumerate(cases):
        qw = random_scalar(jax.random.key(30_000 + i), out, inp, 4, group)
        for batch, dtype, splits, tiles, prefetch in runs:
            x = jax.random.normal(jax.random.key(31_000 + batch), (batch, inp), jnp.float32).astype(dtype)
            y = jax.jit(lambda x, qw: cuda_ffi.scalar_mma(x, qw.codes, qw.scale, qw.zero, group_size=group,
                                                          splits=splits, tiles=tiles, prefetch=prefetch))(x, qw)
            assert y.shape == (batch, out) and y.dtype == dtype
            assert rel_err(y, reference(qw, x)) < UNIT_ROUNDOFF[dtype], (out, inp, group, batch, dtype, splits)
        q2 = random_scalar(jax.random.key(33_000 + i), out, inp, 2, group)
        for batch, dtype, splits, tiles, _ in runs:
            x = jax.random.normal(jax.random.key(34_000 + batch), (batch, inp), jnp.float32).astype(dtype)
            y = jax.jit(lambda x, qw: cuda_ffi.scalar_mma(x, qw.codes, qw.scale, qw.zero, group_size=group, bits=2,
                                                          splits=splits, tiles=tiles))(x, q2)
            assert rel_err(y, reference(q2, x)) < UNIT_ROUNDOFF[dtype], (out, inp, group, batch, dtype, splits, 2)
        x = jax.random.normal(jax.random.key(32_000 + i), (2, 3, inp), jnp.bfloat16)
        for w in (qw, q2):
            assert dispatch.cuda_tensor_cores(w, x)
            y = jax.jit(lambda x, w: w.matmul(x, backend="cuda"))(x, w)
            assert y.shape == (2, 3, out) and rel_err(y, reference(w, x)) < UNIT_ROUNDOFF[jnp.bfloat16], w.bits


@pytest.mark.gpu
def test_auto_dispatch_gpu():
    qw = random_scalar(jax.random.key(21), 512, 1024, 4, 128)
    x = jax.random.normal(jax.random.key(22), (1, 1024), jnp.bfloat16)
    assert dispatch.choose_scalar(qw, x, "auto") in ("cuda", "pallas")
    assert rel_err(qw.matmul(x), reference(qw, x)) < TOL[jnp.bfloat16]
    xb = jax.random.normal(jax.random.key(23), (64, 1024), jnp.bfloat16)
    assert dispatch.choose_scalar(qw, xb, "auto") == "reference"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_cuda_hadamard_gpu(dtype):
    """Every n = 2^1 .. 2^15; 1, 3 and 1000 rows (partial blocks); signs before and after; no
    normalization; leading batch axes."""
    for logn in range(1, 16):
        n = 2**logn
        key = jax.random.key(logn)
        x = jax.random.normal(key, (1000, n), jnp.float32).astype(dtype)
        signs = jq_hadamard.random_signs(jax.random.fold_in(key, 1), n)
        ref_all = jq_hadamard.rht(x.astype(jnp.float32), signs)
        ref_back = jq_hadamard.rht_inverse(jnp.asarray(ref_all, dtype).astype(jnp.float32), signs)
        ref_plain = _fwht_np(np.asarray(jnp.asarray(x, jnp.float32), np.float64))
        three = jax.jit(lambda xr, yr: (cuda_ffi.hadamard(xr, signs), cuda_ffi.hadamard(yr, signs, signs_after=True),
                                        cuda_ffi.hadamard(xr, normalize=False)))  # one compilation per row count
        for rows in (1, 3, 1000):
            fwd, back, plain = three(x[:rows], jnp.asarray(ref_all[:rows], dtype))
            assert rel_err(fwd, ref_all[:rows]) < TOL[dtype], (n, rows)
            assert rel_err(back, ref_back[:rows]) < TOL[dtype], (n, rows)
            assert rel_err(plain, ref_plain[:rows]) < TOL[dtype], (n, rows)
        x3 = x[:15].reshape(3, 5, n)
        assert rel_err(cuda_ffi.hadamard(x3, signs), np.asarray(ref_all[:15]).reshape(3, 5, n)) < TOL[dtype], n
        parts = x[:12].reshape(4, 3, n)  # the transform of their sum
        summed = jq_hadamard.rht_inverse(parts.astype(jnp.float32).sum(0), signs)
        assert rel_err(cuda_ffi.hadamard(parts, signs, signs_after=True, sum_parts=True), summed) < TOL[dtype], n
        if dtype == jnp.float32:  # exact-ish: the kernel's output against float64
            assert rel_err(cuda_ffi.hadamard(x[:3], normalize=False), _fwht_np(np.asarray(x[:3], np.float64))) < 1e-6


# ------------------------------------------------------------------ Hadamard kernel: index plan emulated

HAD_LOCAL_BITS = 5  # mirrors kHadLocalBits / kHadVecBits / kHadMinThreadBits in jaxquant_kernels.cu
HAD_VEC_BITS = 3
HAD_MIN_THREAD_BITS = 8


def _fwht_np(x: np.ndarray) -> np.ndarray:
    """Unnormalized Sylvester-ordered Walsh-Hadamard transform of the last axis (NumPy)."""
    x = np.array(x, np.float64)
    lead, n = x.shape[:-1], x.shape[-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :].copy(), y[..., 1, :].copy()
        y[..., 0, :], y[..., 1, :] = a + b, a - b
        h *= 2
    return x


def _had_plan(logn: int):
    """Python mirror of the kernel's plan: (row bits, threads per block, [(local, active) per stage])."""
    b, v = HAD_LOCAL_BITS, HAD_VEC_BITS
    if logn <= b:
        full = (1 << logn) - 1
        return HAD_MIN_THREAD_BITS, 1 << HAD_MIN_THREAD_BITS, [(full, full)]
    top = b - v
    m0 = ((1 << v) - 1) | (((1 << top) - 1) << (logn - top))
    stages = [(m0, m0)]
    lo, hi = v, logn - top
    while lo < hi:
        act = ((1 << min(b, hi - lo)) - 1) << lo
        stages.append((act, act))
        lo += min(b, hi - lo)
    loc, act = stages[-1]
    for k in list(range(v)) + list(range(logn - 1, -1, -1)):  # fill the last stage's registers
        if bin(loc).count("1") < b:
            loc |= 1 << k
    stages[-1] = (loc, act)
    r = _low_run(loc)
    if (loc >> r) & 31:  # lanes would not cover consecutive vectors: a store-only stage
        stages.append((m0, 0))
    row_bits = max(0, HAD_MIN_THREAD_BITS - (logn - b))
    return row_bits, 1 << (logn + row_bits - b), stages


def _had_plan_from_library(lib, logn: int):
    import ctypes

    out = (ctypes.c_int64 * 16)()
    count = lib.JaxquantHadamardPlan(ctypes.c_int(logn), out, ctypes.c_int(16))
    assert count > 0
    return int(out[0]), int(out[1]), [(int(out[2 + 2 * s]), int(out[3 + 2 * s])) for s in range(count)]


def _bits(mask: int) -> list[int]:
    return [p for p in range(32) if (mask >> p) & 1]


def _deposit(t: np.ndarray, positions: list[int]) -> np.ndarray:
    out = np.zeros_like(t)
    for k, p in enumerate(positions):
        out |= ((t >> k) & 1) << p
    return out


def _low_run(mask: int) -> int:
    r = 0
    while (mask >> r) & 1:
        r += 1
    return r


def _had_emulate(logn: int, elem_bytes: int, plan):
    """Run the kernel's exact index mapping on one block in NumPy: thread t (threadIdx.x), register
    j of stage s holds block-space element deposit(t, ~local) | deposit(j, local) (row = the bits
    above logn); stage 0 loads global memory, the others read shared memory at pad32(index); each
    stage applies the butterflies of its active bits to registers j, j ^ 2^k; the last stage stores.
    Returns (block output, block input, worst shared-memory bank conflict, global vector bytes)."""
    row_bits, threads, stages = plan
    nloc = min(logn, HAD_LOCAL_BITS)
    block_bits = logn + row_bits
    assert threads == 1 << (block_bits - nloc)
    E = 1 << nloc
    t = np.arange(threads)[:, None]
    j = np.arange(E)[None, :]
    rng = np.random.default_rng(logn)
    x = rng.standard_normal(1 << block_bits)
    smem = np.full((1 << block_bits) + (1 << block_bits) // 32, np.nan)
    y = np.full(1 << block_bits, np.nan)
    worst, widths = 1, []
    for s, (local, active) in enumerate(stages):
        assert active & ~local == 0 and bin(local).count("1") == nloc
        lp = _bits(local)
        tp = [p for p in range(block_bits) if p not in lp]
        tpart, jpart = _deposit(t, tp), _deposit(j, lp)
        idx = tpart | jpart
        assert np.array_equal(np.sort(idx.ravel()), np.arange(1 << block_bits))  # a permutation
        addr = idx + (idx >> 5)  # pad32
        assert np.array_equal(addr, (tpart + (tpart >> 5)) + (jpart + (jpart >> 5)))  # the kernel's split
        if s == 0 or s == len(stages) - 1:  # global access: each lane a run of R, vectors of W
            R = 1 << _low_run(local)
            W = R
            while W * elem_bytes > 16:
                W >>= 1
            widths.append(W * elem_bytes)
            runs = idx[:, ::R]
            assert np.all(runs % R == 0)  # aligned
            assert np.array_equal(idx.reshape(threads, E // R, R) - runs[:, :, None],
                                  np.broadcast_to(np.arange(R), (threads, E // R, R)))
            if logn >= 10:  # a warp within one row: its lanes cover 32 consecutive runs
                w = runs.reshape(threads // 32, 32, E // R)
                assert np.all(np.sort(w, axis=1) - w.min(axis=1, keepdims=True) == (R * np.arange(32))[None, :, None])
        if s > 0 or s < len(stages) - 1:
            w = (addr % 32).reshape(-1, min(32, threads), E)
            for e in range(E):
                counts = np.apply_along_axis(np.bincount, 1, w[:, :, e], minlength=32)
                worst = max(worst, int(counts.max()))
        v = x[idx] if s == 0 else smem[addr]
        for k, p in enumerate(lp):
            if (active >> p) & 1:
                lo = np.arange(E)[(np.arange(E) >> k) & 1 == 0]
                a, b = v[:, lo].copy(), v[:, lo + (1 << k)].copy()
                v[:, lo], v[:, lo + (1 << k)] = a + b, a - b
        if s == len(stages) - 1:
            y[idx] = v
        else:
            smem[addr] = v
    return y.reshape(-1, 1 << logn), x.reshape(-1, 1 << logn), worst, widths


@pytest.mark.parametrize("elem_bytes", [4, 2])
def test_hadamard_plan_emulated(elem_bytes):
    """The CUDA Hadamard kernel's index mapping, emulated per stage, equals the Sylvester Walsh-
    Hadamard transform for every n = 2 .. 32768 and matches the plan compiled into the library;
    global loads are 16-byte vectors; from n = 1024 on a warp's loads and stores cover 32
    consecutive runs (below that a warp spans several rows); shared memory is free of bank
    conflicts from n = 1024 on, at most 4-way for n = 64 .. 512."""
    lib = None
    if cuda_build.nvcc_path() is not None:
        import ctypes

        lib = ctypes.CDLL(str(cuda_build.compile_library()))
    for logn in range(1, 16):
        plan = _had_plan(logn)
        if lib is not None:
            assert _had_plan_from_library(lib, logn) == plan, logn
        y, x, worst, widths = _had_emulate(logn, elem_bytes, plan)
        np.testing.assert_allclose(y, _fwht_np(x), rtol=0, atol=1e-9 * 2**logn, err_msg=str(logn))
        assert widths[0] == min(2**logn * elem_bytes, 16), (logn, widths)  # loads: 16-byte vectors
        if logn >= 10 or logn <= HAD_LOCAL_BITS:
            assert worst == 1, (logn, worst)  # no shared-memory bank conflicts
        else:
            assert worst <= 4, (logn, worst)


# ------------------------------------------------------------------ Hadamard kernel: the CUDA source run on the CPU

_HAD_HOST_PRELUDE = r"""
// Runs a Hadamard kernel (the CUDA source, cut from jaxquant_kernels.cu unchanged) on the CPU: one
// std::thread per CUDA thread, __syncthreads as a barrier, shared memory NaN-filled per block.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

static thread_local uint3 h_threadIdx, h_blockIdx;
static uint3 h_gridDim;
static std::barrier<>* h_bar = nullptr;
alignas(16) static float smem_storage[1 << 16];
#undef __global__
#define __global__
#undef __shared__
#define __shared__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx h_threadIdx
#define blockIdx h_blockIdx
#define gridDim h_gridDim
#define hbuf smem_storage
#define hkbuf smem_storage
static void __syncthreads() { h_bar->arrive_and_wait(); }

#include "kernel_part.inc"

// kernel() for every thread of `blocks` blocks of `threads`, a block at a time.
void run_blocks(int64_t blocks, int threads, const std::function<void()>& kernel) {
  h_gridDim = uint3{static_cast<unsigned>(blocks), 1, 1};
  for (int64_t b = 0; b < blocks; ++b) {
    for (auto& f : smem_storage) f = NAN;
    std::barrier<> bar(threads);
    h_bar = &bar;
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&kernel, t, b] {
        h_threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
        h_blockIdx = uint3{static_cast<unsigned>(b), 0, 0};
        kernel();
      });
    for (auto& th : ts) th.join();
  }
}

// in: x f32 [parts, rows, n], signs f32 [n]; returns HadamardArgs over T copies (y NaN-filled).
template <class T>
struct HostRows {
  std::vector<T> x, y;
  std::vector<float> sg;
  bool read(FILE* in, int parts, int64_t rows, int64_t n) {
    std::vector<float> xf(parts * rows * n);
    sg.resize(n);
    if (fread(xf.data(), 4, xf.size(), in) != xf.size() || fread(sg.data(), 4, n, in) != size_t(n)) return false;
    x.resize(xf.size());
    for (size_t i = 0; i < xf.size(); ++i) x[i] = from_float<T>(xf[i]);
    y.assign(rows * n, from_float<T>(NAN));
    return true;
  }
  bool write(FILE* out) const {
    std::vector<float> yf(y.size());
    for (size_t i = 0; i < y.size(); ++i) yf[i] = to_float(y[i]);
    return fwrite(yf.data(), 4, yf.size(), out) == yf.size();
  }
};

// argv[1] is the dtype (0 fp32, 1 fp16, 2 bf16); go<T>(argv, in, out) does the rest.
#define HOST_MAIN(NARGS)                                                        \
  int main(int argc, char** argv) {                                             \
    if (argc != NARGS) return 1;                                                \
    FILE* in = fopen(argv[NARGS - 2], "rb");                                    \
    FILE* out = fopen(argv[NARGS - 1], "wb");                                   \
    if (!in || !out) return 3;                                                  \
    const int dt = atoi(argv[1]);                                               \
    const int rc = dt == 0 ? go<float>(argv, in, out)                           \
                 : dt == 1 ? go<__half>(argv, in, out) : go<__nv_bfloat16>(argv, in, out); \
    fclose(in);                                                                 \
    fclose(out);                                                                \
    return rc;                                                                  \
  }
"""

_HAD_HOST_HARNESS = _HAD_HOST_PRELUDE + r"""
template <class T, int LOGN>
void run(const HadamardArgs<T>& a) {
  using C = HadCfg<T, LOGN>;
  run_blocks((a.rows + (int64_t{1} << C::kRowBits) - 1) >> C::kRowBits, C::kThreads,
             [&a] { hadamard_kernel<T, LOGN>(a); });
}

template <class T, int... Ls>
void dispatch(const HadamardArgs<T>& a, std::integer_sequence<int, Ls...>) {
  ((a.logn == Ls + 1 ? (run<T, Ls + 1>(a), 0) : 0), ...);
}

// argv: dtype logn rows has_signs signs_after normalize parts in out
template <class T>
int go(char** argv, FILE* in, FILE* out) {
  const int logn = atoi(argv[2]), hs = atoi(argv[4]), sa = atoi(argv[5]), nm = atoi(argv[6]), parts = atoi(argv[7]);
  const int64_t rows = atoll(argv[3]), n = int64_t{1} << logn;
  HostRows<T> h;
  if (!h.read(in, parts, rows, n)) return 2;
  HadamardArgs<T> a{h.x.data(), hs ? h.sg.data() : nullptr, h.y.data(), rows, logn, 1, sa,
                    nm ? 1.0f / std::sqrt(static_cast<float>(n)) : 1.0f, parts};
  dispatch(a, std::make_integer_sequence<int, 15>{});
  return h.write(out) ? 0 : 4;
}

HOST_MAIN(10)
"""

# The pieces of jaxquant_kernels.cu the harness needs: (first line, the line after the piece).
_HAD_HOST_CUTS = [
    ("template <int I>\nstruct Idx", "enum DType"),
    ("__host__ __device__ __forceinline__ int pad32", "template <int NBITS>"),
    ("template <class T>\nstruct HadamardArgs {",
     "template <class T, int NBITS>\n__device__ __forceinline__ void hadamard_pass"),
    ("constexpr int kHadLocalBits", "template <class T, int LOGN>\ncudaError_t launch_hadamard_v2"),
]


def _cuda_include_dir():
    """The CUDA include directory (next to nvcc), or None."""
    import pathlib

    nvcc = cuda_build.nvcc_path()
    candidates = [pathlib.Path("/usr/local/cuda/include")]
    if nvcc:
        candidates.insert(0, pathlib.Path(nvcc).resolve().parent.parent / "include")
    for c in candidates:
        if (c / "cuda_bf16.h").exists():
            return c
    return None


def _host_harness(tmp_path, cuts, harness: str, source: str = "jaxquant_kernels.cu", defines: tuple = ()):
    """Compile ``harness`` (C++ that includes "kernel_part.inc") with g++ against the pieces of
    ``source`` that ``cuts`` names ((first line, the line after) pairs, cut unchanged; None: all of
    it, compiled with JAXQUANT_HOST_HARNESS and ``defines`` ("NAME=VALUE") defined); the executable's
    path. Skips the test without g++ or the CUDA headers."""
    import shutil
    import subprocess

    gxx = shutil.which("g++")
    include = _cuda_include_dir()
    if gxx is None or include is None:
        pytest.skip("g++ or the CUDA headers (cuda_bf16.h) not found")
    src = (cuda_build.SOURCE_DIR / source).read_text()
    part = src if cuts is None else "\n".join(src[src.index(a):src.index(b, src.index(a))] for a, b in cuts)
    (tmp_path / "kernel_part.inc").write_text(part)
    (tmp_path / "harness.cpp").write_text(harness)
    exe = tmp_path / "harness"
    proc = subprocess.run([gxx, "-std=c++20", "-O1", "-pthread", "-DJAXQUANT_HOST_HARNESS", *(f"-D{d}" for d in defines),
                           f"-I{include}",
                           f"-I{cuda_build.SOURCE_DIR}",
                           str(tmp_path / "harness.cpp"),
                           "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


def _run_hadamard_harness(exe, tmp_path, rng, args, parts: int, rows: int, n: int):
    """Run a Hadamard host harness on fresh x [parts, rows, n] and ±1 signs [n]: (x, signs, y)."""
    import subprocess

    x = rng.standard_normal((parts, rows, n)).astype(np.float32)
    s = rng.choice(np.array([-1.0, 1.0], np.float32), n)
    (tmp_path / "in.bin").write_bytes(x.tobytes() + s.tobytes())
    proc = subprocess.run([str(exe), *map(str, args), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")])
    assert proc.returncode == 0, args
    return x, s, np.fromfile(tmp_path / "out.bin", np.float32).reshape(rows, n)


def _host_dtypes():
    """Harness dtype codes -> (numpy dtype, tolerance)."""
    import ml_dtypes

    return {0: (np.float32, 1e-6), 1: (np.float16, 2e-3), 2: (ml_dtypes.bfloat16, 1e-2)}


def test_hadamard_kernel_source_on_cpu(tmp_path):
    """hadamard_kernel's own source, compiled for the host (g++, one thread per CUDA thread and a
    barrier for __syncthreads, NaN-filled shared memory) against the float64 transform: every n =
    2 .. 32768, fp32/fp16/bf16, signs before / after / none, unnormalized, partial blocks, and the
    sum of several parts (a matvec's partials)."""
    exe = _host_harness(tmp_path, _HAD_HOST_CUTS, _HAD_HOST_HARNESS)
    dtypes = _host_dtypes()
    cases = []  # (dtype, logn, rows, has_signs, signs_after, normalize, parts)
    for logn in range(1, 16):
        cases += [(0, logn, 3, 1, 0, 1, 1), (1, logn, 3, 1, 1, 1, 1), (2, logn, 1, 0, 0, 0, 1), (2, logn, 3, 1, 0, 1, 1)]
        if logn <= 9:
            cases.append((0, logn, 300, 1, 1, 1, 1))  # several rows per block, the last block partial
    cases += [(0, 12, 1, 1, 1, 1, 3), (0, 8, 300, 1, 1, 1, 2), (2, 13, 2, 1, 1, 1, 4)]
    rng = np.random.default_rng(0)
    for dt, logn, rows, hs, sa, norm, parts in cases:
        n = 2**logn
        case = (dt, logn, rows, hs, sa, norm, parts)
        x, s, y = _run_hadamard_harness(exe, tmp_path, rng, case, parts, rows, n)
        xq = x.astype(dtypes[dt][0]).astype(np.float64).sum(0)
        ref = _fwht_np(xq * s if hs and not sa else xq) / (np.sqrt(n) if norm else 1.0)
        if hs and sa:
            ref = ref * s
        assert rel_err(y, ref) < dtypes[dt][1], case


# (dtype 0 fp32 / 1 fp16 / 2 bf16, K, log2 M, rows, has_signs, inverse, parts); the harness compiles
# only these kernels (all 90 instantiations took g++ a minute)
_HADK_HOST_CASES = [
    (0, 28, 10, 2, 1, 0, 1), (0, 28, 10, 1, 1, 1, 1), (2, 28, 9, 2, 1, 0, 1), (1, 28, 9, 1, 1, 1, 1),
    (0, 20, 8, 3, 1, 1, 1), (2, 20, 8, 2, 0, 0, 1), (0, 12, 6, 3, 1, 0, 1), (1, 12, 7, 2, 1, 1, 1),
    (0, 12, 10, 1, 1, 1, 3), (0, 28, 8, 2, 1, 1, 2), (2, 12, 7, 3, 1, 1, 2), (1, 20, 6, 3, 1, 0, 1),
    (2, 28, 10, 3, 1, 0, 1), (1, 28, 10, 2, 1, 1, 1), (2, 20, 10, 1, 1, 1, 1), (1, 12, 8, 2, 1, 0, 1)]


def _hadk_host_harness(cases) -> str:
    """The harness for hadamard_k_kernel, its dispatch limited to the (dtype, K, M) of ``cases``."""
    types = ("float", "__half", "__nv_bfloat16")
    dispatch = "".join(f"  if constexpr (std::is_same_v<T, {types[dt]}>) if (k == {k} && logm == {m}) run<T, {k}, {m}>(a);\n"
                       for dt, k, m in sorted({c[:3] for c in cases}))
    return _HAD_HOST_PRELUDE + r"""
template <class T, int K, int LOGM>
void run(const HadamardArgs<T>& a) {
  // two blocks at most, so that a block walks several rows as on a GPU with few SMs
  run_blocks(a.rows < 2 ? a.rows : 2, HadKCfg<T, K, LOGM>::kThreads, [&a] {
    if (a.signs_after) hadamard_k_kernel<T, K, LOGM, true>(a);
    else hadamard_k_kernel<T, K, LOGM, false>(a);
  });
}

// argv: dtype k logm rows has_signs inverse parts in out
template <class T>
int go(char** argv, FILE* in, FILE* out) {
  const int k = atoi(argv[2]), logm = atoi(argv[3]), hs = atoi(argv[5]), inv = atoi(argv[6]), parts = atoi(argv[7]);
  const int64_t rows = atoll(argv[4]), n = int64_t{k} << logm;
  HostRows<T> h;
  if (!h.read(in, parts, rows, n)) return 2;
  HadamardArgs<T> a{h.x.data(), hs ? h.sg.data() : nullptr, h.y.data(), rows, logm, 1, inv,
                    1.0f / std::sqrt(static_cast<float>(n)), parts};
""" + dispatch + r"""  return h.write(out) ? 0 : 4;
}

HOST_MAIN(10)
"""


_HADK_HOST_CUTS = [
    ("template <int I>\nstruct Idx", "enum DType"),
    ("template <int NBITS>\n__device__ __forceinline__ void butterflies", "\n// Four consecutive x values"),
    ("template <class T>\nstruct HadamardArgs {",
     "template <class T, int NBITS>\n__device__ __forceinline__ void hadamard_pass"),
    ("template <class T, int W>\nstruct alignas", "template <class T, int LOGN>\nstruct HadCfg"),
    ("template <int K>\nstruct HadK;", "template <class T, int K, int LOGM>\ncudaError_t launch_hadamard_k"),
]


def _rht_k_np(x, signs, k, inverse):
    """float64 (H_K ⊗ H_M)(x * s) / sqrt(n), or its transpose with the signs after."""
    rows, n = x.shape
    h = jq_hadamard.hadamard_factor(k)
    z = _fwht_np((x if inverse else x * signs).reshape(rows, k, n // k))
    y = np.einsum("ka,raj->rkj" if inverse else "ak,raj->rkj", h, z).reshape(rows, n) / np.sqrt(n)
    return y * signs if inverse else y


def test_hadamard_k_signs_match_python():
    """The K-point factors compiled into the kernel are jaxquant.hadamard.hadamard_factor(K)."""
    import re

    src = (cuda_build.SOURCE_DIR / "jaxquant_kernels.cu").read_text()
    for k in cuda_ops.HADAMARD_K:
        body = re.search(rf"struct HadK<{k}> \{{[^{{]*\{{([^}}]*)\}}", src).group(1)
        masks = [int(v, 16) for v in re.findall(r"0x[0-9a-f]+", body)]
        signs = np.array([[-1.0 if (m >> c) & 1 else 1.0 for c in range(k)] for m in masks])
        np.testing.assert_array_equal(signs, jq_hadamard.hadamard_factor(k))


def test_hadamard_k_kernel_source_on_cpu(tmp_path):
    """hadamard_k_kernel's own source on the host (one thread per CUDA thread, NaN-filled shared
    memory) against float64 (H_K ⊗ H_M)(x * s) / sqrt(n) and its inverse: K = 12, 20, 28, 2^p =
    64 .. 1024 (n = 28672 and 14336 included), fp32/fp16/bf16, signs or none, several rows, the sum
    of several parts."""
    exe = _host_harness(tmp_path, _HADK_HOST_CUTS, _hadk_host_harness(_HADK_HOST_CASES))
    dtypes = _host_dtypes()
    rng = np.random.default_rng()
    for case in _HADK_HOST_CASES:
        dt, k, logm, rows, hs, inv, parts = case
        n = k << logm
        x, s, y = _run_hadamard_harness(exe, tmp_path, rng, case, parts, rows, n)
        ref = _rht_k_np(x.astype(dtypes[dt][0]).astype(np.float64).sum(0), s if hs else np.ones(n), k, inv)
        assert np.isfinite(y).all(), case
        assert rel_err(y, ref) < dtypes[dt][1], case
    # the float64 reference is jaxquant.hadamard.rht's transform (and rht_inverse's)
    x = rng.standard_normal((2, 28 * 64)).astype(np.float32)
    s = rng.choice(np.array([-1.0, 1.0], np.float32), 28 * 64)
    assert rel_err(np.asarray(jq_hadamard.rht(jnp.asarray(x), jnp.asarray(s))), _rht_k_np(x, s, 28, False)) < 1e-5
    assert rel_err(np.asarray(jq_hadamard.rht_inverse(jnp.asarray(x), jnp.asarray(s))), _rht_k_np(x, s, 28, True)) < 1e-5


# ------------------------------------------------------------------ E8P / QTIP kernels

from jaxquant.codebooks import e8p as jq_e8p  # noqa: E402
from jaxquant.codebooks import trellis as jq_trellis  # noqa: E402
from jaxquant.formats import qtip as jq_qtip  # noqa: E402
from jaxquant.formats.qtip import QTIPQuantized  # noqa: E402
from jaxquant.formats.quip_sharp import QuIPSharpQuantized  # noqa: E402


def _byte_perm(x, y, sel):
    """CUDA __byte_perm on uint32 numpy arrays (selector nibbles 0-7, no sign mode)."""
    src = np.stack([(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)])
    out = np.zeros_like(x)
    for k in range(4):
        out |= src[(sel >> (4 * k)) & 7] << (8 * k)
    return out


def test_e8p_kernel_decode_emulated():
    """The kernel's decode (abs table XOR sign masks, byte permutes to fp16 pairs, shift) on all
    2^16 codes, emulated with integer numpy, equals the codebook."""
    c = np.arange(1 << 16, dtype=np.uint32)
    tab = cuda_ffi.e8p_abs_table(jq_e8p.e8p_source_set())
    s = (c >> 8) & 0x7F
    lo = np.zeros_like(c)
    hi = np.zeros_like(c)
    for i in range(4):
        lo |= ((s >> i) & 1) << (8 * i + 7)
    for i in range(3):
        hi |= ((s >> (4 + i)) & 1) << (8 * i + 7)
    hi |= (np.array([bin(v).count("1") for v in range(128)], np.uint32)[s] & 1) << 31
    lo ^= tab[c & 0xFF, 0]
    hi ^= tab[c & 0xFF, 1]
    pairs = [_byte_perm(w, np.zeros_like(w), sel) for w in (lo, hi) for sel in (0x1404, 0x3424)]
    vals = np.stack(pairs, -1).view(np.float16).astype(np.float32)  # [65536, 8] (little-endian halves)
    vals += np.where(c >> 15, 0.25, -0.25)[:, None]
    np.testing.assert_array_equal(vals, jq_e8p.e8p_codewords())


# A warp shuffle for the host harnesses (h_shfl and the per-warp barriers h_warp_bar come with them).
_HOST_SHUFFLE = r"""
static float __shfl_xor_sync(unsigned, float v, int m) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  h_shfl[w][l] = v;
  h_warp_bar[w]->arrive_and_wait();
  const float r = h_shfl[w][l ^ m];
  h_warp_bar[w]->arrive_and_wait();
  return r;
}
"""

_HOST_PRELUDE = r"""
// Runs decode-matvec kernels (the CUDA source, cut from jaxquant_kernels.cu unchanged) on the CPU:
// blocks one after another, one std::thread per CUDA thread, a barrier for __syncthreads, warp
// shuffles and __syncwarp through a per-warp barrier, the HFMA2 rounded to fp16 per lane.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

static thread_local uint3 h_threadIdx, h_blockIdx;
static dim3 h_blockDim, h_gridDim;
static std::barrier<>* h_bar = nullptr;
static std::vector<std::unique_ptr<std::barrier<>>> h_warp_bar;
static float h_shfl[32][32];
uint2 e8tab[(256 * 2 * 16 * 8 + 8 * 32 * 20 + 2144 * 4) / 8];  // kE8XsSmemBytes + kE8XsRhtSmemBytes
uint32_t vqcb[1 << 17];
uint32_t qsm[2 * 512 * 16 + 8 * 8 * 16];  // the QTIP HYB table and the slices' partial sums
#undef __global__
#define __global__
#undef __shared__
#define __shared__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx h_threadIdx
#define blockIdx h_blockIdx
#define gridDim h_gridDim
#define blockDim h_blockDim
#define gridDim h_gridDim
static void __syncthreads() { h_bar->arrive_and_wait(); }
template <class T> static T __ldg(const T* p) { return *p; }
template <class T> static T __ldcs(const T* p) { return *p; }
static int min(int a, int b) { return a < b ? a : b; }
static int max(int a, int b) { return a > b ? a : b; }
static unsigned __popc(unsigned v) { return __builtin_popcount(v); }
static float rsqrtf(float v) { return static_cast<float>(1.0 / std::sqrt(double(v))); }
static unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t pool = (uint64_t{y} << 32) | x;
  unsigned r = 0;
  for (int k = 0; k < 4; ++k) r |= static_cast<unsigned>((pool >> (8 * ((s >> (4 * k)) & 7))) & 0xFF) << (8 * k);
  return r;
}
static __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  const float2 fa = __half22float2(a), fb = __half22float2(b), fc = __half22float2(c);
  return __floats2half2_rn(static_cast<float>(double(fa.x) * fb.x + fc.x),
                           static_cast<float>(double(fa.y) * fb.y + fc.y));
}
static unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned sh) {
  return static_cast<unsigned>(((uint64_t{hi} << 32) | lo) >> (sh & 31));
}
static unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned sh) {
  return static_cast<unsigned>((((uint64_t{hi} << 32) | lo) << (sh & 31)) >> 32);
}
static unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  for (int k = 0; k < 4; ++k) c += ((a >> (8 * k)) & 0xFF) * ((b >> (8 * k)) & 0xFF);
  return c;
}
static void __syncwarp() { h_warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
static void pdl_wait() {}  // pdl.h's, outside the cut pieces: one block at a time has nothing to wait on
static void pdl_launch_dependents() {}
""" + _HOST_SHUFFLE + r"""
#include "kernel_part.inc"

template <class K>
void run(K kernel, int blocks, int warps, int blocks_y = 1) {  // blocks_y: a grid's second axis
  h_gridDim = dim3(blocks, blocks_y, 1);
  h_blockDim = dim3(warps * 32, 1, 1);
  for (int y = 0; y < blocks_y; ++y)
    for (int b = 0; b < blocks; ++b) {
      memset(e8tab, 0xFF, sizeof(e8tab));
      memset(vqcb, 0xFF, sizeof(vqcb));
      memset(qsm, 0xFF, sizeof(qsm));
      std::barrier<> bar(warps * 32);
      h_bar = &bar;
      h_warp_bar.clear();
      for (int w = 0; w < warps; ++w) h_warp_bar.emplace_back(new std::barrier<>(32));
      std::vector<std::thread> ts;
      for (int t = 0; t < warps * 32; ++t)
        ts.emplace_back([&kernel, t, b, y] {
          h_threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
          h_blockIdx = uint3{static_cast<unsigned>(b), static_cast<unsigned>(y), 0};
          kernel();
        });
      for (auto& th : ts) th.join();
    }
}

template <class T>
bool read(FILE* f, std::vector<T>& v, size_t n) { v.resize(n); return fread(v.data(), sizeof(T), n, f) == n; }

"""

_E8P_HOST_MAIN = r"""
// argv: kernel (0 default, 1 x-stationary, 2 its tensor-core form: rows = 16-row tiles) bits out k rows units
// blocks warps rht in out
// (units: code units per step of the default kernel; row groups in flight of the x-stationary one;
// rht: the x-stationary kernel makes x's RHT with su; 2, 3: of the RMSNorm (float32) of x in fp16,
// bf16 (the norm weight, f32, and x in that dtype after su in `in`; eps 1e-5))
// in: x f32 [k], xh f16 [k] and xq f32 [k/8] in the default kernel's layout, codes u8 [out, k/8, bits],
// abs u32 [512], su f32 [k]; out: y f32 [out] (default) or the partials f32 [chunks, out] (x-stationary).
int main(int argc, char** argv) {
  if (argc != 12) return 1;
  const int xs = atoi(argv[1]), bits = atoi(argv[2]), out = atoi(argv[3]), k = atoi(argv[4]);
  const int rows = atoi(argv[5]), units_per_step = atoi(argv[6]), blocks = atoi(argv[7]), warps = atoi(argv[8]);
  const int rht = atoi(argv[9]);
  FILE* in = fopen(argv[10], "rb");
  FILE* fo = fopen(argv[11], "wb");
  if (!in || !fo) return 3;
  std::vector<float> x, xq, su;
  std::vector<__half> xh;
  std::vector<uint8_t> codes;
  std::vector<uint32_t> abs;
  std::vector<float> norm_w;
  std::vector<uint16_t> x16;  // rht >= 2: x in fp16 / bf16, natural order
  if (!read(in, x, k) || !read(in, xh, k) || !read(in, xq, k / 8) || !read(in, codes, size_t(out) * k / 8 * bits) ||
      !read(in, abs, 512) || !read(in, su, k) || (rht >= 2 && (!read(in, norm_w, k) || !read(in, x16, k)))) return 2;
  const int st = bits / 2, units = k * st / 64, chunks = (units + (xs == 2 ? kE8TcUnits : 32) - 1) / (xs == 2 ? kE8TcUnits : 32);
  std::vector<float> y(size_t(xs ? chunks : 1) * out, NAN);
  E8pArgs a{};
  a.n = 1; a.k = k; a.out = out; a.units = units;
  a.x = reinterpret_cast<const uint4*>(xh.data());
  a.xq = xq.data();
  a.xf = x.data();
  a.codes = reinterpret_cast<const uint4*>(codes.data());
  a.abs = reinterpret_cast<const uint2*>(abs.data());
  a.y = y.data();
  a.resid = bits == 4 ? 1.0f / 3.45f : 1.0f;
  if (rht) {
    a.su = su.data();
    a.rht_scale = 1.0f / std::sqrt(static_cast<float>(k));
    a.x_rht = x.data();
  }
  if (rht >= 2) {  // x in fp16 (2) or bf16 (3), RMS-normalized first
    a.x_rht = x16.data();
    a.x_dtype = rht - 1;
    a.norm_w = norm_w.data();
    a.norm_eps = 1e-5f;
  }
  auto go = [&](auto kernel) { run(kernel, blocks, warps); };
#define XS(R, ST) (units_per_step == 2 ? go([&] { e8p_matvec_xs_kernel<R, ST, 2>(a, chunks, a.y); }) \
                                       : go([&] { e8p_matvec_xs_kernel<R, ST, 1>(a, chunks, a.y); }))
#define DEF(R, ST, U) go([&] { e8p_matvec_kernel<1, R, ST, U>(a); })
#define TC(R, ST) go([&] { e8p_matvec_tc_kernel<R, ST>(a, chunks, a.y); })
  auto launch = [&] {
    if (xs == 2) {
      if (rows >= 2) { if (st == 1) TC(2, 1); else TC(2, 2); }
      else { if (st == 1) TC(1, 1); else TC(1, 2); }
    } else if (xs) {
      if (rows >= 4) { if (st == 1) XS(4, 1); else XS(4, 2); }
      else { if (st == 1) XS(2, 1); else XS(2, 2); }
    } else if (units_per_step == 1) {
      if (rows >= 4) { if (st == 1) DEF(4, 1, 1); else DEF(4, 2, 1); }
      else if (rows == 2) { if (st == 1) DEF(2, 1, 1); else DEF(2, 2, 1); }
      else { if (st == 1) DEF(1, 1, 1); else DEF(1, 2, 1); }
    } else {
      if (rows >= 4) { if (st == 1) DEF(4, 1, 2); else DEF(4, 2, 2); }
      else if (rows == 2) { if (st == 1) DEF(2, 1, 2); else DEF(2, 2, 2); }
      else { if (st == 1) DEF(1, 1, 2); else DEF(1, 2, 2); }
    }
  };
  launch();
#ifdef JAXQUANT_E8P_POOL  // the pool build: counters back at zero, and a second launch claims the whole pool again
  auto counters_zero = [] { return std::all_of(e8_pool_next, e8_pool_next + kE8PoolChunks, [](int c) { return c == 0; }); };
  if (!counters_zero()) return 5;
  std::fill(y.begin(), y.end(), NAN);
  launch();
  if (!counters_zero()) return 5;
#endif
  const bool ok = fwrite(y.data(), 4, y.size(), fo) == y.size();
  fclose(in);
  fclose(fo);
  return ok ? 0 : 4;
}
"""

def _rms_norm(x, weight, eps: float) -> np.ndarray:
    """The model's RMSNorm of x in float32."""
    from jaxquant.model.llama import rms_norm

    return np.asarray(rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(weight), eps))


_E8P_HOST_CUTS = [
    ("template <int I>\nstruct Idx", "enum DType"),
    ("__device__ __forceinline__ __half2 u2h2", "__device__ __forceinline__ float load_elem"),
    ("__device__ __forceinline__ float warp_sum", "// Four consecutive x values"),
    ("__device__ __forceinline__ uint32_t uint4_at", "__device__ __forceinline__ uint32_t word_at(const uint4&"),
    ("constexpr int kE8Rep = 16;", "// A batch-1 kernel (x-stationary or tensor-core) as one persistent wave"),
]


def test_e8p_kernels_source_on_cpu(tmp_path):
    """Both batch-1 E8P kernels' own source, compiled for the host (blocks in turn, a thread per
    CUDA thread, shared tables 0xFF-filled per block), against float64 x @ Q.T: 2 and 4 bits, rows
    per warp 1/2/4, 1/2 units per step (default) or 1/2 row groups in flight (x-stationary), a grid
    with idle warps, fewer blocks than chunks and blocks shared unevenly among chunks, the last chunk
    partly past the row, a row count that is not a multiple of R, and the x-stationary kernel making
    x's RHT itself (real-valued signs; 1 to 4 chunks' worth of x summed per chunk); the same cases for
    its tensor-core form (mma.sync emulated by the PTX fragment layout), 16-row tiles past the rows."""
    prelude = _HOST_PRELUDE.replace('#include "kernel_part.inc"', _MMA_HOST_EMULATION + '#include "kernel_part.inc"')
    exe = _host_harness(tmp_path, _E8P_HOST_CUTS, "#include <type_traits>\n" + prelude + _E8P_HOST_MAIN)
    table = cuda_ffi.e8p_abs_table(jq_e8p.e8p_source_set())
    cases = [  # (x-stationary, bits, out, k, rows per warp, units per step, blocks, warps, RHT in the kernel)
        (0, 2, 37, 512, 1, 2, 2, 3, 0), (0, 2, 37, 512, 2, 1, 1, 4, 0), (0, 4, 37, 1024, 4, 2, 2, 2, 0),
        (1, 2, 37, 6144, 2, 0, 2, 4, 0), (1, 2, 37, 6144, 4, 0, 1, 8, 0), (1, 4, 37, 3072, 2, 0, 2, 4, 0),
        (1, 2, 37, 512, 2, 0, 1, 2, 0), (1, 4, 21, 1056, 4, 0, 3, 1, 0),
        (1, 2, 37, 6144, 2, 2, 2, 2, 0), (1, 4, 21, 1056, 4, 2, 1, 3, 0), (1, 2, 37, 512, 2, 2, 2, 4, 0),  # 2 in flight
        (1, 2, 37, 6144, 2, 0, 7, 2, 0), (1, 4, 45, 3072, 2, 2, 5, 3, 0),  # blocks share chunks unevenly
        (1, 2, 37, 2048, 2, 0, 3, 8, 1), (1, 2, 37, 8192, 4, 0, 6, 3, 1), (1, 2, 21, 4096, 2, 2, 1, 2, 1),
        (1, 4, 37, 1024, 4, 0, 2, 8, 1), (1, 4, 37, 4096, 2, 0, 5, 4, 1),  # the RHT of x in the kernel
        (1, 2, 37, 4096, 2, 0, 3, 8, 2), (1, 4, 21, 2048, 4, 0, 1, 4, 3),  # ... of x's RMSNorm (fp16, bf16)
        (1, 2, 37, 4096, 2, 0, 2, 12, 2), (1, 4, 45, 3072, 2, 0, 3, 12, 0),  # 12 warps: a block of 384
        # on tensor cores (rows: 16-row tiles): rows past a tile, partial last chunks, fewer blocks than chunks
        (2, 2, 37, 1536, 1, 0, 3, 4, 0), (2, 2, 45, 1600, 2, 0, 2, 3, 0), (2, 4, 37, 800, 1, 0, 3, 2, 0),
        (2, 2, 21, 2048, 1, 0, 2, 2, 0), (2, 4, 53, 512, 2, 0, 5, 2, 0),
        (2, 2, 37, 2048, 2, 0, 5, 4, 1), (2, 4, 21, 1024, 1, 0, 3, 2, 1),  # the RHT of x in the kernel
        (2, 2, 37, 4096, 1, 0, 9, 3, 2), (2, 4, 21, 512, 2, 0, 2, 4, 3)]  # ... of x's RMSNorm
    _run_e8p_host_cases(exe, tmp_path, cases, table)


def _run_e8p_host_cases(exe, tmp_path, cases, table):
    """Run the E8P host harness on each case (see test_e8p_kernels_source_on_cpu) against float64 x @ Q.T."""
    import subprocess

    for i, (xs, bits, out, k, rows, units, blocks, warps, rht) in enumerate(cases):
        assert 1.0 / (jq_e8p.get_codebook(bits).resid_scale or 1.0) == pytest.approx(
            1.0 / 3.45 if bits == 4 else 1.0)  # the harness's resid
        qw = random_quip(jax.random.key(900 + i), out, k, bits)
        x = np.asarray(jax.random.normal(jax.random.key(950 + i), (1, k), jnp.float32))
        su = np.asarray(jax.random.uniform(jax.random.key(970 + i), (k,), jnp.float32, 0.5, 1.5)
                        * jq_hadamard.random_signs(jax.random.key(980 + i), k))  # real-valued, as fine-tuned
        norm_dtype = {2: jnp.float16, 3: jnp.bfloat16}.get(rht)
        if norm_dtype:  # the residual stream, in the activation dtype, its RMS far from 1
            x = np.asarray(jnp.asarray(3 * x, norm_dtype).astype(jnp.float32))
        xh, xq = cuda_ops.e8p_x_layout(jnp.asarray(x), bits)
        norm_w = np.asarray(jax.random.uniform(jax.random.key(990 + i), (k,), jnp.float32, 0.5, 2.0))
        (tmp_path / "in.bin").write_bytes(x.tobytes() + np.asarray(xh).tobytes() + np.asarray(xq).tobytes()
                                          + np.asarray(qw.codes).tobytes() + np.asarray(table).tobytes() + su.tobytes()
                                          + (norm_w.tobytes() + np.asarray(jnp.asarray(x[0], norm_dtype)).tobytes()
                                             if norm_dtype else b""))
        proc = subprocess.run([str(exe), *map(str, (xs, bits, out, k, rows, units, blocks, warps, rht)),
                               str(tmp_path / "in.bin"), str(tmp_path / "out.bin")])
        assert proc.returncode == 0, cases[i]
        y = np.fromfile(tmp_path / "out.bin", np.float32).reshape(-1, out)
        assert y.shape[0] == (-(-(k * bits // 128) // (8 if xs == 2 else 32)) if xs else 1), cases[i]
        assert np.isfinite(y).all(), cases[i]
        if norm_dtype:  # the model's RMSNorm, kept in float32
            x = _rms_norm(x, norm_w, 1e-5)
        xr = np.asarray(jq_hadamard.rht(jnp.asarray(x), jnp.asarray(su)), np.float64) if rht else x.astype(np.float64)
        ref = xr @ np.asarray(qw.rotated(), np.float64).T
        assert rel_err(y.sum(0, keepdims=True), ref) < 1.5e-3, cases[i]  # half2 sums of <= 16 products (fp32 on tensor cores)


# Atomic claims and a lane broadcast for the host harness (the pool build of the x-stationary kernel).
_HOST_CLAIMS = r"""
#include <algorithm>
static int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static int __shfl_sync(unsigned, int v, int src) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  float f, r;
  memcpy(&f, &v, 4);
  h_shfl[w][l] = f;
  h_warp_bar[w]->arrive_and_wait();
  r = h_shfl[w][src];
  h_warp_bar[w]->arrive_and_wait();
  memcpy(&v, &r, 4);
  return v;
}
"""


def test_e8p_claimed_pool_on_cpu(tmp_path):
    """The x-stationary kernel built with -DJAXQUANT_E8P_POOL=5 (an experiment: each chunk's last 5/16
    of row groups claimed by atomicAdd; blocks run in turn here, so the first block on a chunk takes
    the whole pool): every row written once per chunk and right, the counters back at zero after a
    launch and the second launch right too (the harness returns 5 otherwise). Warps with 0, 1, 2 and
    more static groups, chunks shared evenly and unevenly, fewer blocks than chunks, 2 and 4 bits."""
    prelude = _HOST_PRELUDE.replace('#include "kernel_part.inc"',
                                    _HOST_CLAIMS + _MMA_HOST_EMULATION + '#include "kernel_part.inc"')
    exe = _host_harness(tmp_path, _E8P_HOST_CUTS, "#include <type_traits>\n" + prelude + _E8P_HOST_MAIN,
                        defines=("JAXQUANT_E8P_POOL=5",))
    cases = [  # as in test_e8p_kernels_source_on_cpu, x-stationary with one group in flight
        (1, 2, 37, 512, 4, 0, 1, 8, 0), (1, 2, 301, 6144, 2, 0, 7, 2, 0), (1, 4, 301, 3072, 4, 0, 5, 3, 0),
        (1, 2, 203, 6144, 2, 0, 2, 4, 0), (1, 4, 45, 1056, 2, 0, 3, 1, 0), (1, 2, 301, 4096, 2, 0, 3, 4, 1)]
    _run_e8p_host_cases(exe, tmp_path, cases, cuda_ffi.e8p_abs_table(jq_e8p.e8p_source_set()))


_MMA_HOST_EMULATION = r"""
// mma.sync.m16n8k16 (row.col, fp32 accumulators) as a warp collective on the host: every lane posts
// its fragments, then computes its 4 outputs from the whole A (16 x 16) and B (16 x 8) by the PTX
// layout (A: a0 (g, 2q..), a1 (g + 8, 2q..), a2 (g, 2q + 8..), a3 (g + 8, 2q + 8..); B: b0 (2q.., g),
// b1 (2q + 8.., g); D: (g, 2q), (g, 2q + 1), (g + 8, 2q), (g + 8, 2q + 1)), products and sums in double.
static uint32_t h_mma_a[8][32][4], h_mma_b[8][32][2];
template <class T> static double h_half(uint32_t reg, int hi) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * hi));
  if constexpr (std::is_same_v<T, __half>) { __half_raw r; r.x = bits; return double(__half2float(__half(r))); }
  else return double(__uint_as_float(uint32_t{bits} << 16));
}
template <class T>
static void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4, q = l % 4;
  for (int i = 0; i < 4; ++i) h_mma_a[w][l][i] = a[i];
  h_mma_b[w][l][0] = b0;
  h_mma_b[w][l][1] = b1;
  h_warp_bar[w]->arrive_and_wait();
  float r[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * q + (e & 1);
    double s = d[e];
    for (int k = 0; k < 16; ++k) {
      const int al = (row % 8) * 4 + (k % 8) / 2, ar = (row >= 8) + 2 * (k >= 8);
      const int bl = col * 4 + (k % 8) / 2, br = k >= 8;
      s += h_half<T>(h_mma_a[w][al][ar], k % 2) * h_half<T>(h_mma_b[w][bl][br], k % 2);
    }
    r[e] = static_cast<float>(s);
  }
  h_warp_bar[w]->arrive_and_wait();
  for (int e = 0; e < 4; ++e) d[e] = r[e];
}
"""

_MMA_HOST_MAIN = r"""
// argv: kind (0 scalar, 1 E8P/RVQ4) dtype_or_bits out k nt tiles prefetch splits blocks_or_bits group resid in out
// in (scalar): x [8 nt, k] 16-bit, xsum f32 [8 nt, groups], codes i32 [out, k bits / 32], scale, zero f16 [out, groups]
// in (E8P): x f16 [8 nt, k], codes u8 [out, k / 8, bits], abs u32 [512]; out: parts f32 [splits, 8 nt, out]
// parts start as NaN (no memset on the GPU either): the kernels must write every element
int main(int argc, char** argv) {
  if (argc != 14) return 1;
  const int kind = atoi(argv[1]), sub = atoi(argv[2]), out = atoi(argv[3]), k = atoi(argv[4]), nt = atoi(argv[5]);
  const int tiles = atoi(argv[6]), pf = atoi(argv[7]), splits = atoi(argv[8]), blocks = atoi(argv[9]);
  const int group = atoi(argv[10]);
  const double resid_scale = atof(argv[11]);
  FILE* in = fopen(argv[12], "rb");
  FILE* fo = fopen(argv[13], "wb");
  if (!in || !fo) return 3;
  const int rows = 8 * nt;
  std::vector<uint16_t> x;
  std::vector<float> parts(size_t(splits) * rows * out, NAN);
  if (!read(in, x, size_t(rows) * k)) return 2;
  auto by_tiles = [&](auto go) {  // go(NT, TILES) with both as compile-time constants
    using I1 = std::integral_constant<int, 1>; using I2 = std::integral_constant<int, 2>;
    using I4 = std::integral_constant<int, 4>;
    auto with_nt = [&](auto ntc) {
      if (tiles == 4) go(ntc, I4{}); else if (tiles == 2) go(ntc, I2{}); else go(ntc, I1{});
    };
    if (nt == 2) with_nt(I2{}); else with_nt(I1{});
  };
  if (kind == 0) {
    const int bits = blocks, words = k * bits / 32, groups = k / group;
    std::vector<float> xsum;
    std::vector<uint32_t> codes;
    std::vector<__half> scale, zero;
    if (!read(in, xsum, size_t(rows) * groups) || !read(in, codes, size_t(out) * words) ||
        !read(in, scale, size_t(out) * groups) || !read(in, zero, size_t(out) * groups)) return 2;
    MmaArgs a{};
    a.x = reinterpret_cast<const uint4*>(x.data());
    a.xsum = xsum.data(); a.codes = codes.data(); a.scale = scale.data(); a.zero = zero.data();
    a.parts = parts.data();
    a.out = out; a.words = words; a.groups = groups; a.steps = k / 128; a.steps_per_group = group / 128;
    const int ngroups = (a.steps + a.steps_per_group - 1) / a.steps_per_group;
    a.steps_per_split = ((ngroups + splits - 1) / splits) * a.steps_per_group;
    auto go = [&](auto t_tag, auto ntc, auto tc) {
      constexpr int NT = int(decltype(ntc){}), TL = int(decltype(tc){});
      const int bx = (out + 16 * TL * kMmaWarps - 1) / (16 * TL * kMmaWarps);
      if (bits == 2) run([&] { scalar_mma_kernel<decltype(t_tag), NT, TL, true, 2>(a); }, bx, kMmaWarps, splits);
      else if (pf) run([&] { scalar_mma_kernel<decltype(t_tag), NT, TL, true, 4>(a); }, bx, kMmaWarps, splits);
      else run([&] { scalar_mma_kernel<decltype(t_tag), NT, TL, false, 4>(a); }, bx, kMmaWarps, splits);
    };
    if (sub == 0) by_tiles([&](auto ntc, auto tc) { go(__half{}, ntc, tc); });
    else by_tiles([&](auto ntc, auto tc) { go(__nv_bfloat16{}, ntc, tc); });
  } else {
    const int bits = sub;
    std::vector<uint8_t> codes;
    std::vector<uint32_t> abs;
    if (!read(in, codes, size_t(out) * k / 8 * bits) || !read(in, abs, 512)) return 2;
    E8pMmaArgs a{};
    a.x = reinterpret_cast<const uint4*>(x.data());
    a.codes = reinterpret_cast<const uint4*>(codes.data());
    a.abs = reinterpret_cast<const uint2*>(abs.data());
    a.parts = parts.data();
    a.out = out; a.units = k * bits / 128; a.steps = a.units / 4;
    a.steps_per_split = (a.steps + splits - 1) / splits;
    a.resid = static_cast<float>(1.0 / resid_scale);
    auto go = [&](auto ntc, auto tc) {
      if (bits == 2) run([&] { e8p_mma_kernel<1, int(decltype(ntc){}), int(decltype(tc){})>(a); }, blocks, kE8MmaWarps, splits);
      else run([&] { e8p_mma_kernel<2, int(decltype(ntc){}), int(decltype(tc){})>(a); }, blocks, kE8MmaWarps, splits);
    };
    by_tiles(go);
  }
  const bool ok = fwrite(parts.data(), 4, parts.size(), fo) == parts.size();
  fclose(in);
  fclose(fo);
  return ok ? 0 : 4;
}
"""

_MMA_HOST_CUTS = [  # the E8P harness's helpers and tables, the scalar mma kernel without its mma_16816
    *_E8P_HOST_CUTS[:3],
    ("constexpr int kMmaWarps = 4;", "template <class T>\n__device__ __forceinline__ void mma_16816"),
    ("__device__ __forceinline__ uint32_t uint4_at", "ffi::Error ScalarMmaImpl("),
    _E8P_HOST_CUTS[-1],
    ("struct E8pMmaArgs", "// x fp16 [8 NT, in]; codes uint8"),
]


def test_mma_kernels_source_on_cpu(tmp_path):
    """scalar_mma_kernel (4 and 2 bits) and e8p_mma_kernel, their own source compiled for the host with
    mma.sync emulated as a warp collective by the PTX fragment layout, against float64 products: fp16
    and bf16, 8 and 16 rows of x, 1/2/4 tiles per warp, with and without the prefetch, splits (uneven,
    and more than steps), output rows past a tile's end, E8P and RVQ4 with fewer blocks than row chunks."""
    import subprocess

    prelude = _HOST_PRELUDE.replace('#include "kernel_part.inc"', _MMA_HOST_EMULATION + '#include "kernel_part.inc"')
    exe = _host_harness(tmp_path, _MMA_HOST_CUTS, "#include <algorithm>\n#include <type_traits>\n#include <cuda_bf16.h>\n" + prelude
                        + _MMA_HOST_MAIN)
    rng = np.random.default_rng()
    import ml_dtypes

    def run(args, payload, rows, out):
        (tmp_path / "in.bin").write_bytes(payload)
        proc = subprocess.run([str(exe), *map(str, args), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")])
        assert proc.returncode == 0, args
        parts = np.fromfile(tmp_path / "out.bin", np.float32).reshape(-1, rows, out)
        assert np.isfinite(parts).all(), args
        return parts.sum(0)

    # scalar: (bits, dtype, out, k, nt, tiles, prefetch, splits, group)
    for bits, dtype, out, k, nt, tiles, pf, splits, group in [
            (4, "f16", 70, 512, 1, 4, 1, 3, 128), (4, "bf16", 70, 512, 2, 2, 0, 1, 256), (4, "f16", 40, 256, 1, 2, 1, 4, 128),
            (4, "bf16", 33, 1024, 1, 2, 1, 8, 128), (4, "f16", 130, 256, 2, 4, 0, 2, 128),
            (2, "f16", 70, 512, 1, 4, 1, 3, 128), (2, "bf16", 70, 512, 2, 2, 1, 1, 256), (2, "bf16", 33, 1024, 2, 4, 1, 8, 128)]:
        dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bf16" else np.dtype(np.float16)
        rows, groups = 8 * nt, k // group
        q = rng.integers(0, 2**bits, (out, k))
        codes = np.asarray(packing.pack(jnp.asarray(q, jnp.uint32), bits)).view(np.uint32)
        scale = rng.uniform(0.5, 1.5, (out, groups)).astype(np.float16) / 16
        zero = rng.uniform(0, 2**bits - 1, (out, groups)).astype(np.float16)
        x = np.zeros((rows, k), dt)
        n = rows - 3
        x[:n] = rng.standard_normal((n, k)).astype(dt)
        xsum = x.astype(np.float32).reshape(rows, groups, group).sum(-1)
        y = run((0, int(dtype == "bf16"), out, k, nt, tiles, pf, splits, bits, group, 1.0),
                x.tobytes() + xsum.tobytes() + codes.tobytes() + scale.tobytes() + zero.tobytes(), rows, out)
        w = (q - np.repeat(zero.astype(np.float64), group, 1)) * np.repeat(scale.astype(np.float64), group, 1)
        ref = x.astype(np.float64) @ w.T
        # fp32 sums of (OFFSET + q) x minus (z + OFFSET) sum(x): the offset's cancellation costs ~1e-5
        assert rel_err(y[:n], ref[:n]) < 1e-4 and not y[n:].any(), (bits, dtype, out, k, nt, tiles, pf, splits)

    # E8P / RVQ4: (bits, out, k, nt, tiles, splits, blocks)
    table = np.asarray(cuda_ffi.e8p_abs_table(jq_e8p.e8p_source_set()))
    for i, (bits, out, k, nt, tiles, splits, blocks) in enumerate([
            (2, 70, 512, 1, 1, 1, 2), (2, 37, 1024, 2, 2, 3, 1), (4, 70, 256, 1, 4, 5, 1), (4, 40, 512, 2, 1, 2, 1)]):
        resid = jq_e8p.get_codebook(bits).resid_scale or 1.0
        qw = random_quip(jax.random.key(960 + i), out, k, bits)
        rows = 8 * nt
        x = rng.standard_normal((rows, k)).astype(np.float16)
        y = run((1, bits, out, k, nt, tiles, 0, splits, blocks, 0, resid),
                x.tobytes() + np.asarray(qw.codes).tobytes() + table.tobytes(), rows, out)
        ref = x.astype(np.float64) @ np.asarray(qw.rotated(), np.float64).T
        assert rel_err(y, ref) < 1e-6, (bits, out, k, nt, tiles, splits, blocks)


_VQ2_HOST_MAIN = r"""
// argv: index_bits out in group_rows group_cols blocks_per_set warps in out
// in: x f32 [in], codes i32 [out, words], cb u32 [tr, tc, 2^bits]; out: part f32 [chunks, out]
int main(int argc, char** argv) {
  if (argc != 10) return 1;
  const int B = atoi(argv[1]), out = atoi(argv[2]), k = atoi(argv[3]), gr = atoi(argv[4]), gc = atoi(argv[5]);
  const int per_set = atoi(argv[6]), warps = atoi(argv[7]);
  FILE* in = fopen(argv[8], "rb");
  FILE* fo = fopen(argv[9], "wb");
  if (!in || !fo) return 3;
  const int runs = (k / 2 + 31) / 32, chunks = (runs + 31) / 32, tr = (out + gr - 1) / gr, tc = (k + gc - 1) / gc;
  std::vector<float> x;
  std::vector<int32_t> codes;
  std::vector<uint32_t> cb;
  if (!read(in, x, k) || !read(in, codes, size_t(out) * runs * B) || !read(in, cb, size_t(tr) * tc * (1 << B)))
    return 2;
  std::vector<float> part(size_t(chunks) * out, NAN);
  VqArgs a{};
  a.x = x.data();
  a.codes = reinterpret_cast<const uint32_t*>(codes.data());
  a.cb = cb.data();
  a.part = part.data();
  a.in = k; a.out = out; a.words = runs * B; a.runs = runs; a.tc = tc; a.group_rows = gr; a.group_cols = gc;
  a.chunks = chunks;
  a.tiles_per_warp = (32 * 64 + gc - 1) / gc + 1;
  a.sets = (chunks + warps - 1) / warps;
  auto go = [&](auto kernel) { run(kernel, per_set * a.sets, warps); };
  if (B == 4) go([&] { vq2_matvec_kernel<4>(a); });
  else if (B == 6) go([&] { vq2_matvec_kernel<6>(a); });
  else go([&] { vq2_matvec_kernel<8>(a); });
  const bool ok = fwrite(part.data(), 4, part.size(), fo) == part.size();
  fclose(in);
  fclose(fo);
  return ok ? 0 : 4;
}
"""


def test_vq2_kernel_source_on_cpu(tmp_path):
    """The GPTVQ 2-D kernel's own source on the host (as the E8P test above) against float64
    x @ W.T from ``formats.vq.decode``: 4, 6 (indices straddling words) and 8 index bits, partial
    last chunk and row group, idle warps, several blocks per chunk set."""
    import subprocess

    from jaxquant.formats import packing
    from jaxquant.formats import vq as jq_vq

    cuts = _E8P_HOST_CUTS[:3] + [("constexpr int kVqRun = 32;", "template <int B>\ncudaError_t launch_vq2")]
    exe = _host_harness(tmp_path, cuts, _HOST_PRELUDE + _VQ2_HOST_MAIN)
    rng = np.random.default_rng()
    cases = [(4, 37, 4224, 4, 128, 2, 2), (6, 19, 2048, 8, 256, 1, 4), (8, 9, 1216, 3, 64, 3, 1)]
    for bits, out, k, gr, gc, per_set, warps in cases:  # index bits, rows, inputs, tile, grid
        idx = rng.integers(0, 2**bits, (out, k // 2), np.uint32)
        codes = np.asarray(packing.pack(jnp.asarray(idx), bits))
        tiles = (-(-out // gr), -(-k // gc), 2**bits, 2)
        cb = rng.standard_normal(tiles).astype(np.float16)  # exact in the kernel's fp16 table
        table = np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(cb), jnp.uint32))
        x = rng.standard_normal(k).astype(np.float32)
        (tmp_path / "in.bin").write_bytes(x.tobytes() + codes.astype(np.int32).tobytes() + table.tobytes())
        proc = subprocess.run([str(exe), *map(str, (bits, out, k, gr, gc, per_set, warps)), str(tmp_path / "in.bin"),
                               str(tmp_path / "out.bin")])
        assert proc.returncode == 0, (bits, out, k)
        part = np.fromfile(tmp_path / "out.bin", np.float32).reshape(-(-k // 2048), out)
        assert np.isfinite(part).all(), (bits, out, k)
        w = np.asarray(jq_vq.decode(jnp.asarray(idx), jnp.asarray(cb, jnp.float32), group_rows=gr, group_cols=gc))
        ref = w.astype(np.float64) @ x.astype(np.float64)
        assert rel_err(part.sum(0), ref) < 4e-3, (bits, out, k)


@pytest.mark.parametrize("bits", [2, 4])
def test_scalar_half2_decode_emulated(bits):
    """The half2 decode (variant 1): for pair i of a word, one shift and one mask put codes i and
    i + 16/B at the same mantissa bits of 1.0 in fp16 (2 bits: 8-9 for even i, 6-7 for odd i; 4 bits:
    6-9); with x'' = x, or 4x at bits 6-7 for 2 bits, sum x'' h - C = sum x c / kHalfScale exactly."""
    rng = np.random.default_rng()
    per_word, pairs = 32 // bits, 16 // bits
    w = rng.integers(0, 2**32, 64, dtype=np.uint64).astype(np.uint32)
    codes = (w[:, None] >> (bits * np.arange(per_word, dtype=np.uint32))) & (2**bits - 1)  # [64, 32 / B]
    x = rng.standard_normal((64, per_word))
    total = np.zeros(64)
    for i in range(pairs):
        pos = 10 - bits if bits == 4 or i % 2 == 0 else 6
        sh = pos - bits * i
        t = (w << np.uint32(sh)) if sh > 0 else (w >> np.uint32(-sh))
        mask = np.uint32(((2**bits - 1) << pos) * 0x10001)
        hv = (t & mask) | np.uint32(0x3C003C00)
        h = hv.view(np.float16).reshape(64, 2).astype(np.float64)
        np.testing.assert_array_equal((h - 1) * 2 ** (10 - pos), codes[:, [i, i + pairs]])
        f = 4.0 if bits == 2 and pos == 6 else 1.0
        xx = x[:, [i, i + pairs]] * f
        total += (xx * h).sum(1) - xx.sum(1)
    np.testing.assert_allclose((4 if bits == 2 else 16) * total, (x * codes).sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bits", [2, 4])
def test_e8p_x_layout(bits):
    """The kernel reads group g of code unit u (G = 16 / bits groups of 8 inputs per unit) at
    ``b * in/8 + g * units + u``: the wrapper's layout must put x[b, 8 (u G + g) : +8] there."""
    n, k = 3, 256
    x = np.asarray(jax.random.normal(jax.random.key(bits), (n, k), jnp.float32))
    xh, xq = cuda_ops.e8p_x_layout(jnp.asarray(x), bits)
    xh, xq = np.asarray(xh, np.float32).reshape(n, k // 8, 8), np.asarray(xq)
    G, units = 16 // bits, k // (8 * (16 // bits))
    for b in range(n):
        for u in range(units):
            for g in range(G):
                want = x[b, 8 * (u * G + g): 8 * (u * G + g) + 8]
                np.testing.assert_allclose(xh[b, g * units + u], want, rtol=1e-3, atol=1e-3)
                np.testing.assert_allclose(xq[b, g * units + u], -0.25 * want.sum(), rtol=1e-5, atol=1e-6)


def _qtip_row_words(words: np.ndarray, k: int, r: int) -> list[int]:
    """The words a lane reads for tile row r, realigned as the kernel does (odd rows at k = 3)."""
    W, nw = 8 * k, 2 if k == 2 else 3
    w = [int(words[(((k * r) >> 1) + m) % W]) for m in range(nw)]
    sub = (16 * k * r) & 31
    a = [((w[m] << sub) | (w[m + 1] >> (32 - sub) if sub else 0)) & 0xFFFFFFFF for m in range(nw - 1)]
    return a + [(w[-1] << sub) & 0xFFFFFFFF]


def _qtip_lane_states(words: np.ndarray, k: int, V: int, L: int) -> np.ndarray:
    """States of one tile as the kernel's lanes extract them: ``[8k]`` uint32 words -> ``[256/V]``."""
    kv, ns, nw = k * V, 16 // V, 2 if k == 2 else 3
    out = []
    for r in range(16):
        a = _qtip_row_words(words, k, r)
        for i in range(ns):
            o = i * kv
            h, l_ = a[o // 32], a[min(o // 32 + 1, nw - 1)]
            sh = o % 32
            f = ((h << sh) | (l_ >> (32 - sh) if sh else 0)) & 0xFFFFFFFF
            out.append(f >> (32 - L))
    return np.array(out, np.uint32)


def _qtip_hyb_lane_states(words: np.ndarray, k: int) -> np.ndarray:
    """HYB states as the kernel extracts them (L = 16, V = 2): the state's 16 stream bits at the bottom
    of a word, earlier stream bits above them, ``[8k]`` uint32 words -> ``[128]``."""
    kv, nw = 2 * k, 2 if k == 2 else 3
    out = []
    for r in range(16):
        a = _qtip_row_words(words, k, r)
        for i in range(8):
            w0, b0 = divmod(i * kv, 32)
            if b0 <= 16:
                out.append(a[w0] >> (16 - b0))
            else:
                out.append((((a[w0] << 32) | a[min(w0 + 1, nw - 1)]) >> (48 - b0)) & 0xFFFFFFFF)
    return np.array(out, np.uint32)


_QTIP_HOST_MAIN = r"""
// argv: code kbits n k_in out ksplit blocks warps in out
// in: x (hyb: f16 [n, k_in]; 3inst: f16 [n, 2 k_in]; 1mad: f32 [n, k_in]), codes i32 [out/16, k_in/16, 8 kbits],
// table u32 [512]; out: y f32 [n, out] (1mad: sum x (1 + y/1024), as the kernel returns it)
int main(int argc, char** argv) {
  if (argc != 11) return 1;
  const int code = atoi(argv[1]), kb = atoi(argv[2]), n = atoi(argv[3]), k = atoi(argv[4]), out = atoi(argv[5]);
  const int ksplit = atoi(argv[6]), blocks = atoi(argv[7]), warps = atoi(argv[8]);
  FILE* in = fopen(argv[9], "rb");
  FILE* fo = fopen(argv[10], "wb");
  if (!in || !fo) return 3;
  std::vector<uint8_t> x;
  std::vector<uint32_t> codes, table;
  const size_t xbytes = size_t(n) * k * (code == kMad1 ? 4 : code == kInst3 ? 4 : 2);
  if (!read(in, x, xbytes) || !read(in, codes, size_t(out / 16) * (k / 16) * 8 * kb) || !read(in, table, 512)) return 2;
  std::vector<float> y(size_t(n) * out, NAN);
  QtipArgs a{x.data(), codes.data(), table.data(), y.data(), n, k, out / 16, k / 16, ksplit, 16};
  auto go = [&](auto ck, auto kk) {
    constexpr int C = decltype(ck)::value, K = decltype(kk)::value;
    if (n <= 1) run([&] { qtip_matvec_kernel<C, K, 1, 4>(a); }, blocks, warps);
    else run([&] { qtip_matvec_kernel<C, K, 4, 4>(a); }, blocks, warps);
  };
  auto by_k = [&](auto ck) {
    if (kb == 2) go(ck, std::integral_constant<int, 2>{});
    else if (kb == 3) go(ck, std::integral_constant<int, 3>{});
    else go(ck, std::integral_constant<int, 4>{});
  };
  if (code == kHyb) by_k(std::integral_constant<int, kHyb>{});
  else if (code == kMad1) by_k(std::integral_constant<int, kMad1>{});
  else by_k(std::integral_constant<int, kInst3>{});
  const bool ok = fwrite(y.data(), 4, y.size(), fo) == y.size();
  fclose(in);
  fclose(fo);
  return ok ? 0 : 4;
}
"""


def test_qtip_kernel_source_on_cpu(tmp_path):
    """qtip_matvec_kernel's own source, compiled for the host, against float64 x @ Wc.T: HYB, 1MAD and 3INST at
    k = 2, 3, 4; one and three rows of x; 1, 2 and 4 K-slices, some with a tile column left over; a grid that
    walks several row groups; the next tiles' words in flight across a slice's end."""
    import subprocess

    cuts = _E8P_HOST_CUTS[:3] + [("enum QtipCode : int", "template <int CODE, int K, int NB>\ncudaError_t launch_qtip")]
    exe = _host_harness(tmp_path, cuts, _HOST_PRELUDE + _QTIP_HOST_MAIN)
    cases = [  # (code, k, rows of x, out, in, K-slices, blocks, warps)
        ("hyb", 2, 1, 64, 512, 1, 2, 2), ("hyb", 2, 3, 48, 400, 2, 1, 4), ("hyb", 3, 1, 32, 272, 4, 1, 4),
        ("hyb", 4, 1, 48, 528, 2, 3, 2), ("1mad", 2, 1, 32, 400, 2, 1, 2), ("1mad", 3, 3, 48, 256, 1, 2, 2),
        ("3inst", 4, 1, 32, 272, 2, 2, 2), ("3inst", 2, 3, 32, 512, 4, 1, 4)]
    for i, (code, k, n, out, inp, ksplit, blocks, warps) in enumerate(cases):
        qt = random_qtip(jax.random.key(700 + i), out, inp, code, k)
        x = np.asarray(jax.random.normal(jax.random.key(750 + i), (n, inp), jnp.float32))
        xk = {"hyb": x.astype(np.float16), "1mad": x, "3inst": np.repeat(x.astype(np.float16), 2, axis=-1)}[code]
        table = (np.asarray(qt.table, np.float16).reshape(512, 2).view(np.uint32).reshape(-1) if code == "hyb"
                 else np.zeros(512, np.uint32))
        (tmp_path / "in.bin").write_bytes(xk.tobytes() + np.asarray(qt.codes).tobytes() + table.tobytes())
        args = (cuda_ops.QTIP_CODES[code], k, n, inp, out, ksplit, blocks, warps)
        proc = subprocess.run([str(exe), *map(str, args), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")])
        assert proc.returncode == 0, cases[i]
        y = np.fromfile(tmp_path / "out.bin", np.float32).reshape(n, out).astype(np.float64)
        assert np.isfinite(y).all(), cases[i]
        if code == "1mad":
            y = cuda_ops.MAD1_SCALE * (1024.0 * y - 1534.0 * x.sum(-1, keepdims=True))
        vals = np.asarray(jq_qtip.decode_tiles(qt.codes, qt.table, code=qt.trellis, k=k, tile=qt.tile), np.float64)
        assert rel_err(y, x.astype(np.float64) @ vals.T) < 4e-3, cases[i]


@pytest.mark.parametrize("k", [2, 3, 4])
def test_qtip_kernel_hyb_states_emulated(k):
    """The HYB path's states keep earlier stream bits above their own 16: the bottom 16 bits are the
    format's states (and h = s(s+1) reads no others)."""
    words = np.asarray(jax.random.randint(jax.random.key(70 + k), (3, 8 * k), jnp.iinfo(jnp.int32).min,
                                          jnp.iinfo(jnp.int32).max, jnp.int32))
    ref = np.asarray(jq_qtip.unpack_states(jnp.asarray(words), L=16, kV=2 * k, n=128))
    for t in range(3):
        got = _qtip_hyb_lane_states(words[t].view(np.uint32), k)
        np.testing.assert_array_equal(got & 0xFFFF, ref[t])
        assert (got >> 16).any()  # garbage is really there: the mask is what the kernel skips


@pytest.mark.parametrize("k,V", [(2, 2), (3, 2), (4, 2), (2, 1), (3, 1), (4, 1)])
def test_qtip_kernel_states_emulated(k, V):
    L = 16
    words = np.asarray(jax.random.randint(jax.random.key(10 * k + V), (3, 8 * k), jnp.iinfo(jnp.int32).min,
                                          jnp.iinfo(jnp.int32).max, jnp.int32))
    ref = np.asarray(jq_qtip.unpack_states(jnp.asarray(words), L=L, kV=k * V, n=256 // V))
    for t in range(3):
        np.testing.assert_array_equal(_qtip_lane_states(words[t].view(np.uint32), k, V, L), ref[t])


def test_qtip_kernel_decoders_emulated():
    """The kernel's value maps: hyb's shared-memory index and sign flip, 1mad's 1 + y/1024 form
    (with the wrapper's affine correction), 3inst's two-half sum."""
    s = np.arange(1 << 16, dtype=np.uint32)
    table = np.asarray(jq_trellis.hyb_table(9, 0))
    garbage = np.asarray(jax.random.randint(jax.random.key(3), s.shape, 0, 1 << 16, jnp.int32)).astype(np.uint32)
    sg = s | garbage << 16  # the kernel's state: stream bits above the 16 it decodes
    h = sg * sg + sg
    lane = s % 32
    words = table.view(np.uint32).reshape(-1)
    both = np.concatenate([words, words ^ np.uint32(0x8000)])  # entry i: the sign of coordinate 0 flipped from 512
    smem = np.repeat(both, 16)  # 16 copies per entry, as words
    v = smem[((h & 0xFFC0) | (lane & 15) << 2) >> 2]  # the byte address (h & 0xFFC0) | copy * 4
    got = v.view(np.float16).reshape(-1, 2).astype(np.float32)
    np.testing.assert_array_equal(got, np.asarray(jq_trellis.decode_hyb(jnp.asarray(s), jnp.asarray(table))))
    m = s * np.uint32(34038481) + np.uint32(76625530)
    y = sum((m >> (8 * i)) & 0xFF for i in range(4))
    f = (y * 8192 + 0x3F800000).view(np.float32).astype(np.float64)
    val = cuda_ops.MAD1_SCALE * (1024 * f - 1534)
    np.testing.assert_allclose(val, np.asarray(jq_trellis.decode_1mad(jnp.asarray(s)), np.float64), rtol=0, atol=2e-6)
    r = ((s * np.uint32(89226354) + np.uint32(64248484)) & np.uint32(0x8FFF8FFF)) ^ np.uint32(0x3B603B60)
    halves = r.view(np.float16).reshape(-1, 2).astype(np.float32).sum(-1)
    np.testing.assert_allclose(halves, np.asarray(jq_trellis.decode_3inst(jnp.asarray(s))), rtol=1e-3)


def random_quip(key, out: int, inp: int, bits: int) -> QuIPSharpQuantized:
    """Uniform random E8P (or RVQ4) codes, random +-1 signs and a positive scale."""
    k1, k2, k3 = jax.random.split(key, 3)
    codes = jax.random.randint(k1, (out, inp // 8, bits), 0, 256, jnp.int32).astype(jnp.uint8)
    su = jnp.where(jax.random.bernoulli(k2, 0.5, (inp,)), 1.0, -1.0).astype(jnp.float16)
    sv = jnp.where(jax.random.bernoulli(k3, 0.5, (out,)), 1.0, -1.0).astype(jnp.float16)
    return QuIPSharpQuantized(codes, su, sv, jnp.array([0.03], jnp.float32), (out, inp), bits,
                              jq_e8p.CODEBOOK_FOR_BITS[bits])


def random_qtip(key, out: int, inp: int, code: str, k: int) -> QTIPQuantized:
    """Random streams (every word sequence is a valid tail-biting stream) and +-1 signs."""
    k1, k2, k3 = jax.random.split(key, 3)
    codes = jax.random.randint(k1, (out // 16, inp // 16, 8 * k), jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max,
                               jnp.int32)
    su = jnp.where(jax.random.bernoulli(k2, 0.5, (inp,)), 1.0, -1.0).astype(jnp.float16)
    sv = jnp.where(jax.random.bernoulli(k3, 0.5, (out,)), 1.0, -1.0).astype(jnp.float16)
    tc = jq_trellis.TrellisCode(code)
    table = jnp.asarray(tc.default_table() if code == "hyb" else np.zeros((1, 1), np.float16))
    return QTIPQuantized(codes, jnp.array([0.05], jnp.float32), su, sv, table, (out, inp), k, code, 16, tc.V, 9)


def test_vq_kernels_lower_for_cuda():
    qw = random_quip(jax.random.key(1), 64, 256, 2)
    x = jnp.ones((3, 256), jnp.float32)
    table = cuda_ffi.e8p_abs_table(jq_e8p.e8p_source_set())
    text = _lower_for_cuda(lambda x: cuda_ops.e8p_matvec(x, qw.codes, table, bits=2, tensor_cores=False,
                                                         register=False), x)
    assert "jaxquant_e8p_matvec" in text
    # the x-stationary variant at batch 1: per-chunk partials [4096 * 2 / 4096, 64], summed after
    wide = random_quip(jax.random.key(2), 64, 4096, 2)
    text = _lower_for_cuda(lambda x: cuda_ops.e8p_matvec(x, wide.codes, table, bits=2, variant=1,
                                                         register=False), jnp.ones((1, 4096), jnp.float32))
    call = [line for line in text.splitlines() if "jaxquant_e8p_matvec_xs" in line]
    assert call and "(tensor<4096xf32>," in call[0] and "-> tensor<2x64xf32>" in call[0]
    assert "tensor_cores = 0" in call[0]
    # its tensor-core form: chunks of 8 code units (512 inputs at 2 bits, 256 at 4), x's RHT from 512 inputs
    for bits, k, chunks in ((2, 4096, 8), (4, 4096, 16), (2, 512, 1)):
        w = random_quip(jax.random.key(3), 64, k, bits)
        su = jnp.ones((k,), jnp.float32) if k == 512 else None
        text = _lower_for_cuda(lambda x, w=w, su=su, bits=bits: cuda_ops.e8p_matvec(
            x, w.codes, table, bits=bits, variant=2, su=su, register=False), jnp.ones((1, k), jnp.float32))
        call = [line for line in text.splitlines() if "jaxquant_e8p_matvec_xs" in line]
        assert call and "tensor_cores = 1" in call[0] and f"-> tensor<{chunks}x64xf32>" in call[0], (bits, k)
    assert cuda_ffi.e8p_xs_rht_fits(512, 2, 2) and not cuda_ffi.e8p_xs_rht_fits(512, 2, 1)
    # 2-16 rows: the tensor-core kernel on x padded to 8 rows in fp16, partials [splits, 8, out]
    text = _lower_for_cuda(lambda x: cuda_ops.e8p_matvec(x, wide.codes, table, bits=2, register=False),
                           jnp.ones((3, 4096), jnp.float32))
    call = [line for line in text.splitlines() if "jaxquant_e8p_mma" in line]
    assert call and "(tensor<8x4096xf16>," in call[0] and "x8x64xf32>" in call[0]
    with pytest.raises(ValueError, match="do not fit"):
        cuda_ops.e8p_mma(jnp.ones((3, 64), jnp.float32), qw.codes[:, :8], table, bits=2, register=False)
    for code in ("hyb", "1mad", "3inst"):
        qt = random_qtip(jax.random.key(2), 32, 256, code, 3)
        text = _lower_for_cuda(lambda x, qt=qt: cuda_ops.qtip_matvec(
            x, qt.codes, qt.table if code == "hyb" else None, code=code, k=3, register=False), x)
        assert "jaxquant_qtip_matvec" in text


def test_quip_linear_lowers_with_partials_summed_by_the_transform(monkeypatch):
    """At batch 1 the x-stationary E8P kernel's per-chunk partials go straight into the inverse
    transform's kernel (parts = chunks), with no XLA reduction between: 2^p and K * 2^p outputs, one
    cluster kernel on [parts, 1, n]. A power-of-two input width is rotated by the E8P kernel itself
    (rht = 1, no transform call before it); others are not."""
    from jaxquant.formats import quip_sharp

    monkeypatch.setattr(cuda_build, "load", lambda: None)  # lower only: nothing is registered here
    monkeypatch.setattr(dispatch, "E8P_LINEAR_ONE_CALL", False)  # three calls (one: the test below)
    jax.clear_caches()  # a trace is cached by shape, not by the switch
    for out, inp in ((64, 4096), (768, 4096), (64, 3072)):
        qw = random_quip(jax.random.key(out), out, inp, 2)
        text = _lower_for_cuda(lambda x, qw=qw: quip_sharp._matmul_kernel(x, qw, kernel="cuda"),
                               jnp.ones((1, inp), jnp.bfloat16))
        lines = text.splitlines()
        inverse = [line for line in lines if "jaxquant_rht_cluster(" in line and "parts = 2" in line]
        assert inverse and f"(tensor<2x1x{out}xf32>" in inverse[0], out
        assert "stablehlo.reduce" not in text and "dot_general" not in text, out
        in_kernel = cuda_ffi.e8p_xs_rht_fits(inp, 2)
        assert in_kernel == (inp == 4096)
        assert [f"rht = {int(in_kernel)}" in line for line in lines if "jaxquant_e8p_matvec_xs" in line] == [True]
        assert sum("jaxquant_rht_cluster(" in line for line in lines) == (1 if in_kernel else 2), (out, inp)


def test_quip_linear_is_one_call_at_batch_1(monkeypatch):
    """A batch-1 QuIP# linear lowers to one ``jaxquant_e8p_linear`` call and nothing else of ours:
    x's RHT in the E8P kernel for 2^p inputs, on a cluster (in_cluster = 1, x's signs applied before)
    for K * 2^p; batch 2 keeps the separate calls."""
    from jaxquant.formats import quip_sharp

    monkeypatch.setattr(cuda_build, "load", lambda: None)
    jax.clear_caches()  # a trace is cached by shape, not by E8P_LINEAR_ONE_CALL
    for out, inp, bits, parts in ((64, 4096, 2, ()), (768, 4096, 4, ()), (64, 3072, 2, ()), (12288, 11008, 2, ()),
                                  (12288, 4096, 2, (4096, 4096, 4096)), (64, 4096, 2, (28, 36)),
                                  (64, 4096, 2, (30, 34))):
        qw = random_quip(jax.random.key(out), out, inp, bits)
        if parts:  # a fused linear: a row scale per part
            qw = dataclasses.replace(qw, parts=parts, scale=jnp.arange(1.0, 1.0 + len(parts), dtype=jnp.float32))
        text = _lower_for_cuda(lambda x, qw=qw: quip_sharp._matmul_kernel(x, qw, kernel="cuda"),
                               jnp.ones((1, inp), jnp.bfloat16))
        calls = [line for line in text.splitlines() if "stablehlo.custom_call @jaxquant_" in line]
        assert len(calls) == 1 and "@jaxquant_e8p_linear(" in calls[0], (out, inp)
        in_cluster = not cuda_ffi.e8p_xs_rht_fits(inp, bits)
        chunks = -(-(inp * bits // 128) // 32)
        assert f"in_cluster = {int(in_cluster)}" in calls[0], (out, inp)
        # the row scales and the cast to x's dtype are the last kernel's (parts of 4k rows), else XLA's
        in_store = all(p % 4 == 0 for p in parts)
        y_type = "bf16" if in_store else "f32"
        assert f"tensor<{out}x{y_type}>, tensor<{chunks}x{out}xf32>, tensor<{inp if in_cluster else 1}xf32>" in calls[0]
        assert ("stablehlo.multiply" in text.split("@jaxquant_e8p_linear(")[1]) != in_store, (out, parts)
        if in_store and len(parts) > 1:
            assert f"split0 = {parts[0]}" in calls[0] and f"split1 = {parts[0] + parts[1] if len(parts) == 3 else 0}" \
                in calls[0], parts
        text2 = _lower_for_cuda(lambda x, qw=qw: quip_sharp._matmul_kernel(x, qw, kernel="cuda"),
                                jnp.ones((2, inp), jnp.bfloat16))
        assert "jaxquant_e8p_linear" not in text2 and "jaxquant_e8p" in text2


def test_quip_normed_linear_is_one_call(monkeypatch):
    """At batch 1 with x's RHT in the E8P kernel, that kernel also makes the RMSNorm before the
    linear: one ``jaxquant_e8p_linear`` call taking x and the norm's weight in their dtypes (float32,
    fp16, bf16), no XLA reduction. K * 2^p inputs, batch 2 and the switch off decline (None)."""
    monkeypatch.setattr(cuda_build, "load", lambda: None)
    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
    qw = random_quip(jax.random.key(1), 768, 4096, 2)
    w = jnp.ones((4096,))
    for dtype, name in ((jnp.float32, "f32"), (jnp.float16, "f16"), (jnp.bfloat16, "bf16")):
        for w in (jnp.ones((4096,)), jnp.ones((4096,), dtype)):
            text = _lower_for_cuda(lambda x, w: qw.normed_matmul(x, w, 1e-5, backend="cuda"),
                                   jnp.ones((1, 4096), dtype), w)
            calls = [line for line in text.splitlines() if "stablehlo.custom_call @jaxquant_" in line]
            assert len(calls) == 1 and "@jaxquant_e8p_linear(" in calls[0] and "norm = 1" in calls[0], dtype
            assert "stablehlo.reduce" not in text and "rsqrt" not in text, dtype
            # x and the norm's weight go in as they are: no convert kernel before the call
            assert f": (tensor<4096x{name}>," in calls[0] and f"tensor<4096x{w.dtype.name[0]}" in calls[0], dtype
    other = random_quip(jax.random.key(2), 64, 3072, 2)
    assert other.normed_matmul(jnp.ones((1, 3072)), jnp.ones((3072,)), 1e-5, backend="cuda") is None
    assert qw.normed_matmul(jnp.ones((2, 4096)), w, 1e-5, backend="cuda") is None
    assert qw.normed_matmul(jnp.ones((1, 4096)), w, 1e-5, backend="reference") is None
    for switch in ("E8P_LINEAR_NORM", "E8P_LINEAR_ONE_CALL"):
        with monkeypatch.context() as m:
            m.setattr(dispatch, switch, False)
            assert qw.normed_matmul(jnp.ones((1, 4096)), w, 1e-5, backend="cuda") is None, switch


def random_quip_gate_up(key, f: int, d: int, bits: int) -> QuIPSharpQuantized:
    """A fused [gate; up] QuIP# weight [2 f, d]: two parts with their own row scales."""
    qw = random_quip(key, 2 * f, d, bits)
    return dataclasses.replace(qw, scale=jnp.array([0.03, 0.05], jnp.float32), parts=(f, f))


def test_quip_add_and_mlp_block_are_one_call(monkeypatch):
    """At batch 1 the o-proj's residual add is made by its one-call linear (``matmul_add``: one
    ``jaxquant_e8p_linear`` call with add_resid, the result in the residual's dtype), and a whole MLP
    block of QuIP# weights is one ``jaxquant_e8p_mlp`` call (no XLA kernel: no add, multiply or
    logistic). Fused parts, batch 2, other codebooks, mismatched shapes and the switches decline."""
    monkeypatch.setattr(cuda_build, "load", lambda: None)
    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
    o = random_quip(jax.random.key(1), 4096, 4096, 2)
    gate_up = random_quip_gate_up(jax.random.key(2), 11008, 4096, 2)
    down = random_quip(jax.random.key(3), 4096, 11008, 2)
    for dtype, name in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16")):
        x = jnp.ones((1, 1, 4096), dtype)
        text = _lower_for_cuda(lambda a, r: o.matmul_add(a, r, backend="cuda"), x, x)
        calls = [line for line in text.splitlines() if "stablehlo.custom_call @jaxquant_" in line]
        assert len(calls) == 1 and "@jaxquant_e8p_linear(" in calls[0] and "add_resid = 1" in calls[0], dtype
        assert "stablehlo.add" not in text and f"-> (tensor<4096x{name}>" in calls[0], dtype
        text = _lower_for_cuda(lambda a, w: gate_up.swiglu_block(down, a, w, 1e-5, backend="cuda"), x,
                               jnp.ones((4096,), dtype))
        calls = [line for line in text.splitlines() if "stablehlo.custom_call @jaxquant_" in line]
        assert len(calls) == 1 and "@jaxquant_e8p_mlp(" in calls[0], dtype
        for op in ("stablehlo.add", "stablehlo.multiply", "stablehlo.logistic", "stablehlo.reduce"):
            assert op not in text, (dtype, op)
        assert f"-> (tensor<4096x{name}>" in calls[0], dtype
    x, w = jnp.ones((1, 4096)), jnp.ones((4096,))
    assert gate_up.matmul_add(x, jnp.ones((1, 22016)), backend="cuda") is None  # two parts, two scales
    assert o.matmul_add(jnp.ones((2, 4096)), jnp.ones((2, 4096)), backend="cuda") is None
    assert gate_up.swiglu_block(down, jnp.ones((2, 4096)), w, 1e-5, backend="cuda") is None
    assert o.swiglu_block(down, x, w, 1e-5, backend="cuda") is None  # not two parts
    assert gate_up.swiglu_block(random_quip(jax.random.key(4), 4096, 11008, 4), x, w, 1e-5, backend="cuda") is None
    assert gate_up.swiglu_block(random_quip(jax.random.key(5), 2048, 11008, 2), x, w, 1e-5, backend="cuda") is None
    for switch, call in (("E8P_ADD_RESIDUAL", lambda: o.matmul_add(x, x, backend="cuda")),
                         ("E8P_LINEAR_ONE_CALL", lambda: o.matmul_add(x, x, backend="cuda")),
                         ("E8P_MLP_ONE_CALL", lambda: gate_up.swiglu_block(down, x, w, 1e-5, backend="cuda")),
                         ("E8P_LINEAR_ONE_CALL", lambda: gate_up.swiglu_block(down, x, w, 1e-5, backend="cuda"))):
        with monkeypatch.context() as m:
            m.setattr(dispatch, switch, False)
            assert call() is None, switch


def test_e8p_mlp_rejects_bad_input():
    table = cuda_ffi.e8p_abs_table(jq_e8p.e8p_source_set())
    gu, dn = random_quip_gate_up(jax.random.key(0), 1536, 2048, 2), random_quip(jax.random.key(1), 2048, 1536, 2)
    weights = lambda: [dict(codes=gu.codes, su=gu.SU, sv=gu.SV, scale=gu.scale,  # noqa: E731
                            out_factor=dispatch.cluster_factor(3072)),
                       dict(codes=dn.codes, su=dn.SU, sv=dn.SV, scale=dn.scale, in_factor=dispatch.cluster_factor(1536),
                            out_factor=dispatch.cluster_factor(2048))]
    x, w = jnp.ones((1, 2048), jnp.bfloat16), jnp.ones((2048,))
    jax.eval_shape(lambda: cuda_ffi.e8p_mlp(x, w, table, *weights(), bits=2, register=False))  # the valid call
    with pytest.raises(ValueError, match="one row"):
        cuda_ffi.e8p_mlp(jnp.ones((2, 2048)), w, table, *weights(), bits=2, register=False)
    with pytest.raises(ValueError, match="norm_weight"):
        cuda_ffi.e8p_mlp(x, jnp.ones((1024,)), table, *weights(), bits=2, register=False)
    gate_up, down = weights()
    down["in_factor"] = None
    with pytest.raises(ValueError, match="in_factor"):
        cuda_ffi.e8p_mlp(x, w, table, gate_up, down, bits=2, register=False)
    gate_up, down = weights()
    gate_up["scale"] = jnp.ones((1,))
    with pytest.raises(ValueError, match="gate_up scale"):
        cuda_ffi.e8p_mlp(x, w, table, gate_up, down, bits=2, register=False)
    with pytest.raises(ValueError, match="bits must be 2 or 4"):
        cuda_ffi.e8p_mlp(x, w, table, *weights(), bits=3, register=False)
    with pytest.raises(TypeError, match="dtype"):
        cuda_ffi.e8p_mlp(x.astype(jnp.int32), w, table, *weights(), bits=2, register=False)


def test_decoder_layers_hand_residuals_and_mlp_blocks_to_their_weights(monkeypatch):
    """Each layer's o_proj gets the residual stream to add (``matmul_add``) and its fused gate/up
    weight the whole MLP block (``swiglu_block`` with down, the norm's weight and eps), here through
    stand-ins that compute them unfused; the logits equal those of the plain path."""
    from jaxquant.formats.quip_sharp import QuIPSharpQuantized
    from jaxquant.model import llama
    from jaxquant.model.fuse import fuse_linears
    from jaxquant.model.params import model_from_params, set_param
    from helpers import random_params, tiny_config

    cfg = tiny_config()
    model = fuse_linears(model_from_params(cfg, random_params(cfg, seed=4)))
    for i in range(cfg.num_hidden_layers):
        for j, name in enumerate(("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")):
            lin = model.layers[i]
            for part in name.split("."):
                lin = getattr(lin, part)
            out, inp = lin.weight.get_value().shape
            set_param(model, f"layers.{i}.{name}.weight", random_quip(jax.random.key(10 * i + j), out, inp, 2))
    tokens = jnp.asarray([[2, 7, 1, 8]], jnp.int32)
    adds, blocks = [], []

    def add_stand_in(self, x, residual, backend="auto"):
        adds.append(self.shape)
        return residual + self.matmul(x)

    def block_stand_in(self, down, x, norm_weight, eps, backend="auto"):
        blocks.append((self.shape, down.shape, eps))
        gate, up = jnp.split(self.matmul(llama.rms_norm(x, norm_weight, eps)), 2, axis=-1)
        return x + down.matmul(jax.nn.silu(gate) * up)

    reference = np.asarray(model(tokens)[0])  # on the CPU both decline
    monkeypatch.setattr(QuIPSharpQuantized, "matmul_add", add_stand_in)
    monkeypatch.setattr(QuIPSharpQuantized, "swiglu_block", block_stand_in)
    got = np.asarray(model(tokens)[0])
    d, f = cfg.hidden_size, cfg.intermediate_size
    assert adds == [(d, cfg.num_attention_heads * cfg.head_dim)] * cfg.num_hidden_layers
    assert blocks == [((2 * f, d), (d, f), cfg.rms_norm_eps)] * cfg.num_hidden_layers
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-6)


def test_decoder_layers_hand_their_norms_to_the_linears(monkeypatch):
    """Each layer's two RMSNorms go to the fused linear after them (``Linear.after_norm``): a
    QuIP# weight's ``normed_matmul`` gets the norm's weight and eps (here a stand-in that norms, then
    multiplies), and the logits equal those of norming first."""
    from jaxquant.formats.quip_sharp import QuIPSharpQuantized
    from jaxquant.model import llama
    from jaxquant.model.fuse import fuse_linears
    from jaxquant.model.params import model_from_params, set_param
    from helpers import random_params, tiny_config

    cfg = tiny_config()
    model = fuse_linears(model_from_params(cfg, random_params(cfg, seed=3)))
    fused = {"self_attn.qkv_proj": "input_layernorm", "mlp.gate_up_proj": "post_attention_layernorm"}
    for i in range(cfg.num_hidden_layers):
        for j, name in enumerate(fused):
            lin = model.layers[i]
            for part in name.split("."):
                lin = getattr(lin, part)
            out, inp = lin.weight.get_value().shape
            set_param(model, f"layers.{i}.{name}.weight", random_quip(jax.random.key(10 * i + j), out, inp, 2))
    tokens = jnp.asarray([[3, 1, 4, 1, 5]], jnp.int32)
    calls = []

    def stand_in(self, x, norm_weight, eps, backend="auto"):
        calls.append((self.shape, np.asarray(norm_weight), eps))
        return self.matmul(llama.rms_norm(x, norm_weight, eps))

    reference = np.asarray(model(tokens)[0])  # on the CPU normed_matmul declines: norm, then matmul
    monkeypatch.setattr(QuIPSharpQuantized, "normed_matmul", stand_in)
    got = np.asarray(model(tokens)[0])
    assert len(calls) == 2 * cfg.num_hidden_layers
    for i in range(cfg.num_hidden_layers):
        for j, norm in enumerate(fused.values()):
            shape, weight, eps = calls[2 * i + j]
            np.testing.assert_array_equal(weight, np.asarray(getattr(model.layers[i], norm).weight.get_value()))
            assert eps == cfg.rms_norm_eps
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-6)


def test_e8p_linear_rejects_bad_input():
    table = cuda_ffi.e8p_abs_table(jq_e8p.e8p_source_set())
    qw = random_quip(jax.random.key(0), 64, 3072, 2)
    su, sv = qw.SU.astype(jnp.float32), qw.SV.astype(jnp.float32)
    out_factor = dispatch.cluster_factor(64)
    x = jnp.ones((1, 3072))
    with pytest.raises(ValueError, match="cannot rotate 3072"):
        cuda_ffi.e8p_linear(x, qw.codes, table, su, sv, out_factor, bits=2, register=False)
    with pytest.raises(ValueError, match="one row"):
        cuda_ffi.e8p_linear(jnp.ones((2, 3072)), qw.codes, table, su, sv, out_factor, bits=2, register=False)
    with pytest.raises(ValueError, match="not a cluster factor of width 64"):
        cuda_ffi.e8p_linear(x, qw.codes, table, su, sv, np.ones((3, 3)), bits=2, register=False,
                            in_factor=dispatch.cluster_factor(3072))
    with pytest.raises(ValueError, match="su"):
        cuda_ffi.e8p_linear(x, qw.codes, table, sv, sv, out_factor, bits=2, register=False,
                            in_factor=dispatch.cluster_factor(3072))
    with pytest.raises(ValueError, match="bits must be 2 or 4"):
        cuda_ffi.e8p_linear(x, qw.codes, table, su, sv, out_factor, bits=3, register=False)
    in_factor = dispatch.cluster_factor(3072)
    for rows in ((30, 34), (32, 16), (16,) * 4):
        with pytest.raises(ValueError, match="part_rows"):
            cuda_ffi.e8p_linear(x, qw.codes, table, su, sv, out_factor, bits=2, register=False, in_factor=in_factor,
                                part_rows=rows)
    with pytest.raises(ValueError, match="out_scale"):
        cuda_ffi.e8p_linear(x, qw.codes, table, su, sv, out_factor, bits=2, register=False, in_factor=in_factor,
                            part_rows=(32, 32), out_scale=jnp.ones((1,)))
    with pytest.raises(ValueError, match="residual"):
        cuda_ffi.e8p_linear(x, qw.codes, table, su, sv, out_factor, bits=2, register=False, in_factor=in_factor,
                            residual=jnp.ones((1, 32)))
    with pytest.raises(TypeError, match="out_dtype"):
        cuda_ffi.e8p_linear(x, qw.codes, table, su, sv, out_factor, bits=2, register=False, in_factor=in_factor,
                            out_dtype=jnp.int8)
    with pytest.raises(ValueError, match="variant"):
        cuda_ffi.e8p_linear(x, qw.codes, table, su, sv, out_factor, bits=2, register=False, in_factor=in_factor,
                            variant=3)


def test_rht_fast_takes_the_fused_kernel_only_for_many_rows(monkeypatch):
    """One block per row: below HADAMARD_K_MIN_ROWS rows (and above the cluster kernel's few) the 2^p
    kernel and an einsum are faster."""
    monkeypatch.setattr(cuda_build, "load", lambda: None)
    signs = jnp.ones((768,))
    for rows, fused in ((dispatch.RHT_CLUSTER_MAX_ROWS + 1, False), (dispatch.HADAMARD_K_MIN_ROWS, True)):
        text = _lower_for_cuda(lambda x: dispatch.rht_fast(x, signs), jnp.ones((rows, 768)))
        assert ("jaxquant_hadamard_k(" in text) == fused and ("jaxquant_hadamard(" in text) != fused, rows


def test_scalar_half2_decode_only_for_large_bf16_matrices(monkeypatch):
    """The half2 decode lost to the fp32 decode at 4096 x 4096 on an H100: bf16 calls take it from
    HALF2_MIN_WEIGHTS weights, other dtypes never."""
    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
    monkeypatch.setattr(dispatch, "HALF2_MIN_WEIGHTS", 64 * 256)
    variants = []
    monkeypatch.setattr(cuda_ffi, "scalar_matvec", lambda x, *a, variant, **k: variants.append(variant) or x)
    for out, dtype, half2 in ((64, jnp.bfloat16, True), (63, jnp.bfloat16, False), (64, jnp.float16, False)):
        qw = random_scalar(jax.random.key(out), out, 256, 4, 128)
        dispatch.scalar_matmul(qw, jnp.ones((1, 256), dtype), backend="cuda")
        assert variants.pop() == int(half2), (out, dtype)


def test_vq_dispatch_on_cpu():
    qw = random_quip(jax.random.key(3), 32, 128, 2)
    qt = random_qtip(jax.random.key(4), 32, 128, "hyb", 2)
    x = jax.random.normal(jax.random.key(5), (2, 128), jnp.float32)
    for w, pallas_tol in ((qw, 2.0**-11), (qt, 1e-4)):  # E8P at 2 rows: tensor cores, x rounded to fp16
        ref = np.asarray(x @ w.dequantize().T)
        assert rel_err(w.matmul(x), ref) < 1e-4
        assert rel_err(w.matmul(x, backend="pallas"), ref) < pallas_tol  # interpret mode off the GPU
        if jax.default_backend() == "cpu":
            with pytest.raises(cuda_ffi.CudaFFIUnavailable):
                w.matmul(x, backend="cuda")
    rvq3 = random_quip(jax.random.key(6), 32, 128, 3)
    with pytest.raises(ValueError, match="no CUDA kernel"):
        rvq3.matmul(x, backend="cuda")
    assert rel_err(rvq3.matmul(x, backend="pallas"), np.asarray(x @ rvq3.dequantize().T)) < 2.0**-11


VQ_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672), (14336, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4])
def test_cuda_e8p_matvec_gpu(bits):
    table = cuda_ffi.e8p_abs_table(jq_e8p.e8p_source_set())
    cb = jq_e8p.get_codebook(bits)
    for i, (out, inp) in enumerate(VQ_SHAPES + [(96, 512)]):
        qw = random_quip(jax.random.key(200 + 10 * i + bits), out, inp, bits)
        q = qw.rotated()
        for batch in (1, 4, 16):
            x = jax.random.normal(jax.random.key(300 + 10 * i + batch), (batch, inp), jnp.float32)
            y = cuda_ffi.e8p_matvec(x, qw.codes, table, bits=bits, resid_scale=cb.resid_scale or 1.0)
            ref = np.asarray(jnp.matmul(x, q.T, precision=HIGHEST))
            assert rel_err(y, ref) < 4e-3, (out, inp, batch)
        del q
    qw = random_quip(jax.random.key(9), 4099, 1024, bits)  # rows not a multiple of R: the tail
    x = jax.random.normal(jax.random.key(10), (1, 1024), jnp.float32)
    ref = np.asarray(jnp.matmul(x, qw.rotated().T, precision=HIGHEST))
    for rows, units, warps, variant in itertools.product((1, 2, 4), (1, 2), (0, 3), (0, 1)):
        y = cuda_ffi.e8p_matvec(x, qw.codes, table, bits=bits, resid_scale=cb.resid_scale or 1.0,
                                rows_per_warp=rows, units_per_step=units, warps=warps, variant=variant)
        assert rel_err(y, ref) < 4e-3, (rows, units, warps, variant)
    for i, (out, inp) in enumerate(VQ_SHAPES + [(96, 512)]):  # the x-stationary kernel (batch 1)
        qw = random_quip(jax.random.key(600 + 10 * i + bits), out, inp, bits)
        x = jax.random.normal(jax.random.key(700 + i), (1, inp), jnp.float32)
        ref = np.asarray(jnp.matmul(x, qw.rotated().T, precision=HIGHEST))
        for prefetch in (1, 2):
            y = cuda_ffi.e8p_matvec(x, qw.codes, table, bits=bits, resid_scale=cb.resid_scale or 1.0, variant=1,
                                    prefetch=prefetch)
            assert rel_err(y, ref) < 4e-3, (out, inp, prefetch)
        if cuda_ffi.e8p_xs_rht_fits(inp, bits):  # x's RHT in the kernel, real-valued signs
            su = jax.random.uniform(jax.random.key(800 + i), (inp,), jnp.float32, 0.5, 1.5) * jq_hadamard.random_signs(
                jax.random.key(900 + i), inp)
            ref = np.asarray(jnp.matmul(jq_hadamard.rht(x, su), qw.rotated().T, precision=HIGHEST))
            for prefetch, warps in ((1, 0), (2, 0), (1, 12), (1, 24)):  # 12, 24 warps: one block per SM
                y = cuda_ffi.e8p_matvec(x, qw.codes, table, bits=bits, resid_scale=cb.resid_scale or 1.0, variant=1,
                                        prefetch=prefetch, warps=warps, su=su)
                assert rel_err(y, ref) < 4e-3, (out, inp, prefetch, warps, "rht")
    # the full linear: RHT of 2^p, 12 * 2^p (fused kernel) and 172 * 2^p (einsum) outputs; batch 1
    # sends the x-stationary kernel's partials into the inverse transform (and 2^p inputs: x's RHT
    # made by that kernel)
    for out, inp in [(1024, 2048), (1536, 1536), (11008, 4096)]:
        qw = random_quip(jax.random.key(7 + out), out, inp, bits)
        for batch in (1, 3):
            x = jax.random.normal(jax.random.key(8), (batch, inp), jnp.bfloat16)
            ref = np.asarray(qw.matmul(x.astype(jnp.float32), backend="reference"))
            assert rel_err(qw.matmul(x, backend="cuda"), ref) < TOL[jnp.bfloat16], (out, inp, batch)
            assert rel_err(qw.matmul(x), ref) < TOL[jnp.bfloat16]  # auto


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4])
def test_cuda_e8p_tc_gpu(bits):
    """The batch-1 E8P / RVQ4 kernel on tensor cores (variant 2) against the rotated matmul at every
    listed shape, a row count past the last 16-row tile and a partial last chunk: 1 and 2 tiles per
    warp, 3 warps per block, and x's RHT in the kernel (real-valued signs)."""
    table = cuda_ffi.e8p_abs_table(jq_e8p.e8p_source_set())
    cb = jq_e8p.get_codebook(bits)
    odd_k = 1600 if bits == 2 else 800  # 25 code units: the last chunk holds one
    for i, (out, inp) in enumerate(VQ_SHAPES + [(96, 512), (4099, 1024), (40, odd_k)]):
        qw = random_quip(jax.random.key(1200 + 10 * i + bits), out, inp, bits)
        x = jax.random.normal(jax.random.key(1300 + i), (1, inp), jnp.float32)
        q = qw.rotated()
        ref = np.asarray(jnp.matmul(x, q.T, precision=HIGHEST))
        for rows, warps in ((0, 0), (1, 0), (2, 0), (1, 3)):
            y = cuda_ffi.e8p_matvec(x, qw.codes, table, bits=bits, resid_scale=cb.resid_scale or 1.0, variant=2,
                                    rows_per_warp=rows, warps=warps)
            assert np.isfinite(np.asarray(y)).all() and rel_err(y, ref) < 4e-3, (out, inp, rows, warps)
        if cuda_ffi.e8p_xs_rht_fits(inp, bits, 2):
            su = jax.random.uniform(jax.random.key(1400 + i), (inp,), jnp.float32, 0.5, 1.5) * jq_hadamard.random_signs(
                jax.random.key(1500 + i), inp)
            ref = np.asarray(jnp.matmul(jq_hadamard.rht(x, su), q.T, precision=HIGHEST))
            for rows in (1, 2):
                y = cuda_ffi.e8p_matvec(x, qw.codes, table, bits=bits, resid_scale=cb.resid_scale or 1.0, variant=2,
                                        rows_per_warp=rows, su=su)
                assert rel_err(y, ref) < 4e-3, (out, inp, rows, "rht")
        del q


@pytest.fixture(params=[1, 2], ids=["xs", "tc"])
def e8p_variant(request, monkeypatch):
    """Runs a test with each batch-1 E8P kernel behind the QuIP# linears (dispatch.E8P_BATCH1_VARIANT)."""
    monkeypatch.setattr(dispatch, "E8P_BATCH1_VARIANT", request.param)
    jax.clear_caches()  # the jitted linears read the switch when traced
    yield request.param
    jax.clear_caches()


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4])
def test_cuda_e8p_mma_gpu(bits):
    """The tensor-core E8P / RVQ4 kernel against the rotated weights: 2-16 rows, 1, 2 and 4 tiles per
    warp, forced splits (more than steps included), rows past a tile's end, partial sums kept. x is
    rounded to fp16 in the reference too, so what is left is the fp32 accumulation of the tensor cores
    (not IEEE-rounded: 1.9e-5 relative at 28672 inputs in one split, on an H100)."""
    table = cuda_ffi.e8p_abs_table(jq_e8p.e8p_source_set())
    resid = jq_e8p.get_codebook(bits).resid_scale or 1.0
    for i, (out, inp) in enumerate([(4096, 4096), (11008, 4096), (8192, 28672), (4099, 1024), (40, 512)]):
        qw = random_quip(jax.random.key(900 + 10 * i + bits), out, inp, bits)
        q = qw.rotated()
        for batch, tiles, splits in ((2, 0, 0), (5, 1, 3), (8, 2, 0), (9, 4, 1), (16, 0, 0), (13, 2, 100)):
            x = jax.random.normal(jax.random.key(950 + batch), (batch, inp), jnp.float32)
            ref = np.asarray(jnp.matmul(x.astype(jnp.float16).astype(jnp.float32), q.T, precision=HIGHEST))
            y = jax.jit(lambda x: cuda_ffi.e8p_mma(x, qw.codes, table, bits=bits, resid_scale=resid, tiles=tiles,
                                                   splits=splits))(x)
            assert y.shape == (batch, out) and rel_err(y, ref) < 1e-4, (out, inp, batch, tiles, splits)
        parts = cuda_ffi.e8p_mma(x.reshape(13, 1, inp), qw.codes, table, bits=bits, resid_scale=resid, keep_parts=True)
        assert parts.shape[1:] == (13, 1, out) and rel_err(parts.sum(0)[:, 0], ref) < 1e-4
        del q


@pytest.mark.gpu
@pytest.mark.parametrize("code", ["hyb", "1mad", "3inst"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_cuda_qtip_matvec_gpu(code, k):
    shapes = VQ_SHAPES if k == 2 else VQ_SHAPES[:1]
    for i, (out, inp) in enumerate(shapes + [(48, 512)]):
        qt = random_qtip(jax.random.key(400 + 10 * i + k), out, inp, code, k)
        vals = jq_qtip.decode_tiles(qt.codes, qt.table, code=qt.trellis, k=k, tile=qt.tile)
        for batch in (1, 4, 16):
            x = jax.random.normal(jax.random.key(500 + 10 * i + batch), (batch, inp), jnp.float32)
            y = cuda_ffi.qtip_matvec(x, qt.codes, qt.table if code == "hyb" else None, code=code, k=k)
            ref = np.asarray(jnp.matmul(x, vals.T, precision=HIGHEST))
            assert rel_err(y, ref) < 4e-3, (out, inp, batch)
        del vals
    for out, inp in [(1024, 2048), (1536, 1536)]:
        qt = random_qtip(jax.random.key(9 + out), out, inp, code, k)
        x = jax.random.normal(jax.random.key(10), (2, inp), jnp.bfloat16)
        ref = np.asarray(qt.matmul(x.astype(jnp.float32), backend="reference"))
        assert rel_err(qt.matmul(x, backend="cuda"), ref) < TOL[jnp.bfloat16], (out, inp)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4])
def test_cuda_scalar_half2_variant_gpu(bits):
    for i, (out, inp, group) in enumerate(SHAPES + [(8192, 28672, 128), (4096, 11008, 128)]):
        for dtype in (jnp.bfloat16, jnp.float16):
            qw = random_scalar(jax.random.key(800 + i), out, inp, bits, group)
            x = jax.random.normal(jax.random.key(900 + i), (1, inp), jnp.float32).astype(dtype)
            for cfg in (dict(), dict(rows_per_warp=1, ksplit=2), dict(rows_per_warp=4)):
                y = cuda_ffi.scalar_matvec(x, qw.codes, qw.scale, qw.zero, bits=bits, group_size=group, variant=1,
                                           **cfg)
                assert rel_err(y, reference(qw, x)) < TOL[jnp.bfloat16], (out, inp, group, dtype, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_cuda_hadamard_k_gpu(dtype):
    """The fused K * 2^p kernel against jaxquant.hadamard.rht / rht_inverse: K = 12, 20, 28 and
    2^p = 64 .. 1024, 1, 3 and 300 rows, signs or none, leading axes."""
    for k in cuda_ops.HADAMARD_K:
        for logm in range(6, 11):
            n = k << logm
            key = jax.random.key(n)
            x = jax.random.normal(key, (300, n), jnp.float32).astype(dtype)
            s = jq_hadamard.random_signs(jax.random.fold_in(key, 1), n)
            xf = x.astype(jnp.float32)
            refs = jq_hadamard.rht(xf, s), jq_hadamard.rht_inverse(xf, s), jq_hadamard.rht(xf, jnp.ones(n))
            three = jax.jit(lambda x: (cuda_ffi.hadamard_k(x, s), cuda_ffi.hadamard_k(x, s, inverse=True),
                                       cuda_ffi.hadamard_k(x)))
            for rows in (1, 3, 300):
                for y, ref in zip(three(x[:rows]), refs):
                    assert y.dtype == dtype
                    assert rel_err(y, ref[:rows]) < TOL[dtype], (n, rows)
            y3 = cuda_ffi.hadamard_k(x[:6].reshape(2, 3, n), s)
            assert rel_err(y3, np.asarray(refs[0][:6]).reshape(2, 3, n)) < TOL[dtype], n
            summed = jq_hadamard.rht_inverse(xf[:6].reshape(3, 2, n).sum(0), s)
            assert rel_err(cuda_ffi.hadamard_k(x[:6].reshape(3, 2, n), s, inverse=True, sum_parts=True),
                           summed) < TOL[dtype], n
            # real-valued sign vectors (fine-tuned QuIP# / QTIP): the magnitudes count too
            r = s * jax.random.uniform(jax.random.fold_in(key, 2), (n,), jnp.float32, 0.5, 1.5)
            for inverse, ref in ((False, jq_hadamard.rht(xf[:3], r)), (True, jq_hadamard.rht_inverse(xf[:3], r))):
                assert rel_err(cuda_ffi.hadamard_k(x[:3], r, inverse=inverse), ref) < TOL[dtype], (n, inverse)


@pytest.mark.gpu
def test_rht_fast_gpu():
    # 2^p; K = 12, 172 (einsum), 28, 28: the fused kernel from HADAMARD_K_MIN_ROWS rows, else the einsum
    for n, rows in itertools.product((1024, 1536, 11008, 14336, 28672), (3, dispatch.HADAMARD_K_MIN_ROWS)):
        x = jax.random.normal(jax.random.key(n), (rows, n), jnp.float32)
        s = jq_hadamard.random_signs(jax.random.key(n + 1), n)
        assert rel_err(dispatch.rht_fast(x, s), jq_hadamard.rht(x, s)) < 1e-5, (n, rows)
        assert rel_err(dispatch.rht_fast(x, s, inverse=True), jq_hadamard.rht_inverse(x, s)) < 1e-5, (n, rows)
        parts = jax.random.normal(jax.random.key(n + 2), (5, rows, n), jnp.float32)
        assert rel_err(dispatch.rht_fast(parts, s, inverse=True, sum_parts=True),
                       jq_hadamard.rht_inverse(parts.sum(0), s)) < 1e-5, (n, rows)
        r = s * jax.random.uniform(jax.random.key(n + 3), (n,), jnp.float32, 0.5, 1.5)  # fine-tuned signs
        assert rel_err(dispatch.rht_fast(x, r), jq_hadamard.rht(x, r)) < 1e-5, (n, rows)
        assert rel_err(dispatch.rht_fast(x, r, inverse=True), jq_hadamard.rht_inverse(x, r)) < 1e-5, (n, rows)


@pytest.mark.gpu
def test_cuda_scalar_matvec_llama_shapes_gpu():
    for i, (out, inp) in enumerate(VQ_SHAPES):
        for bits in (2, 4):
            qw = random_scalar(jax.random.key(600 + 10 * i + bits), out, inp, bits, 128)
            w = qw.dequantize(jnp.float32)
            for batch in (1, 4, 16):
                x = jax.random.normal(jax.random.key(700 + batch), (batch, inp), jnp.float32).astype(jnp.bfloat16)
                y = qw.matmul(x, backend="cuda")
                ref = np.asarray(jnp.matmul(x.astype(jnp.float32), w.T, precision=HIGHEST))
                assert rel_err(y, ref) < TOL[jnp.bfloat16], (out, inp, bits, batch)
            del w


def _script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ncu_sass_summary_splits_at_barriers():
    """scripts/ncu_sass_summary.py on a made-up SASS page: one stretch per BAR.SYNC-terminated run of
    instructions, each with its own samples, instruction count and stall reasons."""
    summary = _script("ncu_sass_summary")
    rng = np.random.default_rng()
    n = int(rng.integers(20, 60))
    bars = sorted(rng.choice(np.arange(1, n - 1), size=3, replace=False))
    header = ["Address", "Source", summary.SAMPLES, "Instructions Executed", "stall_barrier", "stall_long_sb",
              "stall_long_sb (Not Issued)"]
    rows, want = [], [[0, 0, 0]]
    for i in range(n):
        s, ins, lsb = (int(v) for v in rng.integers(0, 50, 3))
        src = "BAR.SYNC.DEFER_BLOCKING 0x0" if i in bars else "FADD R1, R2, R3"
        rows.append([f"0x{16 * i:x}", src, str(s + lsb), str(ins), str(s), str(lsb), "7"])
        want[-1] = [want[-1][0] + s + lsb, want[-1][1] + ins, want[-1][2] + lsb]
        if i in bars:
            want.append([0, 0, 0])
    _, _, stalls, parts = summary.stretches([["Kernel Name", "k"], header, *rows])
    assert stalls == ["stall_barrier", "stall_long_sb"]
    assert [[p["samples"], p["inst"], p["stalls"]["long_sb"]] for p in parts] == want


def test_sass_stats_finds_the_widest_loop():
    """scripts/sass_stats.py on a made-up listing: a nested loop, a wider one and a forward branch
    at random places; the widest backward branch's span is the loop, predicated opcodes counted."""
    sass_stats = _script("sass_stats")
    rng = np.random.default_rng()
    n = int(rng.integers(40, 80))
    a = int(rng.integers(5, n - 15))
    b = a + int(rng.integers(4, 10))
    ops = [str(rng.choice(["FADD", "@P0 LDS.64", "PRMT", "@!P1 HFMA2.MMA"])) + " R1, R2, R3" for _ in range(n)]
    ops[b] = f"@P2 BRA 0x{16 * a:x}"  # the wide loop
    ops[b - 1] = f"BRA 0x{16 * (b - 2):x}"  # a one-instruction inner loop
    ops[1] = f"BRA 0x{16 * (n - 1):x}"  # forward
    listing = "\n\tFunction : _Z6kernelv\n" + "\n".join(
        f"        /*{16 * i:04x}*/                   {op} ;  /* 0x0 */" for i, op in enumerate(ops))
    code = sass_stats.functions(listing)["_Z6kernelv"]
    assert [t for _, t in code] == ops
    loop = sass_stats.longest_loop(code)
    assert loop == ops[a:b + 1]
    counts = sass_stats.opcodes(loop)
    assert counts["BRA"] == 2 and sum(counts.values()) == b - a + 1
    assert counts["LDS.64"] == sum(op.startswith("@P0 LDS.64") for op in ops[a:b + 1])


_ATTN_HOST_HARNESS = r"""
// Runs decode_attention.cu (all of it, without its FFI handler) on the CPU: one std::thread per
// CUDA thread, a barrier for __syncthreads and per warp for the shuffles, NaN-filled shared memory.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

static thread_local uint3 h_threadIdx, h_blockIdx;
static std::barrier<>* h_bar = nullptr;
static std::vector<std::barrier<>*> h_warp_bar;
static float h_shfl[32][32];
alignas(16) static float h_att_smem[1 << 15];
#undef __global__
#define __global__
#undef __shared__
#define __shared__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx h_threadIdx
#define blockIdx h_blockIdx
#define att_smem h_att_smem
using std::max;
using std::min;
static void __syncthreads() { h_bar->arrive_and_wait(); }
""" + _HOST_SHUFFLE + r"""
#include "kernel_part.inc"

template <class F>
void run(dim3 grid, int threads, F kernel) {
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        for (auto& f : h_att_smem) f = NAN;
        std::barrier<> bar(threads);
        h_bar = &bar;
        h_warp_bar.clear();
        for (int w = 0; w < threads / 32; ++w) h_warp_bar.push_back(new std::barrier<>(32));
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t)
          ts.emplace_back([&kernel, t, x, y, z] {
            h_threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
            h_blockIdx = uint3{x, y, z};
            kernel();
          });
        for (auto& th : ts) th.join();
        for (auto* b : h_warp_bar) delete b;
      }
}

template <class T> std::vector<T> convert(const std::vector<float>& v) {
  std::vector<T> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = att_cast<T>(v[i]);
  return r;
}
template <class T> std::vector<float> widen(const std::vector<T>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = att_float(v[i]);
  return r;
}

// argv: dtype of qkv, dtype of the cache (0 f32, 1 f16, 2 bf16), D, B, S, H, KVH, splits, pos, in, out
template <class T, class C, int D>
int attend(int B, int S, int H, int KVH, int splits, int pos, FILE* in, FILE* out) {
  const size_t nq = size_t(B) * (H + 2 * KVH) * D, nc = size_t(B) * S * KVH * D;
  std::vector<float> qkv(nq), kc(nc), vc(nc), inv(D / 2);
  if (fread(qkv.data(), 4, nq, in) != nq || fread(kc.data(), 4, nc, in) != nc || fread(vc.data(), 4, nc, in) != nc ||
      fread(inv.data(), 4, D / 2, in) != size_t(D / 2)) return 2;
  std::vector<T> q = convert<T>(qkv), o(size_t(B) * H * D, att_cast<T>(NAN));
  std::vector<C> k = convert<C>(kc), v = convert<C>(vc);
  std::vector<float> po(size_t(B) * H * splits * D, NAN), pml(size_t(B) * H * splits * 2, NAN);
  int32_t p = pos;
  AttnArgs a{q.data(), k.data(), v.data(), &p, inv.data(), po.data(), pml.data(), o.data(), S, H, KVH, splits,
             1.0f / std::sqrt(float(D))};
  run(dim3(splits, KVH, B), kAttThreads, [&] { attn_split_kernel<T, C, D>(a); });
  run(dim3(H, B, 1), D, [&] { attn_combine_kernel<T, D>(a); });
  for (auto* r : {&o}) { auto w = widen(*r); fwrite(w.data(), 4, w.size(), out); }
  auto wk = widen(k), wv = widen(v);
  fwrite(wk.data(), 4, nc, out);
  fwrite(wv.data(), 4, nc, out);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 12) return 1;
  const int t = atoi(argv[1]), c = atoi(argv[2]), d = atoi(argv[3]);
  const int B = atoi(argv[4]), S = atoi(argv[5]), H = atoi(argv[6]), KVH = atoi(argv[7]);
  const int splits = atoi(argv[8]), pos = atoi(argv[9]);
  FILE* in = fopen(argv[10], "rb");
  FILE* out = fopen(argv[11], "wb");
  int rc = 3;
DISPATCH
  fclose(in);
  fclose(out);
  return rc;
}
"""

# (qkv dtype, cache dtype (0 f32, 1 f16, 2 bf16), D, B, S, H, KVH, splits, pos)
_ATTN_HOST_CASES = [
    (0, 0, 64, 2, 40, 6, 2, 3, 17),    # G = 3, three splits
    (0, 0, 64, 2, 40, 6, 2, 3, 0),     # the first token: one key
    (0, 0, 64, 1, 40, 6, 2, 8, 3),     # more splits than keys: empty splits
    (0, 0, 64, 1, 40, 6, 2, 2, 39),    # the last slot
    (0, 0, 64, 1, 40, 6, 2, 2, 55),    # past the cache: clamped slot, every key attended
    (1, 1, 128, 1, 32, 4, 4, 1, 20),   # G = 1, one split
    (0, 1, 128, 1, 64, 4, 2, 2, 63),   # full splits of 32 keys
    (2, 0, 128, 2, 24, 16, 1, 4, 23),  # G = 16, bf16 q with a float32 cache
    (1, 0, 64, 1, 70, 3, 3, 5, 64),
]


def _attn_reference(qkv, kc, vc, inv_freq, pos, H, KVH, tdt, cdt):
    """float64 attention of the new token with the XLA model's roundings: (out, k cache, v cache)."""
    B, S, _, D = kc.shape
    r = lambda a, dt: np.asarray(a, np.float64).astype(dt).astype(np.float64)  # noqa: E731
    qkv = r(qkv, tdt)
    kc, vc = r(kc, cdt), r(vc, cdt)
    ang = pos * inv_freq.astype(np.float64)
    cos, sin = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
    rope = lambda x: x * cos + np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1) * sin  # noqa: E731
    q = r(rope(qkv[:, :H * D].reshape(B, H, D)), tdt)
    k = r(r(rope(qkv[:, H * D:(H + KVH) * D].reshape(B, KVH, D)), tdt), cdt)
    v = r(qkv[:, (H + KVH) * D:].reshape(B, KVH, D), cdt)
    slot, keys = min(max(pos, 0), S - 1), min(pos + 1, S)
    kc, vc = kc.copy(), vc.copy()
    kc[:, slot], vc[:, slot] = k, v
    G = H // KVH
    scores = np.einsum("bkgd,bskd->bkgs", q.reshape(B, KVH, G, D), kc[:, :keys]) / np.sqrt(D)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bkgs,bskd->bkgd", p, vc[:, :keys]).reshape(B, H * D)
    return out, kc, vc


def test_decode_attention_kernel_source_on_cpu(tmp_path):
    """decode_attention.cu's two kernels compiled for the host against a float64 reference with the
    model's roundings: RoPE, the cache written at the new slot (clamped past the end) and nothing
    else, grouped query heads, splits without keys, every dtype of q and cache."""
    import subprocess

    import ml_dtypes

    types = ("float", "__half", "__nv_bfloat16")
    dispatch_src = "".join(f"  if (t == {t} && c == {c} && d == {d}) rc = attend<{types[t]}, {types[c]}, {d}>"
                           f"(B, S, H, KVH, splits, pos, in, out);\n"
                           for t, c, d in sorted({case[:3] for case in _ATTN_HOST_CASES}))
    exe = _host_harness(tmp_path, None, _ATTN_HOST_HARNESS.replace("DISPATCH", dispatch_src), "decode_attention.cu")
    np_types = (np.float32, np.float16, ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    for case in _ATTN_HOST_CASES:
        t, c, D, B, S, H, KVH, splits, pos = case
        qkv = rng.standard_normal((B, (H + 2 * KVH) * D)).astype(np.float32)
        kc, vc = (rng.standard_normal((B, S, KVH, D)).astype(np.float32) for _ in range(2))
        inv_freq = (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)
        (tmp_path / "in.bin").write_bytes(qkv.tobytes() + kc.tobytes() + vc.tobytes() + inv_freq.tobytes())
        proc = subprocess.run([str(exe), *map(str, case), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")])
        assert proc.returncode == 0, case
        got = np.fromfile(tmp_path / "out.bin", np.float32)
        out, k_new, v_new = np.split(got, [B * H * D, B * H * D + kc.size])
        ref_out, ref_k, ref_v = _attn_reference(qkv, kc, vc, inv_freq, pos, H, KVH, np_types[t], np_types[c])
        assert rel_err(out.reshape(B, H * D), ref_out) < (1e-6 if t == 0 else 1e-2), case
        k_new, v_new = k_new.reshape(kc.shape), v_new.reshape(vc.shape)
        slot = min(pos, S - 1)
        tol = 1e-6 if t == c == 0 else 2e-3  # float32 sin / cos against float64: a 16-bit rounding may flip
        assert rel_err(k_new[:, slot], ref_k[:, slot]) < tol, case
        np.testing.assert_array_equal(v_new[:, slot], ref_v[:, slot])
        others = np.arange(S) != slot  # untouched
        np.testing.assert_array_equal(k_new[:, others], ref_k[:, others])
        np.testing.assert_array_equal(v_new[:, others], ref_v[:, others])


def test_decode_attention_lowers_for_cuda_and_checks_its_input():
    qkv = jnp.ones((1, (8 + 2 * 2) * 64), jnp.float16)
    cache = jnp.zeros((1, 40, 2, 64), jnp.float16)
    inv_freq = jnp.ones((32,), jnp.float32)
    text = _lower_for_cuda(lambda q, k, v: cuda_ops.decode_attention(q, k, v, 5, inv_freq, heads=8, kv_heads=2,
                                                                     register=False), qkv, cache, cache)
    call = [line for line in text.splitlines() if "jaxquant_decode_attention" in line]
    assert call and "output_operand_aliases" in text
    with pytest.raises(ValueError, match="head size"):
        cuda_ops.decode_attention(jnp.ones((1, 12 * 32)), jnp.zeros((1, 4, 2, 32)), jnp.zeros((1, 4, 2, 32)), 0,
                                  jnp.ones((16,)), heads=8, kv_heads=2, register=False)
    with pytest.raises(ValueError, match="qkv must be"):
        cuda_ops.decode_attention(qkv[:, :-1], cache, cache, 0, inv_freq, heads=8, kv_heads=2, register=False)
    with pytest.raises(ValueError, match="at most 16"):
        cuda_ops.decode_attention(jnp.ones((1, 36 * 64)), jnp.zeros((1, 4, 1, 64)), jnp.zeros((1, 4, 1, 64)), 0,
                                  inv_freq, heads=34, kv_heads=1, register=False)
    assert cuda_ops.decode_attention_splits(1, 32, 300) * 32 >= 132  # short contexts still fill the GPU
    for batch, kv_heads, cache_len in ((1, 8, 5000), (8, 32, 33), (1, 1, 1)):
        splits = cuda_ops.decode_attention_splits(batch, kv_heads, cache_len)
        assert -(-cache_len // splits) <= cuda_ops.ATTENTION_MAX_KEYS_PER_SPLIT


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,d,dtype,cache_dtype", [
    (32, 32, 128, jnp.float16, jnp.float16),     # Llama-2-7B
    (64, 8, 128, jnp.bfloat16, jnp.float32),     # Llama-2-70B, a float32 cache (generate's default)
    (9, 3, 64, jnp.float32, jnp.float32),        # SmolLM2
])
def test_decode_attention_gpu(heads, kv_heads, d, dtype, cache_dtype):
    import ml_dtypes

    np_dtype = {jnp.float16: np.float16, jnp.bfloat16: ml_dtypes.bfloat16, jnp.float32: np.float32}
    rng = np.random.default_rng(11)
    B, S = 2, 300
    inv_freq = (1.0 / 10000 ** (np.arange(0, d, 2) / d)).astype(np.float32)
    step = jax.jit(functools.partial(cuda_ffi.decode_attention, heads=heads, kv_heads=kv_heads), donate_argnums=(1, 2))
    for pos in (0, 137, S - 1):
        qkv = rng.standard_normal((B, (heads + 2 * kv_heads) * d)).astype(np.float32)
        kc, vc = (rng.standard_normal((B, S, kv_heads, d)).astype(np.float32) for _ in range(2))
        out, k2, v2 = step(jnp.asarray(qkv, dtype), jnp.asarray(kc, cache_dtype), jnp.asarray(vc, cache_dtype),
                           jnp.int32(pos), jnp.asarray(inv_freq))
        ref, ref_k, ref_v = _attn_reference(qkv, kc, vc, inv_freq, pos, heads, kv_heads, np_dtype[dtype],
                                            np_dtype[cache_dtype])
        out = np.asarray(out.astype(jnp.float32))
        assert np.isfinite(out).all() and out.shape == (B, heads * d)
        assert rel_err(out, ref) < (1e-5 if dtype == jnp.float32 else 1e-2), pos
        others = np.arange(S) != pos
        np.testing.assert_array_equal(np.asarray(k2.astype(jnp.float32))[:, others], ref_k[:, others])
        np.testing.assert_array_equal(np.asarray(v2.astype(jnp.float32)), ref_v)
        assert rel_err(np.asarray(k2.astype(jnp.float32))[:, pos], ref_k[:, pos]) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [False, True])
def test_model_decode_steps_same_with_the_attention_kernel(monkeypatch, fuse):
    """A Llama's cached single-token steps: the same logits through the CUDA kernel and through XLA."""
    from jaxquant.model.fuse import fuse_linears
    from jaxquant.model.llama import decode_attention_kernel, init_cache
    from jaxquant.model.params import model_from_params
    from helpers import random_params, tiny_config

    cfg = tiny_config(head_dim=64, num_attention_heads=6, num_key_value_heads=2, hidden_size=128)
    model = model_from_params(cfg, random_params(cfg, seed=5))
    model = fuse_linears(model) if fuse else model
    assert decode_attention_kernel(model.config)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)

    def run():
        cache = init_cache(model.config, 2, 16, jnp.float32)
        _, cache = model(tokens[:, :4], cache, 0)
        out = []
        for i in range(4, 9):
            logits, cache = jax.jit(lambda t, c, p: model(t, c, p))(tokens[:, i:i + 1], cache, jnp.int32(i))
            out.append(np.asarray(logits))
        return np.stack(out)

    with jax.default_matmul_precision("float32"):  # XLA's default TF32 dots would differ by ~5e-4
        with_kernel = run()
        monkeypatch.setenv("JAXQUANT_DECODE_ATTENTION", "xla")
        assert not decode_attention_kernel(model.config)
        assert rel_err(with_kernel, run()) < 1e-5


_RHTC_HOST_HARNESS = r"""
// Runs rht_cluster.cu's block function on the CPU: the blocks of a row's cluster at once, one
// std::thread per CUDA thread; each block's shared memory a NaN-filled buffer that its peers reach
// through rhtc_peer_smem, the cluster barrier one std::barrier over all of them.
#include <cuda_runtime.h>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

static thread_local uint3 h_threadIdx;
static thread_local int h_rank;
static uint3 h_blockDim;
static std::vector<std::vector<float>> h_smem;  // per block
static std::barrier<>* h_cluster_bar = nullptr;
static std::vector<std::unique_ptr<std::barrier<>>> h_warp_bar;  // per warp of the cluster
static std::vector<float> h_shfl;
#define threadIdx h_threadIdx
#define blockDim h_blockDim
static float* rhtc_peer_smem(float* local, int rank) { return h_smem[rank].data() + (local - h_smem[h_rank].data()); }
static void rhtc_cluster_sync() { h_cluster_bar->arrive_and_wait(); }
static float __shfl_xor_sync(unsigned, float v, int m) {
  const int w = h_rank * static_cast<int>(h_blockDim.x / 32) + static_cast<int>(threadIdx.x / 32), l = threadIdx.x % 32;
  h_shfl[w * 32 + l] = v;
  h_warp_bar[w]->arrive_and_wait();
  const float r = h_shfl[w * 32 + (l ^ m)];
  h_warp_bar[w]->arrive_and_wait();
  return r;
}

#include "kernel_part.inc"

template <int TB>
void run_cluster(const RhtcArgs& a, int group, int64_t row, int threads) {
  const int c = a.blocks, cols = 32 * TB / (a.groups * c);
  h_smem.assign(c, std::vector<float>((a.a_rows + 7) / 8 * 8 * cols, NAN));
  h_warp_bar.clear();
  for (int w = 0; w < c * threads / 32; ++w) h_warp_bar.push_back(std::make_unique<std::barrier<>>(32));
  h_shfl.assign(c * threads, NAN);
  std::barrier<> bar(c * threads);
  h_cluster_bar = &bar;
  std::vector<std::thread> ts;
  for (int b = 0; b < c; ++b)
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&a, b, t, group, row] {
        h_threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
        h_rank = b;
        rht_cluster_block<TB>(a, h_smem[b].data(), b, group, row);
      });
  for (auto& th : ts) th.join();
}

// argv: rows A B parts has_signs blocks groups threads io in out; in: x f32 [parts, rows, A * B]
// ([rows, 2 A B] with io 1), bits u32 [A, words], signs f32 [A * B]; io 1 (swiglu input): then the
// gate and up scales f32 [2] and the input signs f32 [A * B]; io 2, 3, 4 (a residual added, y and it
// in float32, fp16, bf16): then the output scales f32 [3], their splits i32 [2] and the residual
// [rows, A * B] in that dtype.
int main(int argc, char** argv) {
  if (argc != 12) return 1;
  const int rows = atoi(argv[1]), ar = atoi(argv[2]), b = atoi(argv[3]), parts = atoi(argv[4]);
  const int after = atoi(argv[5]), blocks = atoi(argv[6]), groups = atoi(argv[7]), threads = atoi(argv[8]);
  const int io = atoi(argv[9]), words = (ar + 31) / 32, n = ar * b, dtype = io >= 2 ? io - 2 : 0;
  const size_t esize = dtype ? 2 : 4;
  if (b % (blocks * groups) || (b / (blocks * groups)) % 4) return 4;  // as launch_rht_cluster refuses
  std::vector<float> x(size_t(io == 1 ? 2 : parts) * rows * n), sg(n), gu(2), in_signs(n), os(3);
  int splits[2];
  std::vector<char> y(size_t(rows) * n * esize, 0x7f), resid(size_t(rows) * n * esize);
  std::vector<uint32_t> bits(size_t(ar) * words);
  FILE* in = fopen(argv[10], "rb");
  if (!in || fread(x.data(), 4, x.size(), in) != x.size() || fread(bits.data(), 4, bits.size(), in) != bits.size() ||
      fread(sg.data(), 4, sg.size(), in) != sg.size()) return 2;
  if (io == 1 && (fread(gu.data(), 4, 2, in) != 2 || fread(in_signs.data(), 4, n, in) != size_t(n))) return 2;
  if (io >= 2 && (fread(os.data(), 4, 3, in) != 3 || fread(splits, 4, 2, in) != 2 ||
                  fread(resid.data(), 1, resid.size(), in) != resid.size())) return 2;
  fclose(in);
  RhtcIo rio;
  if (io == 1) {
    rio.swiglu = true;
    rio.in_signs = in_signs.data();
    rio.gate_up_scale = gu.data();
  } else if (io >= 2) {
    rio.out_scale = os.data();
    rio.scale_split[0] = splits[0];
    rio.scale_split[1] = splits[1];
    rio.resid = resid.data();
    rio.dtype = dtype;
  }
  RhtcArgs a{x.data(), bits.data(), after ? sg.data() : nullptr, y.data(), ar, words, parts, blocks, groups, rows,
             1.0f / std::sqrt(static_cast<float>(n)), rio};
  h_blockDim = uint3{static_cast<unsigned>(threads), 1, 1};
  for (int r = 0; r < rows; ++r)
    for (int g = 0; g < groups; ++g) {
      switch (b) {
        case 32: run_cluster<1>(a, g, r, threads); break;
        case 64: run_cluster<2>(a, g, r, threads); break;
        case 128: run_cluster<4>(a, g, r, threads); break;
        case 256: run_cluster<8>(a, g, r, threads); break;
        case 512: run_cluster<16>(a, g, r, threads); break;
        case 1024: run_cluster<32>(a, g, r, threads); break;
        default: return 3;
      }
    }
  FILE* out = fopen(argv[11], "wb");
  fwrite(y.data(), 1, y.size(), out);
  fclose(out);
  return 0;
}
"""


def _rht_reference(x: np.ndarray, factor: np.ndarray, signs: np.ndarray, inverse: bool) -> np.ndarray:
    """float64 (x * s) @ (factor (x) H_B) / sqrt(n), or (x @ (factor (x) H_B).T) * s / sqrt(n), one
    factor at a time."""
    a = factor.shape[0]
    n = x.shape[-1]
    h = jq_hadamard.hadamard_matrix(n // a)
    v = x.astype(np.float64).reshape(-1, a, n // a)
    if not inverse:
        v = v * signs.reshape(a, -1)
    y = np.einsum("rij,ia,jb->rab", v, factor.T if inverse else factor, h).reshape(x.shape) / np.sqrt(n)
    return y * signs if inverse else y


def test_rht_cluster_kernel_source_on_cpu(tmp_path):
    """rht_cluster.cu's block function compiled for the host, every block of a cluster as threads at
    once, against float64: rows of B = 32 to 1024 (the register stages and every shuffle), A from 12
    to 224 (partial and several sign words), 1 to 18 summed parts, forward and inverse, clusters of 4
    to 16 blocks with fewer rows than warps and more, 1 to 8 clusters per row."""
    import subprocess

    exe = _host_harness(tmp_path, None, _RHTC_HOST_HARNESS, "rht_cluster.cu")
    rng = np.random.default_rng(15)
    for rows, n, parts, inverse, blocks, groups, threads, factor in [
            (1, 4096, 3, True, 8, 2, 64, None), (2, 11008, 1, False, 16, 1, 64, None),
            (1, 22016, 2, True, 8, 2, 128, None), (1, 28672, 7, False, 16, 1, 32, None),
            (1, 640, 2, False, 4, 2, 128, None), (1, 12288, 1, True, 4, 8, 64, jq_hadamard.hadamard_factor(12)),
            (1, 8192, 18, True, 8, 2, 64, jq_hadamard.hadamard_matrix(64)),
            (1, 28672, 6, True, 8, 4, 64, np.kron(jq_hadamard.hadamard_factor(28), jq_hadamard.hadamard_matrix(4))),
            (1, 7168, 3, False, 4, 4, 64, jq_hadamard.hadamard_factor(28)),
            (1, 28672, 5, True, 16, 1, 64, np.kron(jq_hadamard.hadamard_factor(28), jq_hadamard.hadamard_matrix(8)))]:
        factor = dispatch.cluster_factor(n) if factor is None else factor
        a = factor.shape[0]
        x = rng.standard_normal((parts, rows, n)).astype(np.float32)
        s = rng.choice(np.array([-1.0, 1.0], np.float32), n)
        bits = cuda_ops.sign_bits(factor.T if inverse else factor)
        xin = x if inverse else x * s  # a forward transform's signs go on x first (rht_cluster does that)
        (tmp_path / "in.bin").write_bytes(xin.tobytes() + bits.tobytes() + s.tobytes())
        args = [rows, a, n // a, parts, int(inverse), blocks, groups, threads, 0, tmp_path / "in.bin",
                tmp_path / "out.bin"]
        assert subprocess.run([str(exe), *map(str, args)]).returncode == 0, args
        y = np.fromfile(tmp_path / "out.bin", np.float32).reshape(rows, n)
        assert rel_err(y, _rht_reference(x.sum(0), factor, s, inverse)) < 1e-6, args


def test_rht_cluster_io_modes_on_cpu(tmp_path):
    """rht_cluster's io modes on the host (as above): a forward transform of silu(g gate) * (u up) *
    in_signs read from a fused [gate, up] row (an MLP's down-proj input), and an inverse transform
    scaled (one scale, or one per part of a fused linear), added to a residual and stored in the
    residual's dtype (float32, fp16, bf16)."""
    import subprocess

    exe = _host_harness(tmp_path, None, _RHTC_HOST_HARNESS, "rht_cluster.cu")
    rng = np.random.default_rng(17)
    none = 1 << 30
    for rows, n, parts, io, blocks, groups, threads, splits in [
            (1, 11008, 1, 1, 16, 1, 64, None), (2, 640, 1, 1, 4, 2, 128, None),
            (1, 4096, 3, 2, 8, 2, 64, (none, none)),
            (1, 4096, 6, 3, 4, 4, 64, (none, none)), (2, 640, 2, 4, 4, 2, 128, (none, none)),
            (1, 6144, 2, 3, 16, 2, 64, (4096, 5120)), (1, 4096, 1, 4, 8, 2, 64, (1024, none))]:
        factor = dispatch.cluster_factor(n)
        a, inverse = factor.shape[0], io >= 2
        s = rng.choice(np.array([-1.0, 1.0], np.float32), n)
        bits = cuda_ops.sign_bits(factor.T if inverse else factor)
        args = [rows, a, n // a, parts, int(inverse), blocks, groups, threads, io, tmp_path / "in.bin",
                tmp_path / "out.bin"]
        if io == 1:
            gate_up = (3 * rng.standard_normal((rows, 2 * n))).astype(np.float32)
            scales = rng.uniform(0.5, 2.0, 2).astype(np.float32)
            in_signs = rng.choice(np.array([-1.0, 1.0], np.float32), n)
            (tmp_path / "in.bin").write_bytes(gate_up.tobytes() + bits.tobytes() + s.tobytes() + scales.tobytes()
                                              + in_signs.tobytes())
            assert subprocess.run([str(exe), *map(str, args)]).returncode == 0, args
            g, u = gate_up[:, :n].astype(np.float64) * scales[0], gate_up[:, n:].astype(np.float64) * scales[1]
            h = g / (1 + np.exp(-g)) * u
            y = np.fromfile(tmp_path / "out.bin", np.float32).reshape(rows, n)
            assert rel_err(y, _rht_reference(h, factor, in_signs, False)) < 1e-6, args
            continue
        dtype = {2: np.float32, 3: np.float16, 4: jnp.bfloat16}[io]
        x = rng.standard_normal((parts, rows, n)).astype(np.float32)
        out_scale = rng.uniform(0.5, 2.0, 3).astype(np.float32)
        resid = np.asarray(jnp.asarray(5 * rng.standard_normal((rows, n)), dtype))
        (tmp_path / "in.bin").write_bytes(x.tobytes() + bits.tobytes() + s.tobytes() + out_scale.tobytes()
                                          + np.asarray(splits, np.int32).tobytes() + resid.tobytes())
        assert subprocess.run([str(exe), *map(str, args)]).returncode == 0, args
        y = np.frombuffer((tmp_path / "out.bin").read_bytes(), dtype).reshape(rows, n).astype(np.float64)
        row_scale = out_scale[(np.arange(n) >= splits[0]).astype(int) + (np.arange(n) >= splits[1])]
        ref = resid.astype(np.float64) + row_scale * _rht_reference(x.sum(0), factor, s, True)
        assert rel_err(y, ref) < {2: 1e-6, 3: 1e-3, 4: 8e-3}[io], args


def _decode_kernel_code_sizes(source: str, mangled: list[str]) -> list[int]:
    """Machine-code bytes of the one kernel of ``source`` whose mangled name contains each entry
    (skips without nvcc)."""
    if cuda_build.nvcc_path() is None:
        pytest.skip("nvcc not found: the CUDA sources cannot be compiled on this machine")
    sizes = cuda_build.kernel_code_sizes(source)
    out = []
    for part in mangled:
        (size,) = [v for k, v in sizes.items() if part in k]
        out.append(size)
    return out


def test_rht_cluster_code_stays_small():
    """In a decode step the weights evict kernel code from L2 between layers: with its factor loop
    unrolled over every sign word the 11008-wide instantiation was 89.5 KB and took 13.4 us in the step
    against 6.1 once rolled (22.5 KB; H100, session 15). The decode widths' instantiations (B = 64, 128)
    stay under 32 KB."""
    for tb, size in zip((2, 4), _decode_kernel_code_sizes("rht_cluster.cu", ["rht_cluster_kernelILi2E",
                                                                            "rht_cluster_kernelILi4E"])):
        assert 4096 < size < 32 * 1024, (tb, size)


def test_e8p_decode_kernel_code_stays_small():
    """The batch-1 E8P / RVQ4 kernel runs four times per decode layer, after the weights have evicted
    its code from L2 (see the test above): its decode instantiations (2 rows per warp, one group in
    flight, blocks of up to 256 threads; 2 and 4 bits) stay under 32 KB of machine code (28.4 KB at 2
    bits in session 16, 29.1 KB in session 18)."""
    names = [f"e8p_matvec_xs_kernelILi2ELi{st}ELi1ELi256ELi1EE" for st in (1, 2)]
    for st, size in zip((1, 2), _decode_kernel_code_sizes("jaxquant_kernels.cu", names)):
        assert 4096 < size < 32 * 1024, (st, size)


def test_cluster_factor_is_the_transform():
    """factor (x) H_B is exactly hadamard_matrix(n) for K * 2^p widths, and the float64 reference
    above agrees with hadamard.rht and rht_inverse."""
    rng = np.random.default_rng(3)
    for n in (768, 3072, 11008, 10240):
        d = dispatch.cluster_factor(n)
        np.testing.assert_array_equal(np.kron(d, jq_hadamard.hadamard_matrix(n // d.shape[0])),
                                      jq_hadamard.hadamard_matrix(n))
    x = rng.standard_normal((2, 3072)).astype(np.float32)
    s = rng.choice(np.array([-1.0, 1.0], np.float32), 3072)
    d = dispatch.cluster_factor(3072)
    for inverse, fn in ((False, jq_hadamard.rht), (True, jq_hadamard.rht_inverse)):
        assert rel_err(_rht_reference(x, d, s, inverse), np.asarray(fn(x, s))) < 1e-6
    assert dispatch.cluster_factor(59 * 2**7) is None  # K = 59: a random orthogonal factor, not +-1


def test_rht_fast_lowers_to_the_cluster_kernel_for_few_rows(monkeypatch):
    monkeypatch.setattr(cuda_build, "load", lambda: None)  # lower only: nothing is registered here
    s = jnp.ones((11008,), jnp.float32)
    for inverse, sum_parts, shape in ((False, False, (1, 11008)), (True, True, (3, 2, 11008))):
        text = _lower_for_cuda(lambda x: dispatch.rht_fast(x, s, inverse=inverse, sum_parts=sum_parts),
                               jnp.ones(shape, jnp.float32))
        assert "jaxquant_rht_cluster" in text and "dot_general" not in text
    text = _lower_for_cuda(lambda x: dispatch.rht_fast(x, s), jnp.ones((dispatch.RHT_CLUSTER_MAX_ROWS + 1, 11008)))
    assert "jaxquant_rht_cluster" not in text and "dot_general" in text
    with pytest.raises(ValueError, match="\\+-1 A x A factor"):
        cuda_ops.rht_cluster(jnp.ones((1, 96)), np.eye(3) * 0.5, jnp.ones((96,)), register=False)
    with pytest.raises(ValueError, match="signs"):
        cuda_ops.rht_cluster(jnp.ones((1, 96)), np.ones((3, 3)), jnp.ones((95,)), register=False)
    with pytest.raises(TypeError, match="float32"):
        cuda_ops.rht_cluster(jnp.ones((1, 96), jnp.float16), np.ones((3, 3)), jnp.ones((96,)), register=False)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4])
def test_e8p_linear_gpu(monkeypatch, bits, e8p_variant):
    """The one-call batch-1 QuIP# linear equals the three calls it replaces (the same kernels) and
    the reference, at the Llama-2-7B and -70B widths: x's RHT in the E8P kernel and on a cluster."""
    from jaxquant.formats import quip_sharp

    for i, (out, inp) in enumerate([(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (8192, 28672),
                                    (1536, 1536)]):
        qw = random_quip(jax.random.key(40 + i), out, inp, bits)
        x = jax.random.normal(jax.random.key(50 + i), (1, inp), jnp.bfloat16)
        ys = {}
        for one_call in (True, False):
            monkeypatch.setattr(dispatch, "E8P_LINEAR_ONE_CALL", one_call)
            jax.clear_caches()
            fn = jax.jit(lambda x, qw: quip_sharp._matmul_kernel(x.astype(jnp.float32), qw, kernel="cuda"))
            assert ("jaxquant_e8p_linear" in fn.lower(x, qw).as_text()) == one_call, (out, inp)
            ys[one_call] = np.asarray(fn(x, qw))
        ref = np.asarray(qw.matmul(x.astype(jnp.float32), backend="reference"))
        assert np.isfinite(ys[True]).all() and rel_err(ys[True], ys[False]) < 1e-6, (out, inp)
        assert rel_err(ys[True], ref) < 4e-3, (out, inp)


@pytest.mark.gpu
def test_quip_normed_matmul_gpu(e8p_variant):
    """The E8P kernel's RMSNorm: ``normed_matmul`` against ``matmul(rms_norm(x))`` (the unfused
    decode path, which rounds the normalized x to its dtype) for fp16, bf16 and float32 activations,
    at Llama-2-7B widths, 2 and 4 bits."""
    from jaxquant.model.llama import rms_norm

    for i, (out, inp, bits, dtype) in enumerate([(12288, 4096, 2, jnp.float16), (22016, 4096, 2, jnp.bfloat16),
                                                 (4096, 4096, 4, jnp.float16), (4096, 8192, 2, jnp.float32)]):
        qw = random_quip(jax.random.key(60 + i), out, inp, bits).for_serving()
        x = (3 * jax.random.normal(jax.random.key(70 + i), (1, 1, inp), jnp.float32)).astype(dtype)
        w = jax.random.uniform(jax.random.key(80 + i), (inp,), jnp.float32, 0.5, 2.0)
        y = qw.normed_matmul(x, w, 1e-5)
        assert y is not None and y.shape == (1, 1, out) and y.dtype == dtype, (out, inp)
        ref = qw.matmul(rms_norm(x, w, 1e-5))
        tol = TOL[jnp.bfloat16] if dtype == jnp.bfloat16 else 2e-3  # the reference rounds the norm to bf16
        assert np.isfinite(np.asarray(y, np.float32)).all() and rel_err(y, ref) < tol, (out, inp, dtype)
        dense = np.asarray(rms_norm(x, w, 1e-5), np.float64).reshape(1, inp) @ np.asarray(qw.dequantize(), np.float64).T
        assert rel_err(np.asarray(y, np.float64).reshape(1, out), dense) < 1e-2, (out, inp, dtype)


@pytest.mark.gpu
def test_quip_add_and_mlp_block_gpu(e8p_variant):
    """``matmul_add`` against ``residual + matmul`` and ``swiglu_block`` against the unfused block
    (which rounds gate, up and their product to x's dtype) at Llama-2-7B / Llama-3-8B / SmolLM2
    widths, 2 and 4 bits, fp16 / bf16 / float32 activations; a fused qkv's per-part row scales."""
    from jaxquant.formats import quip_sharp
    from jaxquant.model.llama import rms_norm

    for i, (d, f, bits, dtype) in enumerate([(4096, 11008, 2, jnp.float16), (4096, 14336, 2, jnp.bfloat16),
                                             (4096, 11008, 4, jnp.float32), (2048, 5632, 2, jnp.bfloat16)]):
        gate_up = random_quip_gate_up(jax.random.key(90 + i), f, d, bits).for_serving()
        down = random_quip(jax.random.key(95 + i), d, f, bits).for_serving()
        x = (3 * jax.random.normal(jax.random.key(100 + i), (1, 1, d), jnp.float32)).astype(dtype)
        w = jax.random.uniform(jax.random.key(105 + i), (d,), jnp.float32, 0.5, 2.0)
        y = gate_up.swiglu_block(down, x, w, 1e-5)
        assert y is not None and y.shape == x.shape and y.dtype == dtype, (d, f)
        gate, up = jnp.split(gate_up.matmul(rms_norm(x, w, 1e-5)), 2, axis=-1)
        ref = x + down.matmul(jax.nn.silu(gate) * up)
        tol = 2e-3 if dtype == jnp.float32 else 1e-2  # the reference rounds four times to 16 bits
        assert np.isfinite(np.asarray(y, np.float32)).all() and rel_err(y, ref) < tol, (d, f, bits, dtype)
        o = random_quip(jax.random.key(110 + i), d, d, bits).for_serving()
        z = o.matmul_add(x, x)
        assert z is not None and z.dtype == dtype, (d, bits)
        assert rel_err(z, x + o.matmul(x)) < (1e-5 if dtype == jnp.float32 else TOL[dtype]), (d, bits, dtype)
        # a fused qkv: its three row scales and x's dtype applied as the inverse transform stores
        qkv = dataclasses.replace(random_quip(jax.random.key(115 + i), 3 * d // 2, d, bits),
                                  parts=(d, d // 4, d // 4), scale=jnp.array([0.02, 0.03, 0.05])).for_serving()
        y = qkv.matmul(x)
        tol = 2 * TOL[jnp.bfloat16] if dtype == jnp.bfloat16 else 2e-3  # the kernel's x and sums are fp16
        assert y.dtype == dtype and rel_err(y, quip_sharp._matmul(x, qkv)) < tol, (d, bits, dtype)


@pytest.mark.gpu
def test_rht_cluster_gpu():
    """rht_fast through the cluster kernel (decode rows) against float64 at the Llama widths, with
    parts summed."""
    rng = np.random.default_rng(8)
    for rows, n, parts in [(1, 4096, 1), (1, 4096, 6), (1, 11008, 1), (2, 22016, 3), (1, 12288, 2),
                           (8, 11008, 1), (1, 28672, 2), (4, 14336, 1), (1, 8192, 1), (1, 8192, 14), (1, 128, 1)]:
        x = jnp.asarray(rng.standard_normal((parts, rows, n)), jnp.float32)
        s = jnp.asarray(rng.choice([-1.0, 1.0], n), jnp.float32)
        assert dispatch.cluster_factor(n) is not None, n
        for inverse in (False, True):
            fn = jax.jit(functools.partial(dispatch.rht_fast, inverse=inverse, sum_parts=True))
            assert "jaxquant_rht_cluster" in fn.lower(x, s).as_text(), n
            y = np.asarray(fn(x, s))
            ref = _rht_reference(np.asarray(x).sum(0), dispatch.cluster_factor(n), np.asarray(s), inverse)
            assert np.isfinite(y).all() and rel_err(y, ref) < 1e-6, (rows, n, parts, inverse)
