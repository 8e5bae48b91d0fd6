"""Hessians H = E[x xᵀ] of the inputs of every linear group, collected data-parallel over devices and hosts.

Numerics: each device step forms the partial product ``aᵀa`` of its tokens on the tensor cores
(bf16/fp16 inputs: exact products, fp32 accumulation; fp32 inputs: full-precision fp32; fp64 where
x64 is on and the backend is the CPU), at most ``chunk_tokens`` tokens per partial, and adds the
partial to an fp32 (high, low) pair with Knuth's TwoSum, so that millions of tokens accumulate
without fp32 drift (the failure of a plain running sum when activations have a large mean).

Parallelism: a mesh ``('data', 'rows')`` over every device of every process (``jax.shard_map``).
Calibration windows are split over all devices; each device accumulates its own moments, and one
reduction per group at the end combines them: an ``all_to_all`` hands every device one row slice of
every device's (high, low) pair, summed in device order with TwoSum, then ``all_gather``ed (the
traffic of a psum, without its rounding). With the same windows per device and step, n devices
give bit-identical Hessians to one. With ``rows > 1`` the Hessian's rows are split over the
``rows`` axis (memory ``d²/rows`` per device): the devices of a row group exchange their inputs
(``all_gather``) and each forms its slice of rows. Several processes join through
``jax.distributed.initialize`` beforehand (``jaxquant hessians --coordinator``).

Modes: online (``quantize_model`` asks for one group of the block as quantized so far,
``collect_block``) and offline (``collect_offline``: the full-precision model, all four groups in one
forward per block, stored per block as .npy + JSON, atomic and resumable; ``jaxquant hessians``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxquant.atomic import atomic_folder

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


# --- activations: calibration windows in batches over the mesh -----------------------------------

@dataclasses.dataclass
class Batches:
    """Activations ``[N, T, d]`` as global batches ``[B, T, d]`` sharded over every device of the mesh.

    ``mask[i]`` marks the real windows of batch i (the last batch is padded to a multiple of the
    device count). With ``offload``, batches live in host memory between steps (each process keeps
    its own shards), so devices hold one batch at a time.
    """

    mesh: Mesh
    data: list  # jax.Array [B, T, d] or, offloaded, a list of per-device numpy shards
    masks: list  # np.ndarray [B] of 0/1
    shape: tuple[int, int, int]  # (B, T, d)
    dtype: Any
    offload: bool = False

    @property
    def tokens(self) -> int:
        return int(sum(m.sum() for m in self.masks)) * self.shape[1]

    def get(self, i: int) -> jax.Array:
        v = self.data[i]
        if not self.offload:
            return v
        sh = NamedSharding(self.mesh, _TOKENS)
        devs = [d for d in sh.addressable_devices_indices_map(self.shape)]
        return jax.make_array_from_single_device_arrays(self.shape, sh, [jax.device_put(s, d) for s, d in zip(v, devs)])

    def set(self, i: int, value: jax.Array) -> None:
        if self.offload:
            idx = NamedSharding(self.mesh, _TOKENS).addressable_devices_indices_map(self.shape)
            by_dev = {s.device: s for s in value.addressable_shards}
            value = [np.asarray(by_dev[d].data) for d in idx]
        self.data[i] = value

    def mask(self, i: int) -> jax.Array:
        sh = NamedSharding(self.mesh, _TOKENS)
        m = self.masks[i]
        return jax.make_array_from_callback(m.shape, sh, lambda idx: m[idx])

    def local_arrays(self) -> list[np.ndarray]:
        """This process's shards of every batch, for checkpointing (each ``[n_local_devices, b, T, d]``)."""
        out = []
        for i in range(len(self.data)):
            v = self.data[i]
            shards = v if self.offload else [np.asarray(s.data) for s in _ordered_shards(v, self.mesh, self.shape)]
            out.append(np.stack(shards))
        return out

    def load_local_arrays(self, arrays: list[np.ndarray]) -> None:
        for i, a in enumerate(arrays):
            if self.offload:
                self.data[i] = list(a)
            else:
                sh = NamedSharding(self.mesh, _TOKENS)
                devs = list(sh.addressable_devices_indices_map(self.shape))
                self.data[i] = jax.make_array_from_single_device_arrays(
                    self.shape, sh, [jax.device_put(s, d) for s, d in zip(a, devs)])


