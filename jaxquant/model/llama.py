"""A Flax NNX Llama. Every linear goes through ``jaxquant.matmul`` so any weight may be quantized.

Parameter names are Hugging Face's without the ``model.`` prefix (``layers.3.mlp.up_proj.weight``),
weights ``[out, in]``. The KV cache is a plain pytree passed in and returned, so decode steps jit
once and can donate it.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.formats.base import QuantizedWeight
from jaxquant.model.config import LlamaConfig
from jaxquant.quant import matmul


class Linear(nnx.Module):
    def __init__(self, d_in: int, d_out: int, *, bias: bool, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (d_out, d_in), jnp.float32) * 0.02)
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32)) if bias else None

    def __call__(self, x):
        y = matmul(x, self.weight.get_value())
        return y if self.bias is None else y + self.bias.get_value().astype(y.dtype)

    def after_norm(self, x, norm: "RMSNorm | None"):
        """``self(norm(x))``: one kernel where the weight's format makes the norm itself (a QuIP#
        decode step on a GPU, ``QuantizedWeight.normed_matmul``)."""
        if norm is None:
            return self(x)
        w = self.weight.get_value()
        if self.bias is None and isinstance(w, QuantizedWeight):
            y = w.normed_matmul(x, norm.weight.get_value(), norm.eps)
            if y is not None:
                return y
        return self(norm(x))

    def add_to(self, x, residual):
        """``residual + self(x)``: one kernel call where the weight's format adds the residual as it
        stores (a QuIP# decode step on a GPU, ``QuantizedWeight.matmul_add``)."""
        w = self.weight.get_value()
        if self.bias is None and isinstance(w, QuantizedWeight):
            y = w.matmul_add(x, residual)
            if y is not None:
                return y
        return residual + self(x)


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim), jnp.float32) * 0.02)


