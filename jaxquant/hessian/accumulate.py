"""Moments of activations: compensated fp32 sums, diagnostics, the device mesh and its sharded steps."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


GROUP_NAMES = ("qkv", "o", "up", "down")  # the pipeline's linear groups, in forward order
GROUP_LAYERS = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "up": "mlp.gate_proj", "down": "mlp.down_proj"}
FORMAT_VERSION = 1
DEFAULT_CHUNK_TOKENS = 4096

# a function of (layer, x [b, T, d], positions, inv_freq) -> ({group: inputs [b, T, d_g]}, block output or None)
InputsFn = Callable[..., tuple[dict[str, jax.Array], jax.Array | None]]


# --- accumulator --------------------------------------------------------------------------------

@functools.partial(jax.tree_util.register_dataclass, data_fields=["xtx", "xtx_err", "xsum", "xsum_err"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Moments:
    """Σ x xᵀ (rows ``[r, d]``, r = d unless row-sharded) and Σ x, each as an (fp32 sum, TwoSum error) pair."""

    xtx: jax.Array
    xtx_err: jax.Array
    xsum: jax.Array
    xsum_err: jax.Array

    @staticmethod
    def zeros(rows: int, d: int, dtype=jnp.float32) -> "Moments":
        return Moments(jnp.zeros((rows, d), dtype), jnp.zeros((rows, d), dtype), jnp.zeros(d, dtype), jnp.zeros(d, dtype))

    def add_products(self, left: jax.Array, right: jax.Array, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> "Moments":
        """+= leftᵀ right for ``left [n, r]``, ``right [n, d]``, one fp32 partial per ``chunk_tokens`` tokens."""
        hi, lo = _chunked(lambda l, r: _products(l, r, self.xtx.dtype), (self.xtx, self.xtx_err), (left, right),
                          chunk_tokens)
        return dataclasses.replace(self, xtx=hi, xtx_err=lo)

    def add_sum(self, x: jax.Array, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> "Moments":
        """+= Σ x over the tokens of ``x [n, d]``."""
        hi, lo = _chunked(lambda a: jnp.sum(a.astype(self.xsum.dtype), axis=0), (self.xsum, self.xsum_err), (x,),
                          chunk_tokens)
        return dataclasses.replace(self, xsum=hi, xsum_err=lo)


def _chunked(partial, acc, arrays, chunk_tokens):
    """TwoSum-accumulate ``partial(*chunk)`` over chunks of ``chunk_tokens`` rows of ``arrays`` (zero-padded)."""
    n = arrays[0].shape[0]
    if n <= chunk_tokens:
        return _two_sum(*acc, partial(*arrays))
    c = -(-n // chunk_tokens)
    arrays = tuple(jnp.pad(a, ((0, c * chunk_tokens - n), (0, 0))).reshape(c, chunk_tokens, -1) for a in arrays)

    def body(acc, chunk):
        return _two_sum(*acc, partial(*chunk)), None

    return lax.scan(body, acc, arrays)[0]


def _two_sum(hi, lo, p):
    """(hi, lo) += p with Knuth's TwoSum: the rounding error of hi + p is carried in lo."""
    s = hi + p
    b = s - hi
    err = (hi - (s - b)) + (p - b)
    return s, lo + err


def _products(left, right, acc_dtype):
    """leftᵀ right: exact bf16/fp16 products with fp32 accumulation, or full-precision fp32/fp64."""
    half = left.dtype in (jnp.bfloat16, jnp.float16) and acc_dtype != jnp.float64
    if not half:
        left, right = left.astype(acc_dtype), right.astype(acc_dtype)
    return lax.dot_general(left, right, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype,
                           precision=None if half else lax.Precision.HIGHEST)


def accumulator_dtype():
    """fp64 only where it is cheap and enabled (x64 on the CPU); fp32 + TwoSum everywhere else."""
    return jnp.float64 if jax.config.jax_enable_x64 and jax.default_backend() == "cpu" else jnp.float32


# --- results and diagnostics ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HessianStats:
    """H = E[x xᵀ] ``[d, d]`` (fp32; rows may be sharded over the mesh), E[x] ``[d]`` and the token count."""

    matrix: jax.Array
    mean: jax.Array
    count: int

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """(H, mean) as host arrays, gathered from every process if needed."""
        return _to_host(self.matrix), _to_host(self.mean)


