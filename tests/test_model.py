"""The NNX Llama against transformers' PyTorch Llama, and the KV-cache path against the full forward."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

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
    # Uncached: the full forward over a fixed-length buffer (one compilation); causality makes the
    # not-yet-written tail irrelevant to the logits at position n - 1.
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])
    tokens = np.zeros(len(prompt) + 12, np.int32)
    tokens[:len(prompt)] = prompt
    for n in range(len(prompt), len(tokens)):
        tokens[n] = int(jnp.argmax(forward(state, jnp.asarray(tokens[None]))[0, n - 1]))
    assert cached == list(tokens[len(prompt):])


def test_chat_generation_stops_at_any_special_token():
    """A control token in a chat reply (e.g. the <|im_start|> of a next turn) ends the reply."""
    from jaxquant.generate import generate

    cfg = tiny_config()
    model = model_from_params(cfg, random_params(cfg, seed=np.random.SeedSequence().entropy % 2**32))
    prompt = [int(t) for t in np.random.default_rng().integers(0, cfg.vocab_size, size=5)]
    greedy = list(generate_tokens(model, prompt, 12))
    stop = next((i for i in range(1, 11) if greedy[i] not in greedy[:i]), 0)  # before the 12-token limit

    class Tokenizer:  # the interface generate() uses; decode keeps special tokens to count them
        chat_template, eos_token_id, all_special_ids = "template", None, [greedy[stop]]

        def apply_chat_template(self, messages, add_generation_prompt):
            return prompt

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    assert generate(model, Tokenizer(), "hi", 12, chat=True).split() == [str(t) for t in greedy[:stop + 1]]