def _ordered_shards(v: jax.Array, mesh: Mesh, shape):
    by_dev = {s.device: s for s in v.addressable_shards}
    return [by_dev[d] for d in NamedSharding(mesh, _TOKENS).addressable_devices_indices_map(shape)]


def _batch_size(batch_size: int, mesh: Mesh) -> int:
    n = mesh.size
    return max(n, -(-batch_size // n) * n)


def batches_from_tokens(model, tokens: np.ndarray, mesh: Mesh, batch_size: int, *, offload: bool = False) -> Batches:
    """Embeddings of the windows ``tokens [N, T]`` (the same array on every process) as sharded batches."""
    tokens = np.asarray(tokens, np.int32)
    n, t = tokens.shape
    b = _batch_size(batch_size, mesh)
    table = _replicate(jnp.asarray(model.embed_tokens.weight.get_value()), mesh)
    sh = NamedSharding(mesh, _TOKENS)
    embed = jax.jit(lambda w, ids: jnp.take(w, ids, axis=0), out_shardings=sh)
    out = Batches(mesh, [], [], (b, t, table.shape[1]), table.dtype, offload)
    for s in range(0, n, b):
        chunk = tokens[s : s + b]
        mask = np.zeros(b, np.int32)
        mask[: len(chunk)] = 1
        chunk = np.concatenate([chunk, np.zeros((b - len(chunk), t), np.int32)])
        ids = jax.make_array_from_callback(chunk.shape, sh, lambda idx, c=chunk: c[idx])
        out.data.append(None)
        out.masks.append(mask)
        out.set(len(out.data) - 1, embed(table, ids))
    return out


def batches_from_array(x: jax.Array, mesh: Mesh, batch_size: int) -> Batches:
    """Sharded batches of a single-process activations array ``x [N, T, d]`` (the online pipeline's)."""
    n, t, d = x.shape
    b = _batch_size(batch_size, mesh)
    sh = NamedSharding(mesh, _TOKENS)
    out = Batches(mesh, [], [], (b, t, d), x.dtype)
    for s in range(0, n, b):
        chunk = x[s : s + b]
        mask = np.zeros(b, np.int32)
        mask[: chunk.shape[0]] = 1
        if chunk.shape[0] < b:
            chunk = jnp.concatenate([chunk, jnp.zeros((b - chunk.shape[0], t, d), x.dtype)])
        out.data.append(jax.device_put(chunk, sh))
        out.masks.append(mask)
    return out


# --- collection over one block ----------------------------------------------------------------------

def block_inputs(layer, x, positions, inv_freq, attention: str = "model"):
    """One forward pass of a decoder block: the inputs of its four linear groups, and its output.

    ``attention="model"`` is the model's own attention (exactly the pipeline's forward);
    ``"cudnn"``/``"xla"`` use ``jax.nn.dot_product_attention`` (cuDNN's fused causal attention on
    NVIDIA GPUs: no ``[T, T]`` scores in memory), the same function up to rounding.
    """
    h = layer.input_layernorm(x)
    if attention == "model":
        attn, _ = layer.self_attn.attend(h, positions, inv_freq)
    else:
        attn = _fused_attention(layer.self_attn, h, positions, inv_freq, attention)
    x = x + layer.self_attn.o_proj(attn)
    h2 = layer.post_attention_layernorm(x)
    a = layer.mlp.hidden(h2)
    return {"qkv": h, "o": attn, "up": h2, "down": a}, x + layer.mlp.down_proj(a)


def _fused_attention(attn, h, positions, inv_freq, implementation):
    from jaxquant.model.llama import apply_rope

    cfg = attn.cfg
    b, t, _ = h.shape
    q, k, v = attn.project(h)
    q = apply_rope(q.reshape(b, t, cfg.num_attention_heads, cfg.head_dim), positions, inv_freq)
    k = apply_rope(k.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim), positions, inv_freq)
    v = v.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
    out = jax.nn.dot_product_attention(q, k, v.astype(q.dtype), is_causal=True, implementation=implementation)
    return out.reshape(b, t, -1).astype(h.dtype)


@functools.lru_cache(maxsize=None)
def block_inputs_fn(attention: str = "model") -> InputsFn:
    """``block_inputs`` with a fixed attention implementation (one stable function per choice, for jit caches)."""
    return block_inputs if attention == "model" else functools.partial(block_inputs, attention=attention)


@functools.lru_cache(maxsize=None)
def fused_attention_available(dtype: str, t: int, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether cuDNN's fused attention compiles and runs here for these shapes (NVIDIA GPUs, bf16/fp16)."""
    if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return False
    try:
        q = jnp.zeros((1, t, heads, head_dim), dtype)
        kv = jnp.zeros((1, t, kv_heads, head_dim), dtype)
        f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        jax.block_until_ready(f(q, kv, kv))
        return True
    except Exception:  # no cuDNN attention for this GPU, cuDNN version or shape
        return False


def choose_attention(cfg, dtype, ctx: int, attention: str = "auto") -> str:
    """``auto``: cuDNN fused attention where it works, else the model's own."""
    if attention != "auto":
        return attention
    ok = fused_attention_available(jnp.dtype(dtype).name, ctx, cfg.num_attention_heads, cfg.num_key_value_heads,
                                   cfg.head_dim)
    return "cudnn" if ok else "model"


def group_widths(cfg) -> dict[str, int]:
    return {"qkv": cfg.hidden_size, "o": cfg.num_attention_heads * cfg.head_dim, "up": cfg.hidden_size,
            "down": cfg.intermediate_size}


def collect_block(layer, batches: Batches, positions, inv_freq, inputs_fn: InputsFn, widths: dict[str, int], *,
                  forward: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                  check: bool = True) -> dict[str, HessianStats]:
    """Hessians of ``widths``' groups of one block over all batches; with ``forward``, each batch is
    replaced by the block's output (the next block's input). ``check``: fail on fewer tokens than
    the widest Hessian. Asynchronous: returns before the devices finish."""
    mesh = batches.mesh
    if check:
        check_enough_tokens(batches.tokens, widths)
    groups = tuple(widths)
    graphdef, state = nnx.split(layer)
    state = _replicate(state, mesh)
    positions, inv_freq = _replicate((jnp.asarray(positions), jnp.asarray(inv_freq)), mesh)
    step = _step_fn(graphdef, inputs_fn, mesh, groups, chunk_tokens, forward)
    moments = _moments_state(mesh, widths)
    for i in range(len(batches.data)):
        moments, y = step(moments, state, batches.get(i), batches.mask(i), positions, inv_freq)
        if forward:
            batches.set(i, y)
    sums = _finalize_fn(mesh, groups)(moments)
    count = batches.tokens
    out = {}
    for g, (xtx, xsum) in sums.items():
        h = _symmetric_mean(xtx, np.float64(count), mesh.shape["rows"])
        out[g] = HessianStats(h, xsum / count, count)
    return out


@functools.partial(jax.jit, static_argnums=2)
def _symmetric_mean(xtx, count, rows):
    h = xtx / count.astype(xtx.dtype)
    return (h + h.T) * 0.5 if rows == 1 else h  # row-sharded: the transpose would move every row


def forward_block(layer, batches: Batches, positions, inv_freq, inputs_fn: InputsFn = block_inputs) -> None:
    """Replace every batch by the block's output (no Hessians): replaying finished blocks."""
    mesh = batches.mesh
    graphdef, state = nnx.split(layer)
    state = _replicate(state, mesh)
    positions, inv_freq = _replicate((jnp.asarray(positions), jnp.asarray(inv_freq)), mesh)
    step = _step_fn(graphdef, inputs_fn, mesh, (), DEFAULT_CHUNK_TOKENS, True)
    for i in range(len(batches.data)):
        _, y = step({}, state, batches.get(i), batches.mask(i), positions, inv_freq)
        batches.set(i, y)


def moments(x, *, mesh: Mesh | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> HessianStats:
    """H = E[x xᵀ] of ``x [N, d]`` (numpy or jax), data-parallel over ``mesh`` (default every local device).

    The pmap-style entry point: tokens are split over the devices, each scans its chunks, then one
    compensated reduction."""
    mesh = make_mesh(jax.local_devices()) if mesh is None else mesh
    x = jnp.asarray(x)
    n, d = x.shape
    per = -(-n // (mesh.size * chunk_tokens)) * chunk_tokens
    x = jnp.pad(x, ((0, per * mesh.size - n), (0, 0)))
    x = jax.device_put(x, NamedSharding(mesh, _TOKENS))
    key = ("moments", mesh, d, per, x.dtype, chunk_tokens)
    if key not in _CACHE:
        def body(m, a):
            return {"x": _accumulate_local(m["x"], a, mesh.shape["rows"], chunk_tokens)}

        specs = {"x": _STATE}
        _CACHE[key] = jax.jit(_shard_map(body, mesh, in_specs=(specs, _TOKENS), out_specs=specs))
    state = _CACHE[key](_moments_state(mesh, {"x": d}), x)
    xtx, xsum = _finalize_fn(mesh, ("x",))(state)["x"]
    return HessianStats(_symmetric_mean(xtx, np.float64(n), mesh.shape["rows"]), xsum / n, n)


# --- offline: stored per block, resumable ------------------------------------------------------

def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _block_dir(out: pathlib.Path, i: int) -> pathlib.Path:
    return out / f"block_{i:04d}"


def finished_blocks(out: str | os.PathLike) -> list[int]:
    """Indices of the blocks whose Hessians are completely stored in ``out``."""
    out = pathlib.Path(out)
    return sorted(int(p.name[6:]) for p in out.glob("block_[0-9][0-9][0-9][0-9]") if (p / "block.json").exists())


def _write_manifest(out: pathlib.Path, manifest: dict) -> None:
    path = out / "hessians.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(manifest) if k != "created" and old.get(k) != manifest.get(k))
        if diff:
            raise ValueError(f"{out} holds Hessians of another run (differs in {diff}); use a new --out or delete it")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".hessians.json.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)


def _write_block(out: pathlib.Path, i: int, stats: dict[str, tuple[np.ndarray, np.ndarray, int]], report: dict) -> None:
    """block_i/{group}.npy (H), {group}.mean.npy and block.json, assembled beside it and renamed into place."""
    with atomic_folder(_block_dir(out, i)) as tmp:
        for g, (h, mean, _) in stats.items():
            np.save(tmp / f"{g}.npy", h.astype(np.float32))
            np.save(tmp / f"{g}.mean.npy", mean.astype(np.float32))
        (tmp / "block.json").write_text(json.dumps({"block": i, "count": {g: s[2] for g, s in stats.items()},
                                                    "diagnostics": report}, indent=1))


def _act_path(out: pathlib.Path, block: int) -> pathlib.Path:
    return out / "activations" / f"input_{block:04d}.process{jax.process_index()}.npz"


def _save_activations(out: pathlib.Path, block: int, arrays: list[np.ndarray]) -> None:
    path = _act_path(out, block)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        np.savez(f, *arrays)
    os.replace(tmp, path)


def _drop_activations(out: pathlib.Path, keep: int) -> None:
    for p in (out / "activations").glob(f"input_*.process{jax.process_index()}.npz"):
        if int(p.name[6:10]) != keep:
            p.unlink(missing_ok=True)


def _all_processes(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([flag]))))


def _same_on_all(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.array(value, np.int32)))


def collect_offline(model, tokens: np.ndarray, out: str | os.PathLike, *, mesh: Mesh | None = None,
                    batch_size: int = 1, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, attention: str = "auto",
                    offload: bool = False, save_activations: bool = False, cond: bool = True,
                    meta: dict | None = None, progress: Callable[[str, int, int], None] | None = None,
                    stop_after: int | None = None) -> pathlib.Path:
    """QuIP#-style offline Hessians of every block of the (full-precision) ``model`` into ``out``.

    One forward per block gives all four groups. Resumable: blocks already stored are not collected
    again; the input of the first missing block is read back if it was stored (``save_activations``:
    each block's output is written, one window set per block) or else replayed through the finished
    blocks, forward only (no Hessians: about half a block's cost each). Files are written by a
    background thread while the next block computes. ``tokens [N, T]`` must be the same on every
    process; process 0 writes the Hessians, each process its own activations. ``stop_after`` ends
    after that many new blocks.
    """
    out = pathlib.Path(out).expanduser().resolve()
    mesh = make_mesh() if mesh is None else mesh
    cfg = model.config
    layers = cfg.num_hidden_layers
    widths = group_widths(cfg)
    tokens = np.asarray(tokens, np.int32)
    check_enough_tokens(tokens.size, widths)
    manifest = {"format": "jaxquant-hessians", "version": FORMAT_VERSION, "config": cfg.to_hf(),
                "windows": int(tokens.shape[0]), "ctx": int(tokens.shape[1]), "tokens_sha256": _digest(tokens),
                "groups": {g: {"width": d, "layers": GROUP_LAYERS[g]} for g, d in widths.items()},
                "hessian": "E[x x^T] float32 [d, d]; mean E[x] float32 [d]", **(meta or {})}
    if jax.process_index() == 0:
        _write_manifest(out, manifest)
        for stale in out.glob(".block_*.partial-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
    _barrier("manifest")
    done = set(finished_blocks(out)) if jax.process_index() == 0 else set()
    start = _same_on_all(min(set(range(layers)) - done, default=layers))
    if start == layers:
        return out
    positions, inv_freq = jnp.arange(tokens.shape[1]), _rope(cfg)
    batches = batches_from_tokens(model, tokens, mesh, batch_size, offload=offload)
    inputs_fn = block_inputs_fn(choose_attention(cfg, batches.dtype, tokens.shape[1], attention))
    if start > 0:
        path = _act_path(out, start)
        if _all_processes(path.exists()):
            with np.load(path) as f:
                batches.load_local_arrays([f[f"arr_{i}"] for i in range(len(f.files))])
        else:
            for i in range(start):
                forward_block(model.layers[i], batches, positions, inv_freq, inputs_fn)
                if progress:
                    progress("replay", i + 1, start)
    writer = _Writer()
    try:
        new = 0
        for i in range(start, layers):
            if _same_on_all(int(_block_dir(out, i).joinpath("block.json").exists())):
                forward_block(model.layers[i], batches, positions, inv_freq, inputs_fn)
                continue
            stats = collect_block(model.layers[i], batches, positions, inv_freq, inputs_fn, widths,
                                  forward=i + 1 < layers, chunk_tokens=chunk_tokens)
            if jax.process_count() > 1:  # collectives stay on the main thread, in the same order everywhere
                stats = {g: HessianStats(*s.numpy(), s.count) for g, s in stats.items()}
            acts = batches.local_arrays() if save_activations and i + 1 < layers else None
            writer.submit(_finish_block, out, i, stats, acts, cond, progress, layers)
            new += 1
            if stop_after is not None and new >= stop_after:
                break
        writer.wait()
    finally:
        writer.close()
    _barrier("done")
    if finished_blocks(out) == list(range(layers)) and jax.process_index() == 0:
        shutil.rmtree(out / "activations", ignore_errors=True)
    return out


def _finish_block(out, i, stats, acts, cond, progress, layers):
    """Writer-thread work for block i: the next block's inputs, the Hessians, then older inputs dropped."""
    if acts is not None:
        _save_activations(out, i + 1, acts)
    if jax.process_index() == 0:
        host = {g: (np.asarray(s.matrix), np.asarray(s.mean), s.count) for g, s in stats.items()}
        report = {g: diagnose(h, c, cond=cond) for g, (h, _, c) in host.items()}
        _write_block(out, i, host, report)
    if (out / "activations").exists():
        _drop_activations(out, keep=i + 1)
    if progress:
        progress("hessians", i + 1, layers)


class _Writer:
    """One background thread for block files, at most one block pending (bounded host memory)."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.pending = ThreadPoolExecutor(1, thread_name_prefix="jaxquant-hessians"), None

    def submit(self, fn, *args):
        self.wait()
        self.pending = self.pool.submit(fn, *args)

    def wait(self):
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()  # re-raises the thread's error (or interruption) here

    def close(self):
        self.pool.shutdown(wait=True)


def _rope(cfg):
    from jaxquant.model.llama import rope_frequencies

    return rope_frequencies(cfg)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxquant-hessians-{name}")


def stored_hessians(path: str | os.PathLike) -> Callable[[int, str], np.ndarray]:
    """``hessians(block, group) -> H [d, d]`` (float32) read from a ``jaxquant hessians`` folder."""
    path = pathlib.Path(path).expanduser()
    marker = path / "hessians.json"
    if not marker.exists():
        raise FileNotFoundError(f"{path}: not a Hessians folder (no hessians.json; run `jaxquant hessians`)")
    manifest = json.loads(marker.read_text())
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: Hessians format version {manifest.get('version')!r}, expected {FORMAT_VERSION}")
    layers = manifest["config"].get("num_hidden_layers")

    def hessians(block: int, group: str) -> np.ndarray:
        if group not in manifest["groups"]:
            raise ValueError(f"{path}: no group {group!r} (groups: {sorted(manifest['groups'])})")
        f = _block_dir(path, block) / f"{group}.npy"
        if not (_block_dir(path, block) / "block.json").exists() or not f.exists():
            done = finished_blocks(path)
            raise ValueError(f"{path}: no Hessians for block {block} ({len(done)} of {layers} blocks stored; "
                             f"rerun `jaxquant hessians` with the same arguments to finish)")
        return np.load(f)

    hessians.manifest = manifest
    return hessians


# --- command line -----------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    """Register ``jaxquant hessians``; also adds ``--hessians DIR`` to ``quantize`` if registered."""
    q = subparsers.add_parser("hessians", help="collect per-block Hessians of the full-precision model (resumable)")
    q.add_argument("--model", required=True, help="alias, GGUF file, HF/Flax folder or jaxquant checkpoint")
    q.add_argument("--calib-file", help="calibration text (.txt/.jsonl/.parquet or wikitext2-valid/c4/builtin); "
                                       "default wikitext2-valid via datasets, else builtin")
    q.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    q.add_argument("--ctx", type=int, default=2048, help="tokens per window (default 2048)")
    q.add_argument("--seed", type=int, default=0, help="window sampling seed (default 0)")
    q.add_argument("--out", required=True, help="output folder; an interrupted run resumes from it")
    q.add_argument("--batch-size", type=int, default=None, help="windows per step over all devices (default 1 per device)")
    q.add_argument("--devices", type=int, default=None, help="use the first N local devices (default all)")
    q.add_argument("--rows", type=int, default=1, help="split each Hessian's rows over groups of N devices (default 1)")
    q.add_argument("--offload", action="store_true", help="keep activations in host memory between steps")
    q.add_argument("--save-activations", action="store_true",
                   help="store each block's output so a resume reads it back (default: a resume replays the "
                        "forward of the finished blocks, which is cheaper than writing N x ctx x d per block)")
    q.add_argument("--attention", default="auto", choices=["auto", "model", "cudnn", "xla"],
                   help="attention of the forward: auto = cuDNN fused attention on NVIDIA GPUs when it works, "
                        "else the model's own (default auto)")
    q.add_argument("--no-cond", action="store_true", help="skip the condition-number diagnostic (an eigendecomposition per group)")
    q.add_argument("--coordinator", help="HOST:PORT of process 0 for a multi-process run (jax.distributed; on CPUs "
                                          "also set JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo)")
    q.add_argument("--num-processes", type=int, default=None)
    q.add_argument("--process-id", type=int, default=None)
    q.set_defaults(fn=cmd_hessians)
    quant = subparsers.choices.get("quantize")
    if quant is not None and not any("--hessians" in a.option_strings for a in quant._actions):
        quant.add_argument("--hessians", metavar="DIR", help="use Hessians stored by `jaxquant hessians` instead of "
                                                             "collecting them online")


def cmd_hessians(args) -> pathlib.Path:
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    from jaxquant import data
    from jaxquant.model.load import load_model, load_tokenizer

    devices = jax.devices() if jax.process_count() > 1 else jax.local_devices()[: args.devices]
    mesh = make_mesh(devices, rows=args.rows)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    text, used = data.load_text_with_fallback(args.calib_file, default="wikitext2-valid")
    windows = data.calibration_windows(data.tokenize(tokenizer, text), args.samples, args.ctx, seed=args.seed)
    batch = args.batch_size or mesh.size
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    say(f"hessians: {windows.shape[0]} windows x {windows.shape[1]} tokens from {used}, {mesh.size} devices "
        f"({jax.process_count()} processes), batch {batch}")
    done = finished_blocks(args.out) if pathlib.Path(args.out).exists() else []
    if done:
        say(f"resuming: {len(done)} blocks already stored in {args.out}")
    start = time.perf_counter()

    def progress(stage, i, n):
        if stage == "hessians" and jax.process_index() == 0:
            report = json.loads((_block_dir(pathlib.Path(args.out), i - 1) / "block.json").read_text())
            notes = "; ".join(f"{g}: cond {d.get('cond', float('nan')):.2e}, dead {d['dead_inputs']}, "
                              f"nonfinite {d['nonfinite']}" for g, d in report["diagnostics"].items())
            say(f"block {i}/{n} ({time.perf_counter() - start:.1f} s): {notes}", flush=True)
        elif stage != "hessians":
            say(f"{stage} {i}/{n}", flush=True)

    path = collect_offline(model, windows, args.out, mesh=mesh, batch_size=batch, offload=args.offload,
                           save_activations=args.save_activations, cond=not args.no_cond, attention=args.attention,
                           meta={"model": str(args.model), "calibration": used, "seed": args.seed},
                           progress=progress)
    say(f"saved {path} in {time.perf_counter() - start:.1f} s")
    return path
