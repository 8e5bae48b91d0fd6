"""quantize_model: rules, streaming, and Hessian methods fed by online calibration."""
import numpy as np
import pytest

import jax.numpy as jnp

import jaxquant as jq
from helpers import random_params, tiny_config
from jaxquant.model.params import model_from_params, named_params
from jaxquant.pipeline import Rule, quantize_model


@pytest.fixture(scope="module")
def model_and_tokens():
    cfg = tiny_config(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32)
    seed = np.random.SeedSequence().entropy % 2**32
    model = model_from_params(cfg, random_params(cfg, seed=seed))
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(8, 64)).astype(np.int32)
    return model, tokens


def _logit_error(model, qmodel, tokens):
    ref, _ = model(jnp.asarray(tokens))
    out, _ = qmodel(jnp.asarray(tokens))
    return float(jnp.mean((ref - out) ** 2))


def test_rules_pick_configs_and_keep_layers(model_and_tokens):
    model, _ = model_and_tokens
    rules = [Rule(r"mlp\.down_proj", None), Rule(r"layers\.1\.", jq.RTNConfig(bits=8, group_size=32))]
    params = named_params(quantize_model(model, jq.RTNConfig(bits=2, group_size=32), rules=rules))
    assert not isinstance(params["layers.0.mlp.down_proj.weight"], jq.QuantizedWeight)
    assert params["layers.0.mlp.up_proj.weight"].bits == 2
    assert params["layers.1.self_attn.q_proj.weight"].bits == 8
    assert not isinstance(params["embed_tokens.weight"], jq.QuantizedWeight)


def test_gptq_with_online_hessians_beats_rtn(model_and_tokens):
    model, tokens = model_and_tokens
    rtn = quantize_model(model, jq.RTNConfig(bits=3, group_size=32))
    gptq = quantize_model(model, jq.GPTQConfig(bits=3, group_size=32), calibration=tokens)
    assert _logit_error(model, gptq, tokens) < _logit_error(model, rtn, tokens)


def test_hessian_method_without_data_is_an_error(model_and_tokens):
    model, _ = model_and_tokens
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(model, jq.GPTQConfig(bits=4))