def rms_norm(x, weight, eps: float):
    """RMSNorm over the last axis in float32, the result in x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight.get_value(), self.eps)


def rope_frequencies(cfg: LlamaConfig) -> jax.Array:
    """Inverse frequencies [head_dim/2], with Llama-3 or linear scaling when configured."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s[0] == "linear":
        return inv / s[1]
    if s[0] == "freq_factors":  # llama.cpp's rope_freqs tensor
        return inv / jnp.asarray(s[1], jnp.float32)
    _, factor, low, high, old_ctx = s  # Llama 3.1: smooth interpolation between the two bands
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x, positions, inv_freq):
    """x [B, T, heads, hd]; positions [T]; HF's rotate-half convention."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[None, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[None, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def decode_attention_kernel(cfg: LlamaConfig) -> bool:
    """Whether single-token steps with a KV cache take the CUDA decode-attention kernel (RoPE, cache
    update and attention in one call; ``cuda_ffi.decode_attention``): on a GPU where the library
    builds, for head sizes 64 / 128 and at most 16 query heads per kv head, unless the environment
    sets ``JAXQUANT_DECODE_ATTENTION=xla``."""
    if os.environ.get("JAXQUANT_DECODE_ATTENTION", "auto") == "xla" or jax.default_backend() != "gpu":
        return False
    import cuda_ffi

    return (cuda_ffi.ops.decode_attention_fits(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
            and cuda_ffi.available())


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, hd, b = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        if cfg.fuse_qkv:
            self.qkv_proj = Linear(d, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd, bias=b, rngs=rngs)
        else:
            self.q_proj = Linear(d, cfg.num_attention_heads * hd, bias=b, rngs=rngs)
            self.k_proj = Linear(d, cfg.num_key_value_heads * hd, bias=b, rngs=rngs)
            self.v_proj = Linear(d, cfg.num_key_value_heads * hd, bias=b, rngs=rngs)
        self.o_proj = Linear(cfg.num_attention_heads * hd, d, bias=b, rngs=rngs)
        self.cfg = cfg

    def __call__(self, x, positions, inv_freq, kv=None, cache_pos=0, norm=None):
        out, kv = self.attend(x, positions, inv_freq, kv, cache_pos, norm)
        return self.o_proj(out), kv

    def residual(self, x, positions, inv_freq, kv=None, cache_pos=0, norm=None):
        """``x + self(x, ...)``, the add made by o_proj's kernel where its format can."""
        out, kv = self.attend(x, positions, inv_freq, kv, cache_pos, norm)
        return self.o_proj.add_to(out, x), kv

    def project(self, x, norm=None):
        """(q, k, v) [B, T, heads·hd] of ``norm(x)`` (x if no norm), from one fused product when
        ``fuse_qkv``."""
        if not self.cfg.fuse_qkv:
            x = x if norm is None else norm(x)
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        nq = self.cfg.num_attention_heads * self.cfg.head_dim
        nkv = self.cfg.num_key_value_heads * self.cfg.head_dim
        y = self.qkv_proj.after_norm(x, norm)
        return y[..., :nq], y[..., nq:nq + nkv], y[..., nq + nkv:]

    def attend(self, x, positions, inv_freq, kv=None, cache_pos=0, norm=None):
        """Attention output before o_proj. x [B, T, d], taken through ``norm`` first if given.
        Without ``kv``: causal self-attention over x. With ``kv`` = (k, v) caches [B, S, kv_heads,
        hd]: x's keys are written at ``cache_pos`` and attention covers the cache."""
        cfg = self.cfg
        B, T, _ = x.shape
        kvh, groups = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
        if kv is not None and T == 1 and decode_attention_kernel(cfg):
            import cuda_ffi

            qkv = self.qkv_proj.after_norm(x, norm) if cfg.fuse_qkv else jnp.concatenate(self.project(x, norm), -1)
            out, k, v = cuda_ffi.decode_attention(qkv.reshape(B, -1), kv[0], kv[1], positions[0], inv_freq,
                                                  heads=cfg.num_attention_heads, kv_heads=kvh)
            return out.reshape(B, 1, -1).astype(x.dtype), (k, v)
        q, k, v = self.project(x, norm)
        q = apply_rope(q.reshape(B, T, cfg.num_attention_heads, cfg.head_dim), positions, inv_freq)
        k = apply_rope(k.reshape(B, T, kvh, cfg.head_dim), positions, inv_freq)
        v = v.reshape(B, T, kvh, cfg.head_dim)
        if kv is not None:
            k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), cache_pos, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), cache_pos, axis=1)
            kv = (k, v)
        q = q.reshape(B, T, kvh, groups, cfg.head_dim)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k.astype(q.dtype)).astype(jnp.float32)
        scores = scores / math.sqrt(cfg.head_dim)
        key_pos = jnp.arange(k.shape[1])
        mask = key_pos[None, :] <= positions[:, None]  # [T, S]
        scores = jnp.where(mask, scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, -1)
        return out.astype(x.dtype), kv


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        if cfg.fuse_gate_up:
            self.gate_up_proj = Linear(d, 2 * f, bias=b, rngs=rngs)
        else:
            self.gate_proj = Linear(d, f, bias=b, rngs=rngs)
            self.up_proj = Linear(d, f, bias=b, rngs=rngs)
        self.down_proj = Linear(f, d, bias=b, rngs=rngs)
        self.fused = cfg.fuse_gate_up

    def hidden(self, x, norm=None):
        """silu(gate) * up of ``norm(x)`` (x if no norm): the input of down_proj."""
        if self.fused:
            gate, up = jnp.split(self.gate_up_proj.after_norm(x, norm), 2, axis=-1)
        else:
            x = x if norm is None else norm(x)
            gate, up = self.gate_proj(x), self.up_proj(x)
        return jax.nn.silu(gate) * up

    def __call__(self, x, norm=None):
        return self.down_proj(self.hidden(x, norm))

    def residual(self, x, norm):
        """``x + self(x, norm)``: one kernel call for the whole block where the weights' format has
        one (QuIP# at batch 1 on a GPU, ``QuantizedWeight.swiglu_block``)."""
        gate_up = self.gate_up_proj.weight.get_value() if self.fused else None
        if (norm is not None and isinstance(gate_up, QuantizedWeight) and self.gate_up_proj.bias is None
                and self.down_proj.bias is None
                and isinstance(down := self.down_proj.weight.get_value(), QuantizedWeight)):
            y = gate_up.swiglu_block(down, x, norm.weight.get_value(), norm.eps)
            if y is not None:
                return y
        return x + self(x, norm)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, inv_freq, kv=None, cache_pos=0):
        # the norms and residual adds go in with their linears: a decode step's QuIP# kernels make them
        x, kv = self.self_attn.residual(x, positions, inv_freq, kv, cache_pos, norm=self.input_layernorm)
        return self.mlp.residual(x, norm=self.post_attention_layernorm), kv


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, rngs=rngs)

    def embed(self, tokens):
        return jnp.take(jnp.asarray(self.embed_tokens.weight.get_value()), tokens, axis=0)

    def logits(self, h):
        h = self.norm(h)
        if self.lm_head is None:
            return matmul(h, self.embed_tokens.weight.get_value()).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def __call__(self, tokens, cache=None, cache_pos=0):
        """tokens [B, T] -> (logits [B, T, vocab] fp32, updated cache or None)."""
        positions = cache_pos + jnp.arange(tokens.shape[1])
        inv_freq = rope_frequencies(self.config)
        h = self.embed(tokens)
        new_cache = []
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, positions, inv_freq, None if cache is None else cache[i], cache_pos)
            new_cache.append(kv)
        return self.logits(h), (None if cache is None else new_cache)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32):
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_hidden_layers)]
