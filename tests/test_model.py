"""The NNX Llama against transformers' PyTorch Llama, and the KV-cache path against the full forward."""
import numpy as np
import pytest

import jax.numpy as jnp

from helpers import random_params, tiny_config, write_hf
from jaxquant.generate import generate_tokens
from jaxquant.model.load import load_model
from jaxquant.model.params import model_from_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _torch_logits(folder, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("variant", [
    dict(),
    dict(rope_scaling=("llama3", 8.0, 1.0, 4.0, 32), rope_theta=500000.0),
    dict(attention_bias=True, mlp_bias=True, num_key_value_heads=1),
    dict(tie_word_embeddings=True, num_key_value_heads=4),
])
def test_logits_match_transformers(tmp_path, variant):
    cfg = tiny_config(**variant)
    params = random_params(cfg, seed=np.random.SeedSequence().entropy % 2**32)
    folder = write_hf(tmp_path / "hf", cfg, params)
    tokens = np.random.default_rng().integers(0, cfg.vocab_size, size=(2, 80))
    ours, _ = load_model(folder)(jnp.asarray(tokens))
    theirs = _torch_logits(folder, tokens)
    rel = np.linalg.norm(np.asarray(ours) - theirs) / np.linalg.norm(theirs)
    assert rel < 1e-5, rel


def test_kv_cache_greedy_matches_uncached_forward():
    cfg = tiny_config()
    model = model_from_params(cfg, random_params(cfg, seed=np.random.SeedSequence().entropy % 2**32))
    prompt = list(np.random.default_rng().integers(0, cfg.vocab_size, size=7))
    cached = list(generate_tokens(model, prompt, 12))
    tokens = list(prompt)
    for _ in range(12):
        logits, _ = model(jnp.asarray([tokens]))
        tokens.append(int(jnp.argmax(logits[0, -1])))
    assert cached == tokens[len(prompt):]
