"""Small random Llamas written in every supported checkpoint format."""
from __future__ import annotations

import json
import pathlib

import numpy as np

from jaxquant.model.config import LlamaConfig
from jaxquant.model.params import param_shapes


def rel_err(y, ref) -> float:
    """Relative Frobenius error of a kernel's output against its reference (float64, same shape)."""
    import jax.numpy as jnp

    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert np.all(np.isfinite(y)), "non-finite output"
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def tiny_config(**overrides) -> LlamaConfig:
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=256)
    return LlamaConfig(**{**base, **overrides})


def random_params(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(cfg).items():
        if "norm" in name:
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    return out


def write_hf(folder: pathlib.Path, cfg: LlamaConfig, params: dict, shards: int = 1) -> pathlib.Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(cfg.to_json())
    names = sorted(params)
    weight_map = {}
    for s in range(shards):
        file = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {_hf_name(n): params[n] for n in names[s::shards]}
        save_file(part, str(folder / file))
        weight_map.update({k: file for k in part})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def write_flax(folder: pathlib.Path, cfg: LlamaConfig, params: dict) -> pathlib.Path:
    """transformers-4 FlaxLlamaForCausalLM layout: nested dict, kernels [in, out]."""
    from flax import serialization, traverse_util

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(cfg.to_json())
    flat = {}
    for name, value in params.items():
        parts = name.split(".")
        if name == "embed_tokens.weight":
            flat[("model", "embed_tokens", "embedding")] = value
        elif name == "lm_head.weight":
            flat[("lm_head", "kernel")] = value.T
        elif parts[-2].endswith("_proj") and parts[-1] == "weight":
            flat[("model", *parts[:-1], "kernel")] = value.T
        else:
            flat[("model", *parts)] = value
    tree = traverse_util.unflatten_dict(flat)
    (folder / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    return folder


def write_gguf(path: pathlib.Path, cfg: LlamaConfig, params: dict) -> pathlib.Path:
    """A llama.cpp-style GGUF (F32), q/k rows permuted the way llama.cpp's converter does."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    sub = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
           "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
           "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
           "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
           "mlp.down_proj.weight": "ffn_down.weight"}
    for name, value in params.items():
        if name in names:
            w.add_tensor(names[name], value)
            continue
        _, i, rest = name.split(".", 2)
        if rest == "self_attn.q_proj.weight":
            value = _permute(value, cfg.num_attention_heads)
        elif rest == "self_attn.k_proj.weight":
            value = _permute(value, cfg.num_key_value_heads)
        w.add_tensor(f"blk.{i}.{sub[rest]}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: per head, rotate-half layout -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head") else "model." + name


def write_tokenizer(folder: pathlib.Path, vocab_size: int) -> None:
    """A small BPE tokenizer trained on the builtin corpus, saved in HF format."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from jaxquant.data import builtin_corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60)
    tok.train_from_iterator([builtin_corpus()[:20000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