def diagnose(h, count: int, *, cond: bool = True) -> dict:
    """Dead inputs (zero diagonal), non-finite entries, and the condition number over the live inputs.

    The extreme eigenvalues are estimated on the device (power iteration for λmax; inverse
    iteration through an fp32 Cholesky factor for λmin): a few matrix passes, not an eigendecomposition.
    ``singular``: the fp32 factorization failed or λmin < ε·λmax (condition number beyond ~10⁷).
    """
    h = jnp.asarray(h)
    nonfinite, dead, diag_min, diag_max = (np.asarray(v) for v in _scan_matrix(h))
    dead_idx = np.flatnonzero(dead)
    report = {"width": int(h.shape[0]), "tokens": int(count), "nonfinite": int(nonfinite),
              "dead_inputs": int(dead_idx.size), "dead_first": dead_idx[:8].tolist(),
              "diag_min": float(diag_min), "diag_max": float(diag_max)}
    if cond and report["nonfinite"] == 0 and dead_idx.size < h.shape[0]:
        top, low = (float(v) for v in _extreme_eigenvalues(h.astype(jnp.float32)))
        singular = not low > top * np.finfo(np.float32).eps
        report.update(eig_max=top, eig_min=low, cond=float("inf") if singular else top / low, singular=singular)
    if count < h.shape[0]:
        report["warning"] = f"{count} tokens < width {h.shape[0]}: H is rank deficient"
    return report


@jax.jit
def _scan_matrix(h):
    diag = jnp.diagonal(h)
    return jnp.sum(~jnp.isfinite(h)), diag == 0, jnp.nanmin(diag), jnp.nanmax(diag)


@functools.partial(jax.jit, static_argnames="iters")
def _extreme_eigenvalues(h, iters: int = 100):
    """(λmax, λmin) of the live block of symmetric ``h``: dead rows/columns get the mean live diagonal,
    an eigenvalue inside [λmin, λmax] of the live block, so the condition number is unchanged."""
    d = h.shape[0]
    diag = jnp.diagonal(h)
    dead = diag == 0
    fill = jnp.sum(diag) / jnp.maximum(jnp.sum(~dead), 1)
    h = jnp.where(dead[:, None] | dead[None, :], 0, h) + jnp.diag(jnp.where(dead, fill, 0))
    v0 = 1 + 0.1 * jax.random.normal(jax.random.key(0), (d,), h.dtype)
    mv = functools.partial(jnp.matmul, precision=lax.Precision.HIGHEST)

    def power(step):
        def body(v, _):
            w = step(v)
            return w / jnp.linalg.norm(w), None
        return lax.scan(body, v0 / jnp.linalg.norm(v0), None, length=iters)[0]

    v = power(lambda v: mv(h, v))
    top = v @ mv(h, v)
    chol = jnp.linalg.cholesky(h)
    inv = lambda v: jax.scipy.linalg.solve_triangular(chol.T, jax.scipy.linalg.solve_triangular(chol, v, lower=True),
                                                        lower=False)  # noqa: E731
    u = power(inv)
    low = 1 / (u @ inv(u))
    return top, jnp.where(jnp.all(jnp.isfinite(chol)), low, 0.0)


def check_enough_tokens(tokens: int, widths: dict[str, int]) -> None:
    """A clear error when the calibration data cannot give a full-rank Hessian."""
    group, width = max(widths.items(), key=lambda kv: kv[1])
    if tokens < width:
        raise ValueError(f"calibration data too small: {tokens} tokens, but the {group!r} Hessian is "
                         f"{width} wide ({GROUP_LAYERS.get(group, group)} inputs) and needs at least {width} "
                         f"tokens to be full rank (use more or longer calibration windows, e.g. "
                         f">= {4 * width} tokens)")


# --- mesh and sharded steps -----------------------------------------------------------------------

def make_mesh(devices: Sequence[jax.Device] | None = None, rows: int = 1) -> Mesh:
    """Mesh ``('data', 'rows')`` over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % rows:
        raise ValueError(f"{len(devices)} devices do not split into row groups of {rows}")
    return Mesh(np.array(devices).reshape(len(devices) // rows, rows), ("data", "rows"))


def _shard_map(f, mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # jax < 0.6

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


_TOKENS = P(("data", "rows"))  # windows / tokens split over every device
_CACHE: dict = {}  # jitted steps by (graphdef, inputs function, mesh, ...): compiled once per shape
_STATE = Moments(P("data", "rows"), P("data", "rows"), P("data", "rows"), P("data", "rows"))


def _moments_state(mesh: Mesh, widths: dict[str, int]) -> dict[str, Moments]:
    """Per-device zero moments: global ``[D, d, d]`` sharded so that each device holds ``[1, d/R, d]``."""
    key = ("zeros", mesh, tuple(widths.items()), accumulator_dtype())
    if key not in _CACHE:
        d_axis, r_axis = mesh.shape["data"], mesh.shape["rows"]
        for d in widths.values():
            if d % r_axis:
                raise ValueError(f"Hessian width {d} is not divisible by rows={r_axis}")
        dtype = accumulator_dtype()

        def zeros():
            return {g: Moments(jnp.zeros((d_axis, d, d), dtype), jnp.zeros((d_axis, d, d), dtype),
                               jnp.zeros((d_axis, r_axis, d), dtype), jnp.zeros((d_axis, r_axis, d), dtype))
                    for g, d in widths.items()}

        _CACHE[key] = jax.jit(zeros, out_shardings=NamedSharding(mesh, P("data", "rows")))
    return _CACHE[key]()


def _accumulate_local(m: Moments, a: jax.Array, rows: int, chunk_tokens: int) -> Moments:
    """One device's update with its inputs ``a [n, d]`` (inside shard_map, leading axes of m are 1)."""
    m = Moments(m.xtx.reshape(m.xtx.shape[-2:]), m.xtx_err.reshape(m.xtx_err.shape[-2:]),
                m.xsum.reshape(-1), m.xsum_err.reshape(-1))
    m = m.add_sum(a, chunk_tokens)
    if rows > 1:
        full = lax.all_gather(a, "rows", axis=0, tiled=True)
        r = a.shape[1] // rows
        left = lax.dynamic_slice_in_dim(full, lax.axis_index("rows") * r, r, axis=1)
        m = m.add_products(left, full, chunk_tokens)
    else:
        m = m.add_products(a, a, chunk_tokens)
    return Moments(m.xtx[None], m.xtx_err[None], m.xsum[None, None], m.xsum_err[None, None])


