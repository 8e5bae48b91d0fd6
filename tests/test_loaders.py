"""One random Llama written as HF safetensors, GGUF and Flax msgpack loads to identical parameters."""
import json

import numpy as np
import pytest

from helpers import random_params, tiny_config, write_flax, write_gguf, write_hf
from jaxquant.model.load import load_model
from jaxquant.model.params import named_params


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_config()
    return cfg, random_params(cfg, seed=np.random.SeedSequence().entropy % 2**32)


def _assert_same(model, cfg, params):
    assert model.config == cfg
    loaded = named_params(model)
    assert sorted(loaded) == sorted(params)
    for name, value in params.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), value, err_msg=name)


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_safetensors(tmp_path, reference, shards):
    cfg, params = reference
    _assert_same(load_model(write_hf(tmp_path / "hf", cfg, params, shards)), cfg, params)


def test_flax_msgpack(tmp_path, reference):
    cfg, params = reference
    _assert_same(load_model(write_flax(tmp_path / "flax", cfg, params)), cfg, params)


def test_gguf_undoes_qk_permutation(tmp_path, reference):
    cfg, params = reference
    model = load_model(write_gguf(tmp_path / "m.gguf", cfg, params))
    for name, value in named_params(model).items():
        np.testing.assert_array_equal(np.asarray(value), params[name], err_msg=name)
    assert model.config.num_key_value_heads == cfg.num_key_value_heads


def test_tied_embeddings_from_gguf(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    params = random_params(cfg)
    assert "lm_head.weight" not in params
    model = load_model(write_gguf(tmp_path / "t.gguf", cfg, params))
    assert model.config.tie_word_embeddings and model.lm_head is None


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path, reference):
    cfg, params = reference
    broken = dict(params)
    del broken["layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.weight"):
        load_model(write_hf(tmp_path / "missing", cfg, broken))
    with pytest.raises(ValueError, match="layers.0.extra"):
        load_model(write_hf(tmp_path / "extra", cfg, {**params, "layers.0.extra.weight": np.zeros(3, np.float32)}))
    bad = {**params, "norm.weight": np.ones(7, np.float32)}
    with pytest.raises(ValueError, match=r"norm.weight has shape \(7,\)"):
        load_model(write_hf(tmp_path / "shape", cfg, bad))


def test_truncated_and_unknown_files(tmp_path, reference):
    cfg, params = reference
    path = write_gguf(tmp_path / "m.gguf", cfg, params)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match="m.gguf"):
        load_model(path)
    folder = write_hf(tmp_path / "hf", cfg, params)
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(folder)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nothing-here")


def test_unknown_architecture(tmp_path, reference):
    cfg, params = reference
    folder = write_hf(tmp_path / "hf", cfg, params)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_model(folder)
