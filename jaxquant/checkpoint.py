"""Quantized checkpoints: an Orbax pytree of arrays plus a JSON sidecar, written atomically.

Layout of a checkpoint folder::

    jaxquant.json   version, model config, recipe, each parameter's format metadata and checksum
    params/         Orbax pytree {name: array | {field: array}} (numpy, codes as int32/uint8/uint16)
    tokenizer/      tokenizer files, when a tokenizer was given

The folder is assembled beside its destination and renamed into place (``atomic_folder``), and the
sidecar is written last, so an interrupted save never leaves a folder that loads as a valid checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import warnings
from typing import Any

import jax
import numpy as np

from jaxquant.atomic import atomic_folder
from jaxquant.formats.base import FORMATS, QuantizedWeight
from jaxquant.model.config import LlamaConfig
from jaxquant.model.llama import Llama
from jaxquant.model.load import CHECKPOINT_MARKER
from jaxquant.model.params import model_from_params, named_params

VERSION = 1


def save(model: Llama, path: str | os.PathLike, *, tokenizer: Any = None, recipe: dict | None = None) -> pathlib.Path:
    """Write ``model`` (dense or quantized) to the folder ``path``, replacing it atomically."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).expanduser().resolve()
    with atomic_folder(path) as tmp:
        tree, params_meta = {}, {}
        for name, value in named_params(model).items():
            if isinstance(value, QuantizedWeight):
                leaves = {f: np.asarray(v) for f, v in value.arrays().items()}
                params_meta[name] = {**value.static_metadata(), "sha256": _digest(leaves)}
                tree[name] = leaves
            else:
                tree[name] = np.asarray(value)
                params_meta[name] = {"format": "dense", "sha256": _digest({"": tree[name]})}
        ocp.PyTreeCheckpointer().save(tmp / "params", tree)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        sidecar = {"jaxquant_checkpoint_version": VERSION, "config": model.config.to_hf(),
                   "recipe": recipe or {}, "params": params_meta}
        (tmp / CHECKPOINT_MARKER).write_text(json.dumps(sidecar, indent=1))
    return path


def shard_rows(mesh: jax.sharding.Mesh, axis: str = "model"):
    """A ``sharding`` for ``load``: every array whose leading dimension divides evenly over the mesh
    axis is split along it (output rows of weights, codes, scales); everything else is replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    size = mesh.shape[axis]

    def sharding(name: str, array) -> NamedSharding:
        split = array.ndim >= 1 and array.shape[0] % size == 0
        return NamedSharding(mesh, PartitionSpec(axis) if split else PartitionSpec())

    return sharding


def load(path: str | os.PathLike, *, verify: bool = True, sharding=None) -> Llama:
    """The model saved at ``path``; checksums verified unless ``verify=False``.

    ``sharding(name, array) -> jax.sharding.Sharding`` places every array leaf (e.g. ``shard_rows(mesh)``);
    without it arrays stay on the host."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).expanduser().resolve()
    sidecar = read_sidecar(path)
    cfg = LlamaConfig.from_hf(sidecar["config"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ocp.PyTreeCheckpointer().restore(path / "params")
    params = {}
    for name, meta in sidecar["params"].items():
        if name not in tree:
            raise ValueError(f"{path}: checkpoint lacks tensor {name}")
        leaves = tree[name] if isinstance(tree[name], dict) else {"": tree[name]}
        leaves = {f: np.asarray(v) for f, v in leaves.items()}
        if verify and _digest(leaves) != meta["sha256"]:
            raise ValueError(f"{path}: checksum mismatch for {name}: the checkpoint is corrupt")
        if meta["format"] == "dense":
            params[name] = leaves[""]
        elif meta["format"] in FORMATS:
            params[name] = FORMATS[meta["format"]].from_leaves(meta, leaves)
        else:
            raise ValueError(f"{path}: tensor {name} has unknown format {meta['format']!r}; "
                             f"known: {sorted(FORMATS)} (is the method's module imported?)")
    if sharding is not None:
        params = {name: jax.tree.map(lambda a, n=name: jax.device_put(a, sharding(n, a)), value)
                  for name, value in params.items()}
    return model_from_params(cfg, params, source=str(path))


def read_sidecar(path: pathlib.Path) -> dict:
    marker = path / CHECKPOINT_MARKER
    if not marker.exists():
        raise FileNotFoundError(f"{path}: not a jaxquant checkpoint (no {CHECKPOINT_MARKER})")
    try:
        sidecar = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{marker}: corrupt sidecar ({e})") from e
    version = sidecar.get("jaxquant_checkpoint_version")
    if version != VERSION:
        raise ValueError(f"{path}: checkpoint version {version!r}, this jaxquant reads version {VERSION}")
    return sidecar


def _digest(leaves: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for field in sorted(leaves):
        a = np.ascontiguousarray(jax.device_get(leaves[field]))
        h.update(f"{field}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()
