"""Codes of QTIP's bitshift trellis (Tseng et al. 2024, arXiv:2406.11235, §3): state -> value(s).

A state is an L-bit integer; each trellis step shifts k·V new bits in from the right
(``s' = ((s << kV) mod 2^L) | c``) and emits the V values ``decode(s')``. The decoders below use
integer arithmetic only (uint32, wrapping), so a GPU kernel reproduces them bit for bit:

- ``1mad`` (V=1, QTIP Alg. 1): one multiply-add, then the sum of the 4 bytes: approximately
  Gaussian by the central limit theorem, centred by 510 and scaled by 1/147.80... (its std),
  as one fp32 multiply by the rounded reciprocal.
- ``3inst`` (V=1, QTIP Alg. 2): one multiply-add, a mask and a xor make two fp16 bit patterns in
  [±0.125, ±2); their fp16 sum (as a ``half2`` add computes it) is the value.
- ``hyb`` (V=2, QTIP Alg. 3): ``h = s(s+1) mod 2^L`` hashes the state; Q bits of h index a
  tunable 2^Q x 2 table and the top bit of h flips the sign of the first coordinate.
- ``lut``: a pure 2^L x V look-up table (seeded Gaussian), the unstructured baseline.

Tables (``hyb``, ``lut``) are stored in float16, as the decode kernels read them; every
quantizer uses exactly the fp16-rounded values.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

CODES = ("1mad", "3inst", "hyb", "lut")
CODE_V = {"1mad": 1, "3inst": 1, "hyb": 2}  # "lut" takes any V

MAD1_A, MAD1_B, MAD1_CENTER, MAD1_DIV = 34038481, 76625530, 510, 147.800537109375
# Kernels multiply by the fp32 reciprocal rather than divide (XLA rewrites a division by a
# constant that way on some backends): value = fp32(y) · fp32(1/147.800537109375), within ~1 ulp of y/147.8.
MAD1_SCALE = float(np.float32(1.0 / MAD1_DIV))
INST3_A, INST3_B, INST3_MASK, INST3_XOR = 89226354, 64248484, 0x8FFF8FFF, 0x3B603B60
HYB_STD = float(np.sqrt(15 / 16))  # rms of each coordinate of the HYB table (QTIP §3.3)


# --------------------------------------------------------------------------- decoders
def decode_1mad(s: jax.Array) -> jax.Array:
    """``[...]`` states -> ``[...]`` float32 values of the 1MAD code."""
    x = s.astype(jnp.uint32) * jnp.uint32(MAD1_A) + jnp.uint32(MAD1_B)
    m = jnp.uint32(0xFF)
    y = (x & m) + ((x >> 8) & m) + ((x >> 16) & m) + (x >> 24)
    return (y.astype(jnp.int32) - MAD1_CENTER).astype(jnp.float32) * jnp.float32(MAD1_SCALE)


def decode_3inst(s: jax.Array) -> jax.Array:
    """``[...]`` states -> ``[...]`` float32 values of the 3INST code (fp16 sum, widened)."""
    x = s.astype(jnp.uint32) * jnp.uint32(INST3_A) + jnp.uint32(INST3_B)
    r = (x & jnp.uint32(INST3_MASK)) ^ jnp.uint32(INST3_XOR)
    hi = jax.lax.bitcast_convert_type((r >> 16).astype(jnp.uint16), jnp.float16)
    lo = jax.lax.bitcast_convert_type((r & jnp.uint32(0xFFFF)).astype(jnp.uint16), jnp.float16)
    return (hi + lo).astype(jnp.float32)


def decode_hyb(s: jax.Array, table: jax.Array, *, L: int = 16, Q: int = 9) -> jax.Array:
    """``[...]`` states -> ``[..., 2]`` float32 values of the HYB code with a 2^Q x 2 table."""
    s = s.astype(jnp.uint32)
    h = (s * (s + jnp.uint32(1))) & jnp.uint32((1 << L) - 1)
    idx = (h >> (L - Q - 1)) & jnp.uint32((1 << Q) - 1)
    v = table.astype(jnp.float32)[idx.astype(jnp.int32)]
    flip = ((h >> (L - 1)) & jnp.uint32(1)).astype(jnp.bool_)
    return jnp.stack([jnp.where(flip, -v[..., 0], v[..., 0]), v[..., 1]], axis=-1)


def decode_lut(s: jax.Array, table: jax.Array) -> jax.Array:
    """``[...]`` states -> ``[..., V]`` float32 rows of a 2^L x V table."""
    return table.astype(jnp.float32)[s.astype(jnp.int32)]


# --------------------------------------------------------------------------- the code object
@dataclasses.dataclass(frozen=True)
class TrellisCode:
    """A bitshift-trellis code: hashable, so it can be a static argument of ``jit``.

    ``decode(states, table)`` maps ``[...]`` integer states to ``[..., V]`` float32 values;
    ``table`` is the tunable table of ``hyb``/``lut`` (``None`` for 1MAD/3INST).
    """

    name: str = "hyb"
    L: int = 16
    V: int = 0  # 0: the code's own V (lut defaults to 1)
    Q: int = 9  # table bits of hyb
    seed: int = 0  # k-means seed (hyb) / table seed (lut)

    def __post_init__(self):
        if self.name not in CODES:
            raise ValueError(f"unknown trellis code {self.name!r}; known: {CODES}")
        v = self.V or CODE_V.get(self.name, 1)
        if self.name in CODE_V and v != CODE_V[self.name]:
            raise ValueError(f"code {self.name!r} emits V={CODE_V[self.name]} values per state, not {v}")
        object.__setattr__(self, "V", v)
        if not 2 <= self.L <= 24:
            raise ValueError(f"trellis state width L must be in [2, 24], got {self.L}")
        if self.name == "hyb" and not 1 <= self.Q <= self.L - 1:
            raise ValueError(f"hyb needs 1 <= Q <= L-1, got Q={self.Q}, L={self.L}")

    @property
    def has_table(self) -> bool:
        return self.name in ("hyb", "lut")

    def default_table(self) -> np.ndarray | None:
        """The initial float16 table (hyb: seeded k-means; lut: seeded Gaussian); None if table-free."""
        if self.name == "hyb":
            return hyb_table(self.Q, self.seed)
        if self.name == "lut":
            return lut_table(self.L, self.V, self.seed)
        return None

    def decode(self, states: jax.Array, table: jax.Array | None = None) -> jax.Array:
        if self.name == "1mad":
            return decode_1mad(states)[..., None]
        if self.name == "3inst":
            return decode_3inst(states)[..., None]
        if table is None:
            table = self.default_table()
        table = jnp.asarray(table)
        if self.name == "hyb":
            return decode_hyb(states, table, L=self.L, Q=self.Q)
        return decode_lut(states, table)

    def values(self, table: jax.Array | None = None) -> jax.Array:
        """All ``[2^L, V]`` float32 code values, indexed by state."""
        return self.decode(jnp.arange(1 << self.L, dtype=jnp.uint32), table)

    def rms(self, table: jax.Array | None = None) -> float:
        """Root mean square over all states and coordinates (computed in float64)."""
        v = np.asarray(self.values(table), np.float64)
        return float(np.sqrt(np.mean(v * v)))


# --------------------------------------------------------------------------- tables
def lut_table(L: int, V: int, seed: int = 0) -> np.ndarray:
    """``[2^L, V]`` float16 i.i.d. N(0, 1) table of the pure look-up code."""
    return np.random.default_rng(seed).standard_normal((1 << L, V)).astype(np.float16)


def kmeans(data: np.ndarray, init: np.ndarray, *, max_iter: int = 100, tol: float = 1e-4) -> np.ndarray:
    """Lloyd's algorithm in float64 (exact nearest centroid by a k-d tree): deterministic."""
    from scipy.spatial import cKDTree

    c = np.array(init, np.float64)
    prev = np.inf
    for _ in range(max_iter):
        dist, assign = cKDTree(c).query(data, workers=1)
        cur = float(np.mean(dist * dist))
        counts = np.bincount(assign, minlength=len(c))
        sums = np.stack([np.bincount(assign, data[:, j], minlength=len(c)) for j in range(data.shape[1])], 1)
        keep = counts > 0  # an empty cluster keeps its centroid
        c[keep] = sums[keep] / counts[keep, None]
        if prev - cur <= tol * cur:
            break
        prev = cur
    return c


