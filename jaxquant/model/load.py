"""``load_model(source)`` and ``load_tokenizer(source)`` for every supported kind of source.

A source is a model alias (``smollm2-135m``), a GGUF file, a Hugging Face folder (config.json +
safetensors), a transformers-4 Flax folder (flax_model.msgpack) or a jaxquant checkpoint folder.
"""
from __future__ import annotations

import pathlib
import sys

from jaxquant.model import convert, hub
from jaxquant.model.llama import Llama
from jaxquant.model.params import model_from_params

CHECKPOINT_MARKER = "jaxquant.json"


def resolve_source(source: str | pathlib.Path) -> tuple[str, pathlib.Path]:
    """(kind, path) with kind in gguf | hf | flax | jaxquant."""
    if str(source) in hub.ALIASES:
        return "gguf", hub.resolve_alias(str(source))
    path = pathlib.Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise ValueError(f"{path}: unknown model file type (expected .gguf or a folder)")
    if path.is_dir():
        if (path / CHECKPOINT_MARKER).exists():
            return "jaxquant", path
        if (path / "flax_model.msgpack").exists() and not any(path.glob("*.safetensors")):
            return "flax", path
        if (path / "config.json").exists():
            return "hf", path
        raise ValueError(f"{path}: not a model folder (no config.json, flax_model.msgpack or {CHECKPOINT_MARKER})")
    raise FileNotFoundError(f"{source}: no such file, folder or model alias (aliases: {sorted(hub.ALIASES)})")


def load_model(source: str | pathlib.Path) -> Llama:
    """A Llama with dense (or, for a jaxquant checkpoint, quantized) weights on the host."""
    kind, path = resolve_source(source)
    if kind == "jaxquant":
        from jaxquant.checkpoint import load

        return load(path)
    reader = {"gguf": convert.read_gguf, "hf": convert.read_hf, "flax": convert.read_flax}[kind]
    cfg, params = reader(path)
    return model_from_params(cfg, params, source=str(path))


def load_tokenizer(source: str | pathlib.Path):
    """The tokenizer of a source (from GGUF metadata for GGUF files; cached beside the file)."""
    from transformers import AutoTokenizer

    kind, path = resolve_source(source)
    if kind == "jaxquant":
        path = path / "tokenizer"
    if kind != "gguf":
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise ValueError(f"{path}: no usable tokenizer files ({e})") from e
    cached = path.with_name(path.name + ".tokenizer")
    if cached.exists():
        return AutoTokenizer.from_pretrained(str(cached))
    print(f"building the tokenizer from {path.name} metadata ...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    partial = cached.with_name(cached.name + ".partial")
    tokenizer.save_pretrained(str(partial))
    partial.rename(cached)
    return tokenizer
