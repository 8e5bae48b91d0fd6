"""The safetensors interchange folder and the pure apply."""
import json

import numpy as np
import pytest

import jax.numpy as jnp

import jaxquant as jq
from helpers import random_params, tiny_config
from jaxquant.export import apply, export_safetensors
from jaxquant.model.load import load_model
from jaxquant.model.params import model_from_params, named_params
from jaxquant.pipeline import Rule, quantize_model
from test_checkpoint import _assert_identical


@pytest.fixture(scope="module")
def mixed_model():
    cfg = tiny_config()
    seed = np.random.SeedSequence().entropy % 2**32
    model = model_from_params(cfg, random_params(cfg, seed=seed))
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
    rules = [Rule(r"self_attn\.[qk]_proj", jq.GPTQConfig(bits=3, group_size=32, act_order=True)),
             Rule(r"mlp\.down_proj", None)]
    return quantize_model(model, jq.RTNConfig(bits=4, group_size=32), rules=rules, calibration=tokens), tokens


def test_export_import_roundtrip(tmp_path, mixed_model):
    qmodel, tokens = mixed_model
    path = export_safetensors(qmodel, tmp_path / "x", recipe={"note": "mixed"})
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "jaxquant"
    assert qc["layers"]["model.layers.0.self_attn.q_proj.weight"]["format"] == "scalar_permuted"
    assert "codes" in qc["layers"]["model.layers.1.mlp.up_proj.weight"]["tensors"]
    loaded = load_model(path)
    _assert_identical(qmodel, loaded)
    a, _ = qmodel(jnp.asarray(tokens))
    b, _ = loaded(jnp.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_apply_is_the_model(mixed_model):
    qmodel, tokens = mixed_model
    a, _ = qmodel(jnp.asarray(tokens))
    b, _ = apply(qmodel.config, named_params(qmodel), jnp.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
