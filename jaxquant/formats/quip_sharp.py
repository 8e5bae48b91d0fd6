"""QuIP# format (Tseng et al. 2024): E8 lattice codes of the RHT-rotated weight.

The weight is stored as ``Ŵ = scale · diag(SV) A_m Q A_nᵀ diag(SU)`` where ``A`` is the
randomized-Hadamard factor of ``jaxquant.hadamard`` and ``Q [out, in]`` holds one 8-dimensional
codeword per 8 consecutive inputs of a row, as ``bits`` bytes (``codes``, uint8
``[out, in / 8, bits]``): bytes 0-1 the E8P12 code (little-endian, layout in
``jaxquant.codebooks.e8p``); for 3 bits byte 2 the E8 1-bit residual index; for 4 bits bytes
2-3 the residual E8P12 code. So the codes take exactly ``bits`` bits per weight, in one array.
SU / SV are float16 so that fine-tuning can make them real-valued.

``matmul`` never forms the dense W: ``y = SV ⊙ A_m (scale·Q) A_nᵀ (SU ⊙ x)`` is two fast
Hadamard transforms around one product with the decoded Q.

Fused weights (q/k/v or gate/up quantized as one, QuIP# §5): the output rows are ``parts``
consecutive groups, each normalized by its own RMS before the rotation; ``scale`` then holds one
factor per part (the common Wscale times that part's RMS), applied after the inverse RHT.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxquant import hadamard
from jaxquant.codebooks import e8p
from jaxquant.formats.base import QuantizedWeight, quantized_format, static


@quantized_format("quip#")
class QuIPSharpQuantized(QuantizedWeight):
    codes: jax.Array  # uint8 [out, in / 8, bits]: per 8 weights, the stage codes' bytes
    SU: jax.Array  # float16 [in]
    SV: jax.Array  # float16 [out]
    scale: jax.Array  # float32 [len(parts)]: Wscale (times each part's RMS when fused)
    shape: tuple[int, int] = static()
    bits: int = static()
    codebook: str = static()  # e8p | e8p-rvq3 | e8p-rvq4
    had_seed: int = static(0)  # seed of the random-orthogonal factor, for widths that need one
    parts: tuple[int, ...] = static(())  # output rows per fused part; () means one part
    serving_float32 = ("SU", "SV")

    def row_scale(self) -> jax.Array:
        """Per-output-row scale ``[out]`` (float32), or ``[1]`` when unfused."""
        scale = self.scale.astype(jnp.float32)
        if len(self.parts) <= 1:
            return scale
        # static parts: broadcasts that fuse into the consumer (jnp.repeat with array counts costs a
        # cumsum and a scatter, five kernels per fused linear per decode step)
        return jnp.concatenate([jnp.broadcast_to(scale[i], (p,)) for i, p in enumerate(self.parts)])

    def part_slices(self) -> list[slice]:
        """The output rows of each fused part, in order."""
        bounds = [0]
        for p in self.parts or (self.shape[0],):
            bounds.append(bounds[-1] + p)
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def stage_codes(self) -> tuple[jax.Array, ...]:
        """Per-stage codes ``[out, in / 8]``: E8P12 uint16, then the residual's (uint8 or uint16)."""
        return unpack_codes(self.codes)

    def rotated(self) -> jax.Array:
        """``Q`` ``[out, in]`` float32: the decoded codewords, in the rotated and scaled basis."""
        q = e8p.get_codebook(self.codebook).decode(self.stage_codes())  # [out, in / 8, 8]
        return q.reshape(self.shape)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        w = hadamard.rht_inverse(self.rotated(), self.SU.astype(jnp.float32), seed=self.had_seed)
        w = hadamard.rht_inverse(w.T, self.SV.astype(jnp.float32), seed=self.had_seed).T
        return (w * self.row_scale()[:, None]).astype(dtype)

    def matmul(self, x: jax.Array, backend: str = "auto") -> jax.Array:
        """``x @ W.T`` through ``reference`` (jnp), ``cuda`` (the E8P / RVQ4 decode-matvec between
        the two Hadamard transforms), ``pallas`` (its Pallas version, which also serves 3-bit RVQ3;
        interpret mode off the GPU) or ``auto`` (the CUDA kernel on a GPU for 1-16 rows of x; 3-bit
        codes take the reference until the tuning table measures the Pallas kernel faster)."""
        from jaxquant.formats import dispatch

        choice = dispatch.vq_choice(self.format_name, kernel_issue(self, x, backend), x, backend,
                                    tuned=self.codebook.replace("e8p-", ""), bits=self.bits,
                                    pallas_issue=kernel_issue(self, x, "pallas"))
        if choice == "cuda":
            return _matmul_kernel(x, self, "cuda")
        if choice == "pallas":
            return _matmul_kernel(x, self, "pallas")
        return _matmul(x, self)

    def _one_call(self, x: jax.Array, backend: str) -> bool:
        """Whether ``x @ W.T`` takes ``cuda_ffi.e8p_linear``: one row on the CUDA backend."""
        from jaxquant.formats import dispatch

        return (backend in ("auto", "cuda") and math.prod(x.shape[:-1]) == 1 and dispatch.E8P_LINEAR_ONE_CALL
                and dispatch.vq_choice(self.format_name, kernel_issue(self, x, backend), x, backend,
                                       tuned=self.codebook.replace("e8p-", ""), bits=self.bits) == "cuda"
                and bool(dispatch.e8p_linear_factors(self.shape[1], self.shape[0], self.bits, self.had_seed)))

    def normed_matmul(self, x: jax.Array, norm_weight: jax.Array, eps: float,
                      backend: str = "auto") -> jax.Array | None:
        """One row of x on the CUDA backend whose E8P kernel rotates x itself (a power-of-two
        width): the kernel RMS-normalizes x too (``cuda_ffi.e8p_linear``); else None."""
        from jaxquant.formats import dispatch

        if not (dispatch.E8P_LINEAR_NORM and self._one_call(x, backend)):
            return None
        if dispatch.e8p_linear_factors(self.shape[1], self.shape[0], self.bits, self.had_seed)[0] is not None:
            return None
        return _normed_matmul_kernel(x, self, norm_weight, eps)

    def matmul_add(self, x: jax.Array, residual: jax.Array, backend: str = "auto") -> jax.Array | None:
        """One row of x on the CUDA backend, one part: the one-call linear adds the residual as its
        last kernel stores (``cuda_ffi.e8p_linear(residual=...)``); else None."""
        from jaxquant.formats import dispatch

        if not (dispatch.E8P_ADD_RESIDUAL and len(self.parts) <= 1 and self._one_call(x, backend)):
            return None
        return _matmul_add_kernel(x, self, residual)

    def swiglu_block(self, down, x: jax.Array, norm_weight: jax.Array, eps: float,
                     backend: str = "auto") -> jax.Array | None:
        """One row on the CUDA backend with this weight the fused [gate; up] (two equal parts) and
        ``down`` QuIP# of the same codebook: the whole block is ``cuda_ffi.e8p_mlp``; else None."""
        from jaxquant.formats import dispatch

        if not (dispatch.E8P_MLP_ONE_CALL and isinstance(down, QuIPSharpQuantized) and down.codebook == self.codebook
                and len(self.parts) == 2 and self.parts[0] == self.parts[1] and len(down.parts) <= 1
                and down.shape == (self.shape[1], self.parts[0]) and self._one_call(x, backend)
                and down._one_call(jax.ShapeDtypeStruct((1, down.shape[1]), x.dtype), backend)):
            return None
        if (dispatch.e8p_linear_factors(self.shape[1], self.shape[0], self.bits, self.had_seed)[0] is not None
                or dispatch.cluster_factor(down.shape[1], down.had_seed) is None):
            return None
        return _swiglu_block_kernel(x, self, down, norm_weight, eps)


