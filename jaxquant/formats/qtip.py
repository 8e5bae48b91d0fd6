"""QTIP format: bitshift-trellis codes per 16x16 tile, in the randomized-Hadamard domain.

``W = diag(SV) A_m (scale · Ŵr) A_nᵀ diag(SU)`` (QuIP# §3 / QTIP §4 incoherence processing),
where ``Ŵr`` is decoded tile by tile from the trellis streams.

Stream layout (what a decode kernel reads). Tile ``(i, j)`` covers
``Ŵr[tr·i : tr·(i+1), tc·j : tc·(j+1)]``; its ``T = tr·tc`` weights are one trellis sequence in
row-major order (step ``t`` emits weights ``t·V … t·V+V-1``). The stream of a tile is the top
kV bits of each of its ``n = T/V`` states, ``T·k`` bits, written MSB-first into ``T·k/32``
uint32 words (stored as int32): bit ``b`` of the stream is bit ``31 - b % 32`` of word
``b // 32``. Because the path is tail-biting, state ``t`` is simply the L-bit window starting
at stream bit ``t·kV``, read circularly:

    p = t·kV;  w0 = words[p >> 5];  w1 = words[((p >> 5) + 1) % (T·k/32)];  r = p & 31
    state = ((w0 << r) | (r ? w1 >> (32 - r) : 0)) >> (32 - L)

``codes`` is ``[out/tr, in/tc, T·k/32]``: the tiles of one tile row are contiguous along the
input dimension, so a warp sweeping a tile row for a matvec reads ``T·k/8`` consecutive bytes
per tile (64 B at 2 bits), every lane's state windows inside them, the next word of the last
lane wrapping to the tile's first (tail-biting).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import hadamard
from jaxquant.codebooks.trellis import TrellisCode
from jaxquant.formats.base import QuantizedWeight, quantized_format, static


def pack_stream(states: jax.Array, *, L: int, kV: int) -> jax.Array:
    """``[..., n]`` tail-biting states -> ``[..., n·kV/32]`` int32 words (top kV bits each, MSB-first)."""
    n = states.shape[-1]
    if (n * kV) % 32:
        raise ValueError(f"a stream of {n}·{kV} bits is not a whole number of 32-bit words")
    sym = states.astype(jnp.uint32) >> (L - kV)
    shifts = jnp.arange(kV - 1, -1, -1, dtype=jnp.uint32)
    bits = ((sym[..., None] >> shifts) & 1).reshape(*states.shape[:-1], -1, 32)
    words = jnp.sum(bits << jnp.arange(31, -1, -1, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    return jax.lax.bitcast_convert_type(words, jnp.int32)


def unpack_states(words: jax.Array, *, L: int, kV: int, n: int) -> jax.Array:
    """Inverse of ``pack_stream`` for tail-biting paths: ``[..., n·kV/32]`` words -> ``[..., n]``
    uint32 states (integer shifts only, as a decode kernel does)."""
    nw = words.shape[-1]
    if nw * 32 != n * kV:
        raise ValueError(f"{nw} words hold {nw * 32} bits, not {n}·{kV}")
    w = jax.lax.bitcast_convert_type(words, jnp.uint32)
    p = np.arange(n) * kV
    j, r = p >> 5, (p & 31).astype(np.uint32)
    w0, w1 = w[..., j], w[..., (j + 1) % nw]
    r = jnp.asarray(r)
    hi = jnp.where(r == 0, w0, (w0 << r) | (w1 >> ((32 - r) & 31)))
    return hi >> (32 - L)


def decode_tiles(codes: jax.Array, table: jax.Array, *, code: TrellisCode, k: int,
                 tile: tuple[int, int]) -> jax.Array:
    """``[R, C, T·k/32]`` streams -> ``[R·tr, C·tc]`` float32 code values (before the scale)."""
    R, C, _ = codes.shape
    tr, tc = tile
    n = tr * tc // code.V
    states = unpack_states(codes, L=code.L, kV=k * code.V, n=n)  # [R, C, n]
    vals = code.decode(states, table).reshape(R, C, tr, tc)
    return vals.transpose(0, 2, 1, 3).reshape(R * tr, C * tc)


@quantized_format("qtip")
class QTIPQuantized(QuantizedWeight):
    codes: jax.Array  # int32 [out/tr, in/tc, tr·tc·bits/32], the tail-biting streams (see above)
    scale: jax.Array  # float32 [1]: Ŵr = scale · code values
    su: jax.Array  # float16 [in], ±1 input signs of the RHT
    sv: jax.Array  # float16 [out], ±1 output signs
    table: jax.Array  # float16: hyb [2^Q, 2], lut [2^L, V]; [1, 1] zero placeholder for 1MAD/3INST
    shape: tuple[int, int] = static()
    bits: int = static()  # k, bits per weight of the streams
    code: str = static("hyb")
    L: int = static(16)
    V: int = static(2)
    Q: int = static(9)
    tile: tuple[int, int] = static((16, 16))
    rht_seed: int = static(0)  # seed of the random-orthogonal factor for widths without a Hadamard
    serving_float32 = ("su", "sv")

    @property
    def trellis(self) -> TrellisCode:
        return TrellisCode(self.code, L=self.L, V=self.V, Q=self.Q)

    def rotated(self) -> jax.Array:
        """``scale · Ŵr``: the dequantized weight in the RHT domain, float32 ``[out, in]``."""
        vals = decode_tiles(self.codes, self.table, code=self.trellis, k=self.bits, tile=self.tile)
        return vals * self.scale.astype(jnp.float32)[0]

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        w = hadamard.rht_inverse(self.rotated(), self.su, seed=self.rht_seed)
        return hadamard.rht_inverse(w.T, self.sv, seed=self.rht_seed).T.astype(dtype)

    def matmul(self, x: jax.Array, backend: str = "auto") -> jax.Array:
        """``x @ W.T = rht_inverse(rht(x, SU) @ (scale·Ŵr)ᵀ, SV)`` without forming W: ``reference``
        (jnp), ``cuda`` (the trellis decode-matvec), ``pallas`` (its Pallas version, interpret mode
        off the GPU) or ``auto`` (the CUDA kernel on a GPU for 1-16 rows)."""
        from jaxquant.formats import dispatch

        choice = dispatch.vq_choice(self.format_name, kernel_issue(self, x, backend), x, backend,
                                    tuned=f"qtip-{self.code}-k{self.bits}", bits=self.bits)
        if choice == "cuda":
            return _matmul_kernel(x, self, "cuda")
        if choice == "pallas":
            return _matmul_kernel(x, self, "pallas")
        xr = hadamard.rht(x.astype(jnp.float32), self.su, seed=self.rht_seed)
        y = jnp.matmul(xr, self.rotated().T, precision=jax.lax.Precision.HIGHEST)
        return hadamard.rht_inverse(y, self.sv, seed=self.rht_seed).astype(x.dtype)


@functools.partial(jax.jit, static_argnames="kernel")
def _matmul_kernel(x, qw: QTIPQuantized, kernel: str):
    """The decode-matvec of ``kernel`` ("cuda" or "pallas") between that backend's Hadamard transforms."""
    from jaxquant.formats import dispatch

    xr = dispatch.rht_fast(x.astype(jnp.float32), qw.su, seed=qw.rht_seed, kernel=kernel)
    table = qw.table if qw.code == "hyb" else None
    if kernel == "pallas":
        import pallas_kernels

        y = pallas_kernels.qtip_matvec(xr, qw.codes, table, code=qw.code, k=qw.bits, L=qw.L,
                                       interpret=not dispatch.on_gpu())
    else:
        import cuda_ffi

        y = cuda_ffi.qtip_matvec(xr, qw.codes, table, code=qw.code, k=qw.bits, L=qw.L)
    y = dispatch.rht_fast(y * qw.scale.astype(jnp.float32)[0], qw.sv, seed=qw.rht_seed, inverse=True, kernel=kernel)
    return y.astype(x.dtype)


