"""Fused q/k/v and gate/up linears: exact for dense models, quantized as parts by QuIP#, kept by checkpoints."""
import numpy as np
import pytest

import jax.numpy as jnp

import jaxquant as jq
from helpers import random_params, tiny_config
from jaxquant.model.params import model_from_params, named_params


def _model_and_tokens(**overrides):
    cfg = tiny_config(**overrides)
    seed = np.random.SeedSequence().entropy % 2**32
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(4, 32)).astype(np.int32)
    return model_from_params(cfg, random_params(cfg, seed=seed)), tokens


@pytest.mark.parametrize("bias", [False, True])
def test_fusing_a_dense_model_keeps_its_logits(bias):
    model, tokens = _model_and_tokens(attention_bias=bias, mlp_bias=bias)
    fused = jq.fuse_linears(model)
    names = named_params(fused)
    assert "layers.0.self_attn.qkv_proj.weight" in names and "layers.0.self_attn.q_proj.weight" not in names
    assert ("layers.1.mlp.gate_up_proj.bias" in names) == bias
    ref, _ = model(jnp.asarray(tokens))
    out, _ = fused(jnp.asarray(tokens))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_fusing_twice_or_after_quantizing(tmp_path):
    model, _ = _model_and_tokens()
    fused = jq.fuse_linears(jq.fuse_linears(model, gate_up=False))
    assert fused.config.fuse_qkv and fused.config.fuse_gate_up
    q = jq.quantize_model(model, jq.RTNConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="fuse before quantizing"):
        jq.fuse_linears(q)


def test_quip_sharp_quantizes_fused_parts_and_the_checkpoint_keeps_them(tmp_path):
    model, tokens = _model_and_tokens()
    fused = jq.fuse_linears(model)
    cfg = jq.QuIPSharpConfig(bits=4, tune_iters=1)
    q = jq.quantize_model(fused, cfg, calibration=tokens)
    qkv = named_params(q)["layers.0.self_attn.qkv_proj.weight"]
    c = model.config
    assert qkv.parts == (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim,
                         c.num_key_value_heads * c.head_dim)
    assert named_params(q)["layers.1.mlp.gate_up_proj.weight"].parts == (c.intermediate_size,) * 2
    # every row of every part is reproduced (each part normalized by its own RMS)
    w = named_params(fused)["layers.0.self_attn.qkv_proj.weight"]
    err = np.asarray(jnp.sum((qkv.dequantize() - w) ** 2, axis=1) / jnp.sum(w**2, axis=1))
    assert err.max() < 0.1, err.max()
    ref, _ = model(jnp.asarray(tokens))
    out, _ = q(jnp.asarray(tokens))
    assert float(jnp.mean((out - ref) ** 2)) < 0.05 * float(jnp.var(ref))
    jq.save(q, tmp_path / "ckpt")
    loaded = jq.load(tmp_path / "ckpt")
    assert loaded.config.fuse_qkv and loaded.config.fuse_gate_up
    again, _ = loaded(jnp.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out))
