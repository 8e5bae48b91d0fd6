"""Text sources and token windows for calibration and evaluation.

A source is a local file (.txt/.raw/.tokens, .jsonl with a "text" field, .parquet with a "text"
column), a dataset name fetched through the ``datasets`` library (``wikitext2``,
``wikitext2-valid``, ``c4``), or ``builtin``: an offline corpus of the Python standard
library's docstrings, so that the main job runs with no hub and no local files.
"""
from __future__ import annotations

import importlib
import inspect
import json
import pathlib

import numpy as np

DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test"),
    "wikitext2-valid": ("wikitext", "wikitext-2-raw-v1", "validation"),
    "c4": ("allenai/c4", "en", "validation"),
}
BUILTIN_MODULES = ("argparse", "collections", "functools", "itertools", "json", "logging", "pathlib",
                   "re", "statistics", "string", "textwrap", "unittest", "inspect", "decimal")


def load_text(source: str | pathlib.Path, *, max_chars: int | None = None) -> str:
    """The text of a file, dataset name or ``builtin``."""
    name = str(source)
    if name in DATASETS:
        text = _dataset_text(*DATASETS[name])
    elif name == "builtin":
        text = builtin_corpus()
    else:
        text = _file_text(pathlib.Path(source).expanduser())
    if not text.strip():
        raise ValueError(f"{source}: no text")
    return text[:max_chars] if max_chars else text


def load_text_with_fallback(source: str | None, *, default: str = "wikitext2") -> tuple[str, str]:
    """(text, what was used): ``source`` if given; else ``default`` via datasets, else ``builtin``."""
    if source:
        return load_text(source), str(source)
    try:
        return load_text(default), default
    except Exception as e:  # no hub, no datasets: stay usable offline
        print(f"note: {default} unavailable ({type(e).__name__}); using the builtin offline corpus")
        return load_text("builtin"), "builtin"


def tokenize(tokenizer, text: str) -> np.ndarray:
    """All tokens of ``text`` as one int32 array (a BOS only if the tokenizer adds one itself)."""
    import transformers

    transformers.logging.set_verbosity_error()  # "sequence longer than model max" is expected here
    return np.asarray(tokenizer(text).input_ids, dtype=np.int32)


def eval_windows(tokens: np.ndarray, ctx: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows ``[n, ctx]`` from the start; the trailing partial window is dropped."""
    n = len(tokens) // ctx
    if n == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}")
    if max_windows:
        n = min(n, max_windows)
    return tokens[: n * ctx].reshape(n, ctx)


def calibration_windows(tokens: np.ndarray, n: int, ctx: int, *, seed: int = 0) -> np.ndarray:
    """``n`` random segments of ``ctx`` tokens (GPTQ's protocol), reproducible from ``seed``."""
    if len(tokens) <= ctx:
        raise ValueError(f"calibration text has {len(tokens)} tokens; need more than ctx={ctx}")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - ctx, size=n)
    return np.stack([tokens[s : s + ctx] for s in starts])


def builtin_corpus() -> str:
    """Docstrings of a fixed list of standard-library modules: English prose available offline."""
    parts = []
    for name in BUILTIN_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if not attr.startswith("_") and getattr(obj, "__module__", None) == name:
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def _file_text(path: pathlib.Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if rows and "text" not in rows[0]:
            raise ValueError(f"{path}: JSON lines have no 'text' field")
        return "\n\n".join(r["text"] for r in rows)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise ValueError(f"{path}: parquet file has no 'text' column")
        return "\n\n".join(table.column("text").to_pylist())
    return path.read_text(encoding="utf-8")


def _hub_reachable() -> bool:
    """False quickly when offline (name resolution fails), so fallbacks cost no retries."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.getaddrinfo("huggingface.co", 443)
        return True
    except OSError:
        return False


def _dataset_text(path: str, name: str, split: str) -> str:
    import datasets

    if not _hub_reachable():
        raise ConnectionError("the Hugging Face hub is not reachable")

    ds = datasets.load_dataset(path, name, split=split)
    return "\n\n".join(ds["text"])