def _cache_dir() -> pathlib.Path:
    # Same convention as jaxquant.model.hub.cache_dir (not imported: codebooks sit below the model).
    if os.environ.get("JAXQUANT_CACHE"):
        return pathlib.Path(os.environ["JAXQUANT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "jaxquant"


HYB_KMEANS_SAMPLES = 1 << 18  # with ≤ 100 Lloyd steps: ~30 s once; more changes trellis MSE < 0.5 %


def kmeans_table(Q: int, seed: int, samples: int) -> np.ndarray:
    """The HYB table before caching: seeded k-means of ``samples`` 2-D N(0,1) points, float16."""
    rng = np.random.default_rng([seed, Q, 0x9E3779B9])
    init = rng.standard_normal((1 << Q, 2))
    data = rng.standard_normal((samples, 2))
    c = kmeans(data, init)
    return (c / c.std() * HYB_STD).astype(np.float16)


@functools.lru_cache(maxsize=None)
def hyb_table(Q: int = 9, seed: int = 0) -> np.ndarray:
    """``[2^Q, 2]`` float16 HYB table: k-means (Lloyd, float64, ≤ 100 steps) of 2^18 seeded 2-D
    N(0,1) samples from a seeded N(0,1) start, scaled so that the population std of all entries
    is √(15/16) (QTIP §3.3 / App. B).

    Deterministic given (Q, seed); cached in memory and under the jaxquant cache directory
    (``$JAXQUANT_CACHE``, else ``$XDG_CACHE_HOME/jaxquant``, else ``~/.cache/jaxquant``).
    """
    path = hyb_table_path(Q, seed)
    if path.exists():
        table = np.load(path)
        if table.shape == (1 << Q, 2) and table.dtype == np.float16:
            return table
    table = kmeans_table(Q, seed, HYB_KMEANS_SAMPLES)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, table)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs recomputation
    return table


def hyb_table_path(Q: int = 9, seed: int = 0) -> pathlib.Path:
    return _cache_dir() / "qtip" / f"hyb-kmeans-v2-Q{Q}-seed{seed}-n{HYB_KMEANS_SAMPLES}.npy"


def table_digest(table: np.ndarray) -> str:
    """Short content hash of a table (to record which table a quantization used)."""
    return hashlib.sha256(np.ascontiguousarray(table).tobytes()).hexdigest()[:16]
