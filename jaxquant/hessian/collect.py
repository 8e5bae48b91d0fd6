"""Calibration batches over the mesh and the Hessians of one decoder block's linear groups."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxquant.hessian.accumulate import (DEFAULT_CHUNK_TOKENS, HessianStats, InputsFn, _CACHE, _STATE, _TOKENS,
                                         _accumulate_local, _finalize_fn, _moments_state, _replicate, _shard_map,
                                         _step_fn, check_enough_tokens, make_mesh)


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
