"""Every registered format survives an Orbax checkpoint and the safetensors export bit-exactly."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxquant as jq
from helpers import random_params, tiny_config
from jaxquant import checkpoint
from jaxquant.export import export_safetensors
from jaxquant.model.load import load_model
from jaxquant.model.params import device_leaves, model_from_params, named_params
from jaxquant.pipeline import quantize_model
from test_checkpoint import _assert_identical

RECIPES = {
    "scalar": jq.RTNConfig(bits=3, group_size=32),
    "scalar_meta": jq.HQQConfig(bits=2, group_size=16, meta_bits=8),
    "scalar_permuted": jq.GPTQConfig(bits=4, group_size=32, act_order=True),
    "vq": jq.GPTVQConfig(bits=2, vq_dim=2, group_size=32, tile_size=256, kmeans_iters=5, update_iters=2),
    "vq_scaled": jq.GPTVQConfig(bits=2, vq_dim=2, group_size=32, tile_size=256, kmeans_iters=5, update_iters=2,
                                scale_block=32),
    "vq_svd": jq.GPTVQConfig(bits=3, vq_dim=1, group_size=32, tile_size=256, kmeans_iters=5, update_iters=2,
                             svd_rank=0.5),
    "quip#": jq.QuIPSharpConfig(bits=3, tune_iters=1),
    "qtip": jq.QTIPConfig(bits=2, code="1mad"),
}


def test_every_format_has_a_recipe():
    # "lora" wraps a quantized base (HQQ+); its round trips are tested in test_finetune.py
    assert set(RECIPES) | {"lora"} == set(jq.FORMATS)


@pytest.fixture(scope="module")
def small():
    cfg = tiny_config(num_hidden_layers=1, hidden_size=64, intermediate_size=128)
    seed = np.random.SeedSequence().entropy % 2**32
    model = model_from_params(cfg, random_params(cfg, seed=seed))
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
    return model, tokens


@pytest.mark.parametrize("fmt", sorted(RECIPES))
def test_checkpoint_and_export_roundtrip(tmp_path, small, fmt):
    model, tokens = small
    qmodel = quantize_model(model, RECIPES[fmt], calibration=tokens, key=jax.random.key(1))
    formats = {v.format_name for v in named_params(qmodel).values() if isinstance(v, jq.QuantizedWeight)}
    assert formats == {fmt}
    expected, _ = qmodel(jnp.asarray(tokens))
    for loaded in (checkpoint.load(checkpoint.save(qmodel, tmp_path / "ck")),
                   load_model(export_safetensors(qmodel, tmp_path / "st"))):
        _assert_identical(qmodel, loaded)
        np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(tokens))[0]), np.asarray(expected))
    state, rebuild = device_leaves(qmodel)  # what decode loops hold: the serving form, same outputs
    serving = rebuild(state)
    np.testing.assert_allclose(np.asarray(serving(jnp.asarray(tokens))[0]), np.asarray(expected), rtol=1e-5, atol=1e-5)
    for w in named_params(serving).values():
        if isinstance(w, jq.QuantizedWeight):
            assert all(getattr(w, n).dtype == jnp.float32 for n in w.serving_float32), fmt
