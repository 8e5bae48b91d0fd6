"""Architectures of well-known Llamas, for benchmarks with random weights of real shapes."""
from jaxquant.model.config import LlamaConfig

PRESETS = {
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                                tie_word_embeddings=True, max_position_embeddings=8192),
    "llama2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, head_dim=128),
    "llama2-13b": LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                              num_attention_heads=40, num_key_value_heads=40, head_dim=128),
    "llama2-70b": LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8, head_dim=128),
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                             max_position_embeddings=8192),
}


def random_model(name_or_cfg, *, dtype="bfloat16", seed: int = 0, num_layers: int | None = None):
    """A Llama of a preset's shape with N(0, 0.02²) weights, generated directly on the default device."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jaxquant.model.params import model_from_params, param_shapes

    cfg = PRESETS[name_or_cfg] if isinstance(name_or_cfg, str) else name_or_cfg
    if num_layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=num_layers)
    key = jax.random.key(seed)
    params = {}
    for i, (name, shape) in enumerate(param_shapes(cfg).items()):
        if "norm" in name:
            params[name] = jnp.ones(shape, dtype)
        else:
            params[name] = (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * 0.02).astype(dtype)
    return model_from_params(cfg, params, source=f"random {getattr(cfg, 'hidden_size', '')}")
