"""Generation with a KV cache: one jitted prefill, one jitted single-token step (cache donated)."""
from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.model.llama import Llama, init_cache
from jaxquant.model.params import device_leaves


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Next token from ``logits [vocab]``: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature <= 0:
        return jnp.argmax(logits)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits)
        cumulative = jnp.cumsum(jax.nn.softmax(logits[order]))
        drop = cumulative - jax.nn.softmax(logits[order]) > top_p  # keep the smallest set reaching top_p
        logits = logits.at[order].set(jnp.where(drop, -jnp.inf, logits[order]))
    return jax.random.categorical(key, logits)


def generate_tokens(model: Llama, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos: set[int] | None = None,
                    cache_dtype=jnp.float32) -> Iterator[int]:
    """Yield new tokens one by one (stop at ``eos`` or after ``max_new_tokens``).

    The token and position stay on the device and step ``i + 1`` is dispatched before token ``i`` is
    read back, so the host's dispatch overlaps the device's work (one step past the end is wasted)."""
    if not prompt:
        raise ValueError("the prompt is empty")
    state, rebuild = device_leaves(model)  # on the device once: host (numpy) weights would be copied per step
    cache = init_cache(model.config, 1, len(prompt) + max_new_tokens, cache_dtype)

    def forward(state, tokens, cache, pos, key):
        logits, cache = rebuild(state)(tokens, cache, pos)
        token = sample(logits[0, -1], jax.random.fold_in(key, pos), temperature, top_k, top_p)
        return token.astype(jnp.int32).reshape(1, 1), cache, pos + tokens.shape[1]

    key, pos = jax.random.key(seed), jnp.int32(0)
    prompt_ids = jnp.asarray([prompt], jnp.int32)
    # Compile both programs first: the step's compilation would otherwise stall the second token.
    prefill = jax.jit(forward, donate_argnums=2).lower(state, prompt_ids, cache, pos, key).compile()
    step = jax.jit(forward, donate_argnums=2).lower(state, prompt_ids[:, :1], cache, pos, key).compile()
    token, cache, pos = prefill(state, prompt_ids, cache, pos, key)
    for i in range(max_new_tokens):
        ahead = None
        if i + 1 < max_new_tokens:
            ahead, cache, pos = step(state, token, cache, pos, key)
        t = int(token[0, 0])
        yield t
        if eos and t in eos:
            return
        token = ahead


def generate(model: Llama, tokenizer, prompt: str, max_new_tokens: int = 32, *, chat: bool = False,
             stream: Callable[[str], None] | None = None, **sampling) -> str:
    """Generate text; ``chat`` wraps the prompt in the tokenizer's chat template."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer(prompt).input_ids
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if chat:  # a control token in the reply (e.g. <|im_start|> of a next turn) also ends this turn
        eos |= set(getattr(tokenizer, "all_special_ids", ()))
    eos = eos or None
    out: list[int] = []
    shown = ""
    for t in generate_tokens(model, list(np.asarray(ids).tolist()), max_new_tokens, eos=eos, **sampling):
        out.append(t)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if stream:
            stream(text[len(shown):])
        shown = text
    return shown