def _step_fn(graphdef, inputs_fn: InputsFn, mesh: Mesh, groups: tuple[str, ...], chunk_tokens: int, output: bool):
    """jit(shard_map(step)): (moments, layer state, x [B,T,d], mask [B], positions, inv_freq) -> (moments, y)."""
    key = ("step", graphdef, inputs_fn, mesh, groups, chunk_tokens, output)
    if key in _CACHE:
        return _CACHE[key]
    rows = mesh.shape["rows"]

    def body(moments, state, x, mask, positions, inv_freq):
        layer = nnx.merge(graphdef, state)
        inputs, y = inputs_fn(layer, x, positions, inv_freq)
        new = {}
        for g in groups:
            a = inputs[g]
            a = (a * mask.astype(a.dtype)[:, None, None]).reshape(-1, a.shape[-1])  # padded windows add nothing
            new[g] = _accumulate_local(moments[g], a, rows, chunk_tokens)
        return (new, y) if output else (new, None)

    specs = {g: _STATE for g in groups}
    fn = _shard_map(body, mesh, in_specs=(specs, P(), _TOKENS, _TOKENS, P(), P()),
                    out_specs=(specs, _TOKENS if output else None))
    donate = (0,) if jax.default_backend() != "cpu" else ()
    _CACHE[key] = jax.jit(fn, donate_argnums=donate)
    return _CACHE[key]


def _finalize_fn(mesh: Mesh, groups: tuple[str, ...]):
    """Combine the devices' moments: Σ x xᵀ ``[d, d]`` rows-sharded P('rows'), Σ x replicated."""
    key = ("finalize", mesh, groups)
    if key in _CACHE:
        return _CACHE[key]

    def body(moments):
        out = {}
        for g in groups:
            m = moments[g]
            xtx = _compensated_allreduce(m.xtx[0], m.xtx_err[0], "data", mesh.shape["data"])
            xsum = _fixed_order_sum(lax.all_gather(m.xsum[0, 0], ("data", "rows")),
                                    lax.all_gather(m.xsum_err[0, 0], ("data", "rows")))
            out[g] = (xtx.astype(jnp.float32), xsum.astype(jnp.float32))
        return out

    specs = {g: _STATE for g in groups}
    fn = jax.jit(_shard_map(body, mesh, in_specs=(specs,), out_specs={g: (P("rows"), P()) for g in groups}))
    _CACHE[key] = fn
    return fn


def _fixed_order_sum(hi, lo):
    """Σ_k (hi[k] + lo[k]) with TwoSum, in device order: nearly exact, the same on every device."""
    s, e = hi[0], lo[0]
    for k in range(1, hi.shape[0]):
        s, e = _two_sum(s, e, hi[k])
        e = e + lo[k]
    return s + e


def _compensated_allreduce(hi, lo, axis: str, n: int):
    """Σ over ``axis`` of (hi + lo) ``[r, d]`` without a plain fp32 psum's rounding: an all_to_all gives
    each device one row slice from every device (the traffic of a reduce-scatter), which it sums in a
    fixed order with TwoSum, then the slices are all-gathered. Falls back to psum if rows don't split."""
    r = hi.shape[0]
    if n == 1:
        return hi + lo
    if r % n:
        return lax.psum(hi, axis) + lax.psum(lo, axis)
    pieces = [lax.all_to_all(a.reshape(n, r // n, -1), axis, 0, 0) for a in (hi, lo)]
    return lax.all_gather(_fixed_order_sum(*pieces), axis, axis=0, tiled=True)


def _replicate(tree, mesh: Mesh):
    sh = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sh)
    return jax.tree.map(lambda v: jax.make_array_from_callback(np.shape(v), sh, lambda idx: np.asarray(v)[idx]), tree)


def _to_host(a) -> np.ndarray:
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)
