"""GPU kernels against their jnp references: the scalar decode-matvec (Pallas, CUDA) and the
Walsh-Hadamard transform (CUDA).

On CPU: Pallas in interpret mode, lowering of the Pallas (Triton) and FFI calls for the CUDA
platform, nvcc compilation of the CUDA sources, backend dispatch. On a GPU (``-m gpu``): every
kernel against the reference on fresh random inputs.
"""
from __future__ import annotations

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


def test_cuda_ffi_calls_lower_for_cuda():
    qw = random_scalar(jax.random.key(3), 128, 512, 3, 128)
    x = jnp.ones((2, 512), jnp.float16)
    text = _lower_for_cuda(lambda x: cuda_ops.scalar_matvec(
        x, qw.codes, qw.scale, qw.zero, bits=3, group_size=128, register=False), x)
    assert "jaxquant_scalar_matvec" in text
    signs = jnp.ones((1024,), jnp.float32)
    text = _lower_for_cuda(lambda x: cuda_ops.hadamard(x, signs, register=False), jnp.ones((4, 1024), jnp.bfloat16))
    assert "jaxquant_hadamard" in text


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
    for logn in (1, 3, 5, 6, 10, 13, 14, 15):
        n = 2**logn
        key = jax.random.key(logn)
        rows = max(1, 2**16 // n) + 3  # a partial last block
        x = jax.random.normal(key, (rows, n), jnp.float32).astype(dtype)
        signs = jq_hadamard.random_signs(jax.random.fold_in(key, 1), n)
        ref = jq_hadamard.rht(x.astype(jnp.float32), signs)
        assert rel_err(cuda_ffi.hadamard(x, signs), ref) < TOL[dtype], n
        back = cuda_ffi.hadamard(jnp.asarray(ref, dtype), signs, signs_after=True)
        assert rel_err(back, jq_hadamard.rht_inverse(ref, signs)) < TOL[dtype], n
        plain = cuda_ffi.hadamard(x, normalize=False)
        ref_plain = np.asarray(x, np.float64) @ jq_hadamard.hadamard_matrix(n) if n <= 1024 else None
        if ref_plain is not None:
            assert rel_err(plain, ref_plain) < TOL[dtype], n