def kernel_issue(qw: "QuIPSharpQuantized", x: jax.Array, backend: str = "cuda") -> str | None:
    """Why the CUDA (or, with ``backend="pallas"``, the Pallas) kernel cannot compute ``x @ qw.T``
    (None when it can). 3-bit codes (e8p-rvq3) have the Pallas kernel only."""
    served = ("e8p", "e8p-rvq3", "e8p-rvq4") if backend == "pallas" else ("e8p", "e8p-rvq4")
    if qw.codebook not in served:
        kind = "Pallas" if backend == "pallas" else "CUDA"
        return f"codebook {qw.codebook} has no {kind} kernel ({', '.join(served)} have)"
    unit = 8 if backend == "pallas" else 64 if qw.bits == 2 else 32
    if qw.shape[1] % unit:
        return f"in = {qw.shape[1]} is not a multiple of {unit}"
    if x.shape[-1] != qw.shape[1]:
        return f"x has {x.shape[-1]} inputs, the weight {qw.shape[1]}"
    return None


@functools.cache
def _abs_table():
    import cuda_ffi

    return cuda_ffi.e8p_abs_table(e8p.e8p_source_set())


@functools.cache
def _pallas_table():
    import pallas_kernels

    return pallas_kernels.e8p_table(e8p.e8p_source_set())


