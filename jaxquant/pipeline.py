"""``quantize_model``: stream the decoder blocks, quantize every linear with its method.

Per block (only that block's weights are moved to the device):
  1. for each linear group in order (qkv, o, up, down), compute the group's inputs with the block
     as quantized so far (GPTQ's true-sequential order) and, for Hessian methods, H = E[x xᵀ];
  2. quantize the group's linears;
  3. run the quantized block on its inputs: the next block's inputs (GPTQ-style online mode).
With ``finetune=FinetuneConfig(...)`` (QuIP#'s block fine-tuning) the inputs are instead the original
model's activations: the original block's outputs on them are the targets, and after each group the
block's continuous parameters are trained to reproduce them (``jaxquant.finetune.finetune_block``).
Embeddings, norms and lm_head stay in full precision unless a rule names them.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant import hessian
from jaxquant.finetune import FinetuneConfig, finetune_block
from jaxquant.methods.registry import method_of
from jaxquant.model.fuse import fused_parts
from jaxquant.model.llama import DecoderLayer, Llama, rope_frequencies
from jaxquant.model.params import get_param, model_from_params, named_params, set_param
from jaxquant.quant import quantize_weight

# linear groups of a decoder block, in forward order; members share one input (and one Hessian)
GROUPS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


def block_groups(cfg) -> dict[str, tuple[str, ...]]:
    """``GROUPS`` of a model, with the fused linears where ``cfg`` fuses them (``jaxquant.model.fuse``)."""
    return {"qkv": ("self_attn.qkv_proj",) if cfg.fuse_qkv else GROUPS["qkv"], "o": GROUPS["o"],
            "up": ("mlp.gate_up_proj",) if cfg.fuse_gate_up else GROUPS["up"], "down": GROUPS["down"]}


@dataclasses.dataclass(frozen=True)
class Rule:
    """Layers whose name (e.g. ``layers.3.mlp.down_proj``) matches ``pattern`` (``re.search``) get
    ``config``; ``config=None`` keeps them in full precision. The first matching rule wins."""

    pattern: str
    config: Any | None


Progress = Callable[[str, int, int], None]  # (stage, done, total)


def layer_config(name: str, default: Any, rules: Sequence[Rule]) -> Any | None:
    for rule in rules:
        if re.search(rule.pattern, name):
            return rule.config
    return default


def quantize_model(model: Llama, config: Any, *, rules: Sequence[Rule] = (), calibration: np.ndarray | None = None,
                   key: jax.Array | None = None, batch_size: int = 8, progress: Progress | None = None,
                   hessians: Callable[[int, str], np.ndarray] | None = None, finetune: FinetuneConfig | None = None) -> Llama:
    """A new model whose block linears are quantized (``model`` itself is left unchanged).

    ``config`` is the default method config; ``rules`` override it per layer. Hessian methods need
    ``calibration`` token windows ``[n, ctx]`` (online Hessians) or ``hessians(block, group)``
    returning stored ones (offline). ``finetune`` (a ``FinetuneConfig``) fine-tunes each block after each
    group on the ``calibration`` windows; with it, ``progress`` may also receive a metrics dict.
    """
    cfg = model.config
    qmodel = model_from_params(cfg, named_params(model))  # new Variables over the same arrays: no copy
    key = jax.random.key(0) if key is None else key
    groups = block_groups(cfg)
    configs = {f"layers.{i}.{member}": layer_config(f"layers.{i}.{member}", config, rules)
               for i in range(cfg.num_hidden_layers) for members in groups.values() for member in members}
    if any(map(_needs_hessian, configs.values())) and calibration is None and hessians is None:
        raise ValueError("a Hessian-aware method needs calibration windows or stored Hessians")
    if finetune is not None and calibration is None:
        raise ValueError("block fine-tuning needs calibration windows (its devset)")
    x = None
    if calibration is not None and (finetune is not None or any(map(_needs_hessian, configs.values()))):
        x = _embed(qmodel, jnp.asarray(calibration, jnp.int32))
        positions = jnp.arange(calibration.shape[1])
        inv_freq = rope_frequencies(cfg)
    for i in range(cfg.num_hidden_layers):
        layer = qmodel.layers[i]
        target = None if finetune is None else _run_block(model.layers[i], x, positions, inv_freq, batch_size)
        for g, (group, members) in enumerate(groups.items()):
            names = [f"layers.{i}.{member}" for member in members]
            h = None
            if any(_needs_hessian(configs[n]) for n in names):
                h = hessians(i, group) if hessians is not None else _group_hessian(layer, group, x, positions,
                                                                                 inv_freq, batch_size)
            for j, name in enumerate(names):
                c = configs[name]
                if c is None:
                    continue
                w = get_param(qmodel, name + ".weight")
                k = jax.random.fold_in(key, i * 16 + g * 4 + j)
                qw = quantize_weight(w, c, hessian=h if _needs_hessian(c) else None, key=k, name=name,
                                     parts=fused_parts(cfg, name))
                set_param(qmodel, name + ".weight", jax.device_get(qw))
            if finetune is not None:
                _finetune_group(layer, x, target, finetune, positions, inv_freq, f"finetune layers.{i} {group}", progress)
        if x is not None:
            x = target if finetune is not None else _run_block(layer, x, positions, inv_freq, batch_size)
        if progress:
            progress("quantize", i + 1, cfg.num_hidden_layers)
    return qmodel


def _finetune_group(layer, x, target, cfg, positions, inv_freq, stage, progress):
    finetune_block(layer, x, target, cfg, positions=positions, inv_freq=inv_freq, stage=stage, progress=progress)
    # back to host arrays, as the quantized weights are, so only one block stays in device memory
    for name, value in named_params(layer).items():
        set_param(layer, name, jax.device_get(value))


def _embed(model: Llama, tokens: jax.Array) -> jax.Array:
    return jax.jit(lambda w, t: jnp.take(w, t, axis=0))(jnp.asarray(model.embed_tokens.weight.get_value()), tokens)


def _needs_hessian(config: Any | None) -> bool:
    return config is not None and method_of(config).needs_hessian


def _group_input(layer: DecoderLayer, group: str, x, positions, inv_freq):
    """Input activations of a linear group, the block as quantized so far."""
    h = layer.input_layernorm(x)
    if group == "qkv":
        return h
    attn, _ = layer.self_attn.attend(h, positions, inv_freq)
    if group == "o":
        return attn
    x = x + layer.self_attn.o_proj(attn)
    h = layer.post_attention_layernorm(x)
    if group == "up":
        return h
    return layer.mlp.hidden(h)


def _second_moment(layer, x, positions, inv_freq, group):
    """The ``hessian.InputsFn`` of one group: its inputs, no block output."""
    return {group: _group_input(layer, group, x, positions, inv_freq)}, None


def _group_hessian(layer, group, x, positions, inv_freq, batch_size) -> jax.Array:
    """H = E[x xᵀ] of the group's inputs over all calibration tokens, data-parallel over the local
    devices with compensated fp32 accumulation (``jaxquant.hessian``)."""
    fn = _inputs_fn(group)
    width = hessian.group_widths(layer.self_attn.cfg)[group]
    batches = hessian.batches_from_array(x, hessian.make_mesh(jax.local_devices()), batch_size)
    stats = hessian.collect_block(layer, batches, positions, inv_freq, fn, {group: width})[group]
    return jax.device_put(stats.matrix, jax.local_devices()[0])


@functools.cache
def _inputs_fn(group: str):
    """One function object per group, so the Hessian collector's jit cache is reused across blocks."""
    return functools.partial(_second_moment, group=group)


@functools.partial(jax.jit, static_argnums=0)
def _block_step(graphdef, state, x, positions, inv_freq):
    return nnx.merge(graphdef, state)(x, positions, inv_freq)[0]


def _run_block(layer: DecoderLayer, x, positions, inv_freq, batch_size):
    """The block's outputs on all calibration windows, ``batch_size`` windows per call."""
    graphdef, state = nnx.split(layer)
    return jnp.concatenate([_block_step(graphdef, state, x[s : s + batch_size], positions, inv_freq)
                            for s in range(0, x.shape[0], batch_size)])
