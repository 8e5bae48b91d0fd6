"""QuIP# format (Tseng et al. 2024): E8 lattice codes of the RHT-rotated weight.

The weight is stored as ``Ŵ = scale · diag(SV) A_m Q A_nᵀ diag(SU)`` where ``A`` is the
randomized-Hadamard factor of ``jaxquant.hadamard`` and ``Q [out, in]`` holds one 8-dimensional
codeword per 8 consecutive inputs of a row: an E8P12 code (``codes``, uint16) plus, for 3 and
4 bits, a residual code (``resid_codes``: E8 1-bit uint8, or E8P uint16) decoded as in
``jaxquant.codebooks.e8p``. SU / SV are float16 so that fine-tuning can make them real-valued.

``matmul`` never forms the dense W: ``y = SV ⊙ A_m (scale·Q) A_nᵀ (SU ⊙ x)`` is two fast
Hadamard transforms around one product with the decoded Q.

Fused weights (q/k/v or gate/up quantized as one, QuIP# §5): the output rows are ``parts``
consecutive groups, each normalized by its own RMS before the rotation; ``scale`` then holds one
factor per part (the common Wscale times that part's RMS), applied after the inverse RHT.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant import hadamard
from jaxquant.codebooks import e8p
from jaxquant.formats.base import QuantizedWeight, quantized_format, static


@quantized_format("quip#")
class QuIPSharpQuantized(QuantizedWeight):
    codes: jax.Array  # uint16 [out, in / 8]: E8P12 codes (layout in codebooks/e8p.py)
    resid_codes: jax.Array  # [out, in / 8] uint8 (3 bit) or uint16 (4 bit); [0] uint8 for 2 bit
    SU: jax.Array  # float16 [in]
    SV: jax.Array  # float16 [out]
    scale: jax.Array  # float32 [len(parts)]: Wscale (times each part's RMS when fused)
    shape: tuple[int, int] = static()
    bits: int = static()
    codebook: str = static()  # e8p | e8p-rvq3 | e8p-rvq4
    had_seed: int = static(0)  # seed of the random-orthogonal factor, for widths that need one
    parts: tuple[int, ...] = static(())  # output rows per fused part; () means one part

    def row_scale(self) -> jax.Array:
        """Per-output-row scale ``[out]`` (float32), or ``[1]`` when unfused."""
        scale = self.scale.astype(jnp.float32)
        if len(self.parts) <= 1:
            return scale
        return jnp.repeat(scale, jnp.asarray(self.parts), total_repeat_length=self.shape[0])

    def part_slices(self) -> list[slice]:
        """The output rows of each fused part, in order."""
        bounds = [0]
        for p in self.parts or (self.shape[0],):
            bounds.append(bounds[-1] + p)
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def _codes(self) -> tuple[jax.Array, ...]:
        return (self.codes,) if self.resid_codes.ndim == 1 else (self.codes, self.resid_codes)

    def rotated(self) -> jax.Array:
        """``Q`` ``[out, in]`` float32: the decoded codewords, in the rotated and scaled basis."""
        q = e8p.get_codebook(self.codebook).decode(self._codes())  # [out, in / 8, 8]
        return q.reshape(self.shape)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        w = hadamard.rht_inverse(self.rotated(), self.SU.astype(jnp.float32), seed=self.had_seed)
        w = hadamard.rht_inverse(w.T, self.SV.astype(jnp.float32), seed=self.had_seed).T
        return (w * self.row_scale()[:, None]).astype(dtype)

    def matmul(self, x: jax.Array, backend: str = "auto") -> jax.Array:
        if backend not in ("auto", "reference"):
            raise ValueError(f"{self.format_name}: backend {backend!r} not available")
        return _matmul(x, self)


@jax.jit
def _matmul(x, qw: QuIPSharpQuantized):
    xr = hadamard.rht(x.astype(jnp.float32), qw.SU.astype(jnp.float32), seed=qw.had_seed)
    y = jnp.matmul(xr, qw.rotated().T, precision=jax.lax.Precision.HIGHEST)
    y = hadamard.rht_inverse(y, qw.SV.astype(jnp.float32), seed=qw.had_seed)
    return (y * qw.row_scale()).astype(x.dtype)
