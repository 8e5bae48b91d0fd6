"""Readers for checkpoint files, each returning ``(LlamaConfig, {our_name: np.ndarray [out, in]})``.

Name mapping is a declarative table per source: ``(regex, replacement, transform)``. Every source
tensor must match a rule; anything else is reported by name.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Callable

import numpy as np

from jaxquant.model.config import LlamaConfig

Rule = tuple[str, str, str | None]  # (source regex, our name, transform)

HF_RULES: list[Rule] = [
    (r"model\.(.+)", r"\1", None),
    (r"lm_head\.weight", "lm_head.weight", None),
]
HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq")

FLAX_RULES: list[Rule] = [
    (r"model\.embed_tokens\.embedding", "embed_tokens.weight", None),
    (r"model\.(layers\.\d+\.\w+\.\w+_proj)\.kernel", r"\1.weight", "transpose"),
    (r"model\.(layers\.\d+\.\w+\.\w+_proj)\.bias", r"\1.bias", None),
    (r"model\.(layers\.\d+\.\w+_layernorm)\.weight", r"\1.weight", None),
    (r"model\.norm\.weight", "norm.weight", None),
    (r"lm_head\.kernel", "lm_head.weight", "transpose"),
]

GGUF_RULES: list[Rule] = [
    (r"token_embd\.weight", "embed_tokens.weight", None),
    (r"output_norm\.weight", "norm.weight", None),
    (r"output\.weight", "lm_head.weight", None),
    (r"blk\.(\d+)\.attn_norm\.weight", r"layers.\1.input_layernorm.weight", None),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"layers.\1.post_attention_layernorm.weight", None),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"layers.\1.self_attn.q_proj.\2", "unpermute_q"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"layers.\1.self_attn.k_proj.\2", "unpermute_k"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"layers.\1.self_attn.v_proj.\2", None),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"layers.\1.self_attn.o_proj.\2", None),
    (r"blk\.(\d+)\.ffn_gate\.(weight|bias)", r"layers.\1.mlp.gate_proj.\2", None),
    (r"blk\.(\d+)\.ffn_up\.(weight|bias)", r"layers.\1.mlp.up_proj.\2", None),
    (r"blk\.(\d+)\.ffn_down\.(weight|bias)", r"layers.\1.mlp.down_proj.\2", None),
]


def rename(tensors: dict[str, np.ndarray], rules: list[Rule], transforms: dict[str, Callable],
           source: str) -> dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        for pattern, replacement, transform in rules:
            if re.fullmatch(pattern, name):
                new = re.sub(f"^{pattern}$", replacement, name)
                out[new] = transforms[transform](value) if transform else value
                break
        else:
            raise ValueError(f"{source}: tensor {name!r} is not part of a Llama checkpoint")
    return out


# --- Hugging Face folder (config.json + safetensors, single or sharded) -------------------------

def read_hf(folder: pathlib.Path) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    from safetensors import safe_open

    config = _read_json(folder / "config.json")
    cfg = LlamaConfig.from_hf(config)
    quant_method = (config.get("quantization_config") or {}).get("quant_method")
    if quant_method not in (None, "jaxquant"):
        raise ValueError(f"{folder}: quantization method {quant_method!r} is not readable by jaxquant")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    tensors = {}
    for file in files:
        path = folder / file
        if not path.exists():
            raise FileNotFoundError(f"{path}: listed in the safetensors index but missing")
        try:
            with safe_open(str(path), framework="flax") as f:
                for key in f.keys():
                    if not HF_IGNORED.fullmatch(key):
                        tensors[key] = np.asarray(f.get_tensor(key))
        except Exception as e:  # safetensors raises its own error types for truncated headers/data
            raise ValueError(f"{path}: unreadable or truncated safetensors file ({e})") from e
    if quant_method == "jaxquant":
        from jaxquant.export import regroup_quantized

        tensors = regroup_quantized(config, tensors, str(folder))
    return cfg, rename(tensors, HF_RULES, {}, str(folder))


# --- transformers-4 FlaxLlamaForCausalLM folder (flax_model.msgpack, kernels [in, out]) ---------

def read_flax(folder: pathlib.Path) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    from flax import serialization, traverse_util

    cfg = LlamaConfig.from_hf(_read_json(folder / "config.json"))
    path = folder / "flax_model.msgpack"
    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:
        raise ValueError(f"{path}: unreadable or truncated Flax msgpack file ({e})") from e
    flat = {".".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}
    return cfg, rename(flat, FLAX_RULES, {"transpose": np.transpose}, str(path))


# --- GGUF (llama.cpp) ---------------------------------------------------------------------------

def read_gguf(path: pathlib.Path) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    import gguf

    reader = _gguf_reader(path)
    meta = gguf_metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (jaxquant reads 'llama')")
    tensors = {}
    for t in reader.tensors:
        try:
            tensors[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name}") from e
    cfg = _gguf_config(meta, tensors, path)
    tensors.pop("rope_freqs.weight", None)  # folded into cfg.rope_scaling
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    transforms = {"unpermute_q": lambda w: _unpermute(w, heads), "unpermute_k": lambda w: _unpermute(w, kv_heads)}
    return cfg, rename(tensors, GGUF_RULES, transforms, str(path))


def gguf_metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "token_type", "merges", "scores"):
            continue  # large arrays: the tokenizer reads them itself
        try:
            meta[key] = field.contents()
        except Exception:
            pass
    return meta


def _gguf_reader(path: pathlib.Path):
    import gguf

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ValueError(f"{path}: truncated file (tensor {t.name} extends past the end)")
    return reader


def _gguf_config(meta: dict, tensors: dict, path: pathlib.Path) -> LlamaConfig:
    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    d = get("embedding_length")
    heads = get("attention.head_count")
    vocab = tensors["token_embd.weight"].shape[0] if "token_embd.weight" in tensors else get("vocab_size")
    scaling = None
    if "rope_freqs.weight" in tensors:
        scaling = ("freq_factors", tuple(float(f) for f in tensors["rope_freqs.weight"]))
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=int(d),
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=int(heads),
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=int(meta.get("llama.attention.key_length", d // heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(meta.get("llama.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of q/k rows (back to HF's rotate-half layout)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_json(path: pathlib.Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
