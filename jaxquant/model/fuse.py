"""Fused linears: q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` (QuIP# §5).

Fusing is exact for a dense model (the product of concatenated rows is the concatenation of the
products) and lets a method quantize the parts together: QuIP# shares one RHT and one codebook
scale across them, each part normalized by its own RMS. The config's ``fuse_qkv`` /
``fuse_gate_up`` record it, so checkpoints of a fused model load fused.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxquant.formats.base import QuantizedWeight
from jaxquant.model.config import LlamaConfig
from jaxquant.model.llama import Llama
from jaxquant.model.params import model_from_params, named_params

FUSED = {  # fused linear -> its parts, in output order
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fuse_linears(model: Llama, *, qkv: bool = True, gate_up: bool = True) -> Llama:
    """A model whose q/k/v (and/or gate/up) weights and biases are concatenated into one linear."""
    cfg = model.config
    fuse = {"self_attn.qkv_proj": qkv and not cfg.fuse_qkv, "mlp.gate_up_proj": gate_up and not cfg.fuse_gate_up}
    params = named_params(model)
    for i in range(cfg.num_hidden_layers):
        for fused, parts in FUSED.items():
            if not fuse[fused]:
                continue
            for kind in ("weight", "bias"):
                names = [f"layers.{i}.{p}.{kind}" for p in parts]
                if names[0] not in params:
                    continue
                values = [params.pop(n) for n in names]
                if any(isinstance(v, QuantizedWeight) for v in values):
                    raise ValueError(f"layers.{i}: fuse before quantizing ({names[0]} is already quantized)")
                params[f"layers.{i}.{fused}.{kind}"] = jnp.concatenate([jnp.asarray(v) for v in values])
    new_cfg = dataclasses.replace(cfg, fuse_qkv=cfg.fuse_qkv or qkv, fuse_gate_up=cfg.fuse_gate_up or gate_up)
    return model_from_params(new_cfg, params, source="fuse_linears")


def fused_parts(cfg: LlamaConfig, name: str) -> tuple[int, ...] | None:
    """Output rows of each part of the fused linear ``name`` (``layers.3.self_attn.qkv_proj``), else None."""
    if name.endswith("self_attn.qkv_proj") and cfg.fuse_qkv:
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        return (q, kv, kv)
    if name.endswith("mlp.gate_up_proj") and cfg.fuse_gate_up:
        return (cfg.intermediate_size, cfg.intermediate_size)
    return None