def kernel_issue(qw: QTIPQuantized, x: jax.Array, backend: str = "cuda") -> str | None:
    """Why the CUDA (or, with ``backend="pallas"``, the Pallas) kernel cannot compute ``x @ qw.T``
    (None when it can)."""
    if tuple(qw.tile) != (16, 16):
        return f"tile {qw.tile} has no kernel (16x16 has)"
    if qw.bits not in (2, 3, 4):
        return f"k = {qw.bits} has no kernel (2, 3, 4 have)"
    if backend == "pallas" and qw.code in ("hyb", "1mad", "3inst"):
        if not qw.bits * qw.V <= qw.L <= 24:
            return f"L = {qw.L} has no Pallas kernel ({qw.bits * qw.V}..24 have)"
        if qw.code == "hyb" and tuple(qw.table.shape) != (2**qw.Q, 2):
            return f"hyb table of shape {tuple(qw.table.shape)} is not [2^Q, 2] with Q = {qw.Q}"
    elif qw.code == "hyb":
        if (qw.L, qw.Q, qw.V) != (16, 9, 2):
            return f"hyb with L={qw.L}, Q={qw.Q} has no kernel (L=16, Q=9 has)"
    elif qw.code in ("1mad", "3inst"):
        if not 8 <= qw.L <= 24:
            return f"L = {qw.L} has no kernel (8..24 have)"
    else:
        return f"code {qw.code} has no kernel (hyb, 1mad, 3inst have)"
    if x.shape[-1] != qw.shape[1]:
        return f"x has {x.shape[-1]} inputs, the weight {qw.shape[1]}"
    return None