@functools.partial(jax.jit, static_argnames="kernel")
def _matmul_kernel(x, qw: QuIPSharpQuantized, kernel: str):
    """The decode-matvec of ``kernel`` ("cuda" or "pallas") between that backend's Hadamard transforms."""
    from jaxquant.formats import dispatch

    resid = e8p.get_codebook(qw.codebook).resid_scale or 1.0
    x32 = x.astype(jnp.float32)
    if kernel == "pallas":
        import pallas_kernels

        xr = dispatch.rht_fast(x32, qw.SU, seed=qw.had_seed, kernel=kernel)
        resid_table = jnp.asarray(e8p.e8_onebit_codebook()) if qw.bits == 3 else None
        y = pallas_kernels.e8p_product(xr, qw.codes, _pallas_table(), bits=qw.bits, resid_scale=resid,
                                       resid_table=resid_table, interpret=not dispatch.on_gpu())
    else:
        import cuda_ffi

        one_row = math.prod(x.shape[:-1]) == 1
        factors = dispatch.e8p_linear_factors(qw.shape[1], qw.shape[0], qw.bits, qw.had_seed) if one_row else None
        if factors and dispatch.E8P_LINEAR_ONE_CALL:
            return _one_call(x, qw, factors)
        # x-stationary at batch 1 (14% faster 7B decode on an H100): where the width allows it also
        # makes x's RHT, and its per-chunk partial sums are added by the inverse transform's kernel
        # as it loads them (two launches fewer)
        variant = dispatch.E8P_BATCH1_VARIANT
        in_kernel = one_row and cuda_ffi.e8p_xs_rht_fits(qw.shape[1], qw.bits, variant)
        xr = x32 if in_kernel else dispatch.rht_fast(x32, qw.SU, seed=qw.had_seed, kernel=kernel)
        y = cuda_ffi.e8p_matvec(xr, qw.codes, _abs_table(), bits=qw.bits, resid_scale=resid, variant=variant,
                                keep_parts=True, su=qw.SU if in_kernel else None)
    y = dispatch.rht_fast(y, qw.SV, seed=qw.had_seed, inverse=True, kernel=kernel, sum_parts=kernel == "cuda")
    return (y * qw.row_scale()).astype(x.dtype)


def _launch() -> dict:
    """The E8P kernel's launch knobs for ``cuda_ffi.e8p_linear`` / ``e8p_mlp`` (``dispatch.E8P_LINEAR_LAUNCH``
    and ``E8P_BATCH1_VARIANT``)."""
    from jaxquant.formats import dispatch

    return dict(zip(("rows_per_warp", "warps", "prefetch"), dispatch.E8P_LINEAR_LAUNCH),
                variant=dispatch.E8P_BATCH1_VARIANT)


