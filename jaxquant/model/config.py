"""LlamaConfig: the architecture, read from an HF config.json, GGUF metadata or given directly."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings),
    # ("linear", factor), ("freq_factors", per-frequency divisors) or None
    rope_scaling: tuple | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    # q/k/v as one ``self_attn.qkv_proj`` and gate/up as one ``mlp.gate_up_proj`` (QuIP#'s fused
    # quantization, ``jaxquant.model.fuse``); outputs concatenated in that order
    fuse_qkv: bool = False
    fuse_gate_up: bool = False

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} query heads are not a multiple of "
                             f"{self.num_key_value_heads} key/value heads")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "LlamaConfig":
        """From the dict of a Hugging Face ``config.json`` (Llama architecture)."""
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        if d.get("model_type", "llama") != "llama" or not set(archs) & set(SUPPORTED_ARCHITECTURES):
            raise ValueError(f"unsupported architecture {archs} (model_type {d.get('model_type')!r}); "
                             f"jaxquant supports {list(SUPPORTED_ARCHITECTURES)}")
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id", 2)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=d.get("rope_theta", 10000.0),
            rope_scaling=_rope_scaling_from_hf(d.get("rope_scaling")),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False),
            mlp_bias=d.get("mlp_bias", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            fuse_qkv=d.get("fuse_qkv", False),
            fuse_gate_up=d.get("fuse_gate_up", False),
        )

    def to_hf(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = _rope_scaling_to_hf(self.rope_scaling)
        d["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **d}

    def to_json(self) -> str:
        return json.dumps(self.to_hf(), indent=2)


def _rope_scaling_from_hf(s: dict | None) -> tuple | None:
    if not s:
        return None
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return None
    if kind == "llama3":
        return ("llama3", float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"]),
                int(s["original_max_position_embeddings"]))
    if kind == "linear":
        return ("linear", float(s["factor"]))
    if kind == "freq_factors":
        return ("freq_factors", tuple(float(f) for f in s["factors"]))
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear)")


def _rope_scaling_to_hf(s: tuple | None) -> dict | None:
    if s is None:
        return None
    if s[0] == "llama3":
        return {"rope_type": "llama3", "factor": s[1], "low_freq_factor": s[2],
                "high_freq_factor": s[3], "original_max_position_embeddings": s[4]}
    if s[0] == "freq_factors":
        return {"rope_type": "freq_factors", "factors": list(s[1])}
    return {"rope_type": "linear", "factor": s[1]}
