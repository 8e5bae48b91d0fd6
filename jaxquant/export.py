"""Interchange: a safetensors folder with an HF-style ``quantization_config``, and a pure ``apply``.

Folder layout written by ``export_safetensors``::

    config.json          the HF Llama config plus "quantization_config" (below)
    model.safetensors    dense tensors under HF names; a quantized weight ``W`` is stored as
                         ``W.<field>`` for each of its array fields (codes, scale, zero, ...)
    tokenizer files      when a tokenizer is given

``quantization_config = {"quant_method": "jaxquant", "format_version": 1, "recipe": {...},
"layers": {hf_name: {"format": ..., <static fields>, "tensors": {field: {"dtype", "shape"}}}}}``
documents every stored tensor, so other tools can read the folder without jaxquant. ``load_model``
reads it back to identical weights.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import numpy as np

from jaxquant.atomic import atomic_folder
from jaxquant.formats.base import FORMATS, QuantizedWeight
from jaxquant.model.config import LlamaConfig
from jaxquant.model.llama import Llama
from jaxquant.model.params import model_from_params, named_params

FORMAT_VERSION = 1


def export_safetensors(model: Llama, path: str | os.PathLike, *, tokenizer: Any = None,
                       recipe: dict | None = None) -> pathlib.Path:
    """Write the interchange folder atomically (assembled beside ``path``, then renamed)."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path).expanduser().resolve()
    with atomic_folder(path) as tmp:
        tensors, layers = {}, {}
        for name, value in named_params(model).items():
            hf = _hf_name(name)
            if isinstance(value, QuantizedWeight):
                fields = {f: np.ascontiguousarray(jax.device_get(a)) for f, a in value.arrays().items()}
                layers[hf] = {**value.static_metadata(),
                              "tensors": {f: {"dtype": a.dtype.name, "shape": list(a.shape)} for f, a in fields.items()}}
                tensors.update({f"{hf}.{f}": a for f, a in fields.items()})
            else:
                tensors[hf] = np.ascontiguousarray(jax.device_get(value))
        save_file(tensors, str(tmp / "model.safetensors"))
        config = model.config.to_hf()
        config["quantization_config"] = {"quant_method": "jaxquant", "format_version": FORMAT_VERSION,
                                         "recipe": recipe or {}, "layers": layers}
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))  # last: marks the folder complete
    return path


def regroup_quantized(config: dict, tensors: dict[str, np.ndarray], source: str) -> dict[str, Any]:
    """Inverse of the export's flattening: ``W.<field>`` tensors back into format pytrees."""
    qc = config["quantization_config"]
    if qc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{source}: jaxquant interchange version {qc.get('format_version')!r}, "
                         f"this jaxquant reads {FORMAT_VERSION}")
    out = dict(tensors)
    for hf, meta in qc["layers"].items():
        if meta["format"] not in FORMATS:
            raise ValueError(f"{source}: {hf} has unknown format {meta['format']!r}")
        try:
            leaves = {f: out.pop(f"{hf}.{f}") for f in meta["tensors"]}
        except KeyError as e:
            raise ValueError(f"{source}: missing tensor {e.args[0]}") from None
        out[hf] = FORMATS[meta["format"]].from_leaves(meta, leaves)
    return out


def apply(config: LlamaConfig, params: dict[str, Any], tokens: jax.Array, cache=None, cache_pos=0):
    """Pure forward for serving code: ``params`` is the flat ``{name: array | QuantizedWeight}`` pytree
    (``named_params``; jit-able, shardable), ``tokens [B, T]`` -> ``(logits [B, T, vocab], cache)``."""
    return model_from_params(config, params)(tokens, cache, cache_pos)


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head") else "model." + name