def _one_call(x, qw: QuIPSharpQuantized, factors, norm_weight=None, eps: float = 0.0, residual=None):
    """The batch-1 CUDA linear as one ``cuda_ffi.e8p_linear`` call (``factors`` from
    ``dispatch.e8p_linear_factors``), x RMS-normalized first by its E8P kernel with ``norm_weight``,
    ``residual`` (one part only) added as its last kernel stores."""
    import cuda_ffi

    # the row scales and x's dtype applied as the last kernel stores (a fused linear's up to 3 parts)
    in_store = len(qw.parts) <= 3 and all(p % 4 == 0 for p in qw.parts)
    y = cuda_ffi.e8p_linear(x, qw.codes, _abs_table(), qw.SU, qw.SV, factors[1], bits=qw.bits,
                            resid_scale=e8p.get_codebook(qw.codebook).resid_scale or 1.0, in_factor=factors[0],
                            norm_weight=norm_weight, norm_eps=eps, residual=residual,
                            **(dict(out_scale=qw.scale, part_rows=qw.parts, out_dtype=x.dtype) if in_store else {}),
                            **_launch())
    return y if in_store else (y * qw.row_scale()).astype(x.dtype)


@functools.partial(jax.jit, static_argnames="eps")
def _normed_matmul_kernel(x, qw: QuIPSharpQuantized, norm_weight, eps: float):
    from jaxquant.formats import dispatch

    return _one_call(x, qw, dispatch.e8p_linear_factors(qw.shape[1], qw.shape[0], qw.bits, qw.had_seed),
                     norm_weight, eps)


@jax.jit
def _matmul_add_kernel(x, qw: QuIPSharpQuantized, residual):
    from jaxquant.formats import dispatch

    return _one_call(x, qw, dispatch.e8p_linear_factors(qw.shape[1], qw.shape[0], qw.bits, qw.had_seed),
                     residual=residual)


@functools.partial(jax.jit, static_argnames="eps")
def _swiglu_block_kernel(x, gate_up: QuIPSharpQuantized, down: QuIPSharpQuantized, norm_weight, eps: float):
    import cuda_ffi
    from jaxquant.formats import dispatch

    weights = [dict(codes=w.codes, su=w.SU, sv=w.SV, scale=w.scale,
                    out_factor=dispatch.e8p_linear_factors(w.shape[1], w.shape[0], w.bits, w.had_seed)[1])
               for w in (gate_up, down)]
    weights[1]["in_factor"] = dispatch.cluster_factor(down.shape[1], down.had_seed)
    return cuda_ffi.e8p_mlp(x, norm_weight, _abs_table(), *weights, bits=gate_up.bits,
                            resid_scale=e8p.get_codebook(gate_up.codebook).resid_scale or 1.0, norm_eps=eps,
                            **_launch())


@jax.jit
def _matmul(x, qw: QuIPSharpQuantized):
    xr = hadamard.rht(x.astype(jnp.float32), qw.SU.astype(jnp.float32), seed=qw.had_seed)
    y = jnp.matmul(xr, qw.rotated().T, precision=jax.lax.Precision.HIGHEST)
    y = hadamard.rht_inverse(y, qw.SV.astype(jnp.float32), seed=qw.had_seed)
    return (y * qw.row_scale()).astype(x.dtype)


def pack_codes(stages: tuple[jax.Array, ...]) -> jax.Array:
    """Stage codes ``[..., g]`` (uint16 E8P, then uint8 or uint16) -> bytes ``[..., g, bits]``."""
    out = []
    for c in stages:
        wide = jnp.dtype(c.dtype).itemsize == 2
        c = c.astype(jnp.uint32)
        out += [c & 0xFF, c >> 8] if wide else [c]
    return jnp.stack(out, axis=-1).astype(jnp.uint8)


def unpack_codes(codes: jax.Array) -> tuple[jax.Array, ...]:
    """Inverse of ``pack_codes`` for 2, 3 or 4 bytes per group."""
    c = codes.astype(jnp.uint16)
    first = c[..., 0] | (c[..., 1] << 8)
    nbytes = codes.shape[-1]
    if nbytes == 2:
        return (first,)
    if nbytes == 3:
        return first, codes[..., 2]
    return first, c[..., 2] | (c[..., 3] << 8)
