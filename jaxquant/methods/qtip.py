"""QTIP (Tseng et al. 2024, arXiv:2406.11235): RHT incoherence + tiled LDLQ + trellis codes.

Per layer: rotate ``Wr = A_mᵀ diag(SV) W diag(SU) A_n`` and ``Hr = A_nᵀ diag(SU) H diag(SU) A_n``
(QuIP# §3), scale ``Wr`` by ``rms(Wr) / (rms(code) · ρ)`` (QTIP §4, ρ = 0.9), then sweep the
input columns in blocks of ``tile[1]`` with LDLQ feedback (``methods/ldlq.py``); in a block,
every ``tile[0] x tile[1]`` tile is one tail-biting trellis sequence quantized by Viterbi
(``jaxquant.viterbi``). The result is a ``formats.qtip.QTIPQuantized``.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from jaxquant import hadamard
from jaxquant.codebooks.trellis import CODES, TrellisCode
from jaxquant.formats.qtip import QTIPQuantized, pack_stream
from jaxquant.methods import ldlq as core
from jaxquant.methods.registry import register_method
from jaxquant.viterbi import viterbi_tailbiting


@dataclasses.dataclass(frozen=True)
class QTIPConfig:
    bits: int = 2  # k: bits per weight of the trellis streams
    code: str = "hyb"  # hyb | 1mad | 3inst | lut
    L: int = 16  # trellis state bits
    tile: tuple[int, int] = (16, 16)  # (rows, cols) of one trellis sequence; cols = LDLQ block
    Q: int = 9  # HYB table bits (2^Q x 2 table)
    V: int = 0  # values per trellis state; 0: the code's own (1MAD, 3INST, LUT: 1; HYB: 2)
    table_seed: int = 0  # HYB k-means / LUT Gaussian table seed (sign vectors come from the PRNG key)
    scale_override: float = 0.9  # ρ in Wscale = rms(Wr) / (rms(code) · ρ)
    damp: float = 0.01  # relative diagonal damping of Hr (× mean diag)
    lazy_batch: int = 128  # LDLQ lazy-update width (a multiple of tile[1])
    viterbi_mib: int = 1024  # back-pointer memory per Viterbi chunk (MiB)

    def __post_init__(self):
        if not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise ValueError(f"QTIP supports 1 to 8 bits per weight, got {self.bits!r}")
        if self.code not in CODES:
            raise ValueError(f"unknown QTIP code {self.code!r}; known: {CODES}")
        tile = tuple(self.tile)
        if len(tile) != 2 or any(not isinstance(t, int) or t < 1 for t in tile):
            raise ValueError(f"tile must be two positive ints (rows, cols), got {self.tile!r}")
        object.__setattr__(self, "tile", tile)
        code = self.trellis()
        T, kV = tile[0] * tile[1], self.bits * code.V
        if T % code.V or (T * self.bits) % 32:
            raise ValueError(f"a {tile[0]}x{tile[1]} tile at {self.bits} bits is not a whole number "
                             f"of 32-bit words (or of V={code.V} steps)")
        if self.L < 2 * kV or T // code.V * kV < self.L:
            raise ValueError(f"L={self.L} does not fit k·V={kV} (needs 2·k·V <= L <= tile bits)")
        if not self.scale_override > 0:
            raise ValueError(f"scale_override must be positive, got {self.scale_override!r}")

    def trellis(self) -> TrellisCode:
        return TrellisCode(self.code, L=self.L, V=self.V, Q=self.Q, seed=self.table_seed)


@register_method("qtip", QTIPConfig, needs_hessian=True)
def quantize(w: jax.Array, cfg: QTIPConfig, *, hessian=None, key=None) -> QTIPQuantized:
    if hessian is None:
        raise ValueError("QTIP needs the layer's input Hessian (hessian=[in, in])")
    return quantize_with_hat(w, cfg, hessian=hessian, key=key)[0]


def rotate(w: jax.Array, hessian: jax.Array, su: jax.Array, sv: jax.Array, *, seed: int = 0):
    """(Wr, Hr) of the randomized Hadamard transform (QuIP# §3)."""
    wr = hadamard.rht(hadamard.rht(w, su, seed=seed).T, sv, seed=seed).T
    hr = hadamard.rht(hadamard.rht(hessian, su, seed=seed).T, su, seed=seed).T
    return wr, 0.5 * (hr + hr.T)


def quantize_with_hat(w, cfg: QTIPConfig, *, hessian, key=None):
    """``(QTIPQuantized, Ŵr)``; ``Ŵr`` is the sweep's result in the RHT domain (``= qw.rotated()``)."""
    w = jnp.asarray(w, jnp.float32)
    out, n = w.shape
    tr, tc = cfg.tile
    if out % tr or n % tc:
        raise ValueError(f"QTIP tiles {tr}x{tc} do not divide the {out}x{n} weight")
    key = jax.random.key(0) if key is None else key
    k_in, k_out = jax.random.split(key)
    su, sv = hadamard.random_signs(k_in, n), hadamard.random_signs(k_out, out)
    wr, hr = rotate(w, jnp.asarray(hessian, jnp.float32), su, sv)

    code = cfg.trellis()
    table = code.default_table()  # float16 as stored; None for the table-free 1MAD / 3INST
    if table is not None:
        table = jnp.asarray(table, jnp.float16)
    values = code.values(table)
    scale = jnp.sqrt(jnp.mean(wr * wr)) / (code.rms(table) * cfg.scale_override)
    scale = jnp.maximum(scale, jnp.finfo(jnp.float32).tiny).reshape(1)
    stored_table = table if table is not None else jnp.zeros((1, 1), jnp.float16)  # Orbax: no empty arrays

    H, dead = core.prepare_hessian(hr, damp=cfg.damp)
    U = core.inverse_cholesky_upper(H, damp=cfg.damp)
    x = jnp.where(dead[None, :], 0.0, wr / scale[0])
    bp_bytes = cfg.viterbi_mib << 20
    hat, codes = _sweep(x, U, values, L=code.L, k=cfg.bits, tile=(tr, tc), lazy=cfg.lazy_batch,
                        bp_bytes=bp_bytes)
    qw = QTIPQuantized(codes, scale.astype(jnp.float32), su.astype(jnp.float16),
                       sv.astype(jnp.float16), stored_table, shape=(out, n), bits=cfg.bits,
                       code=code.name, L=code.L, V=code.V, Q=code.Q, tile=(tr, tc))
    return qw, hat * scale[0]


@partial(jax.jit, static_argnames=("L", "k", "tile", "lazy", "bp_bytes"))
def _sweep(x, U, values, *, L, k, tile, lazy, bp_bytes):
    """Tiled LDLQ over ``x`` (code units): (Ŵr in code units, streams [out/tr, in/tc, T·k/32])."""
    out, n = x.shape
    tr, tc = tile
    V = values.shape[1]

    def quantize_block(xb, _):
        seq = xb.reshape(out // tr, tr * tc)  # tile rows of this column block, row-major
        states = viterbi_tailbiting(seq, values, L=L, k=k, max_backpointer_bytes=bp_bytes)
        q = values[states].reshape(out, tc)
        return q, pack_stream(states, L=L, kV=k * V)

    hat, streams = core.ldlq(x, U, quantize_block, block_size=tc,
                             lazy_batch=max(tc, (lazy // tc) * tc))
    return hat, jnp.moveaxis(streams, 0, 1)
