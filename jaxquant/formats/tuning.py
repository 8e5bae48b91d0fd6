"""The measured kernel choice per format, bits and batch, which ``backend="auto"`` follows on a GPU.

``tuning.json`` beside this file is derived from ``jaxquant bench kernels`` results files: for each
(format, bits, batch) the backend with the lowest geometric-mean time over the shapes measured
(successful rows at the kernels' automatic launch configuration). Refresh it on the device with

    jaxquant bench kernels --json run.json && jaxquant bench tune --from run.json

Formats: ``scalar`` (backends ``cuda``, ``pallas``, ``reference``) and the codebook formats of the
benchmark (``e8p``, ``rvq4``, ``qtip-hyb-k2`` ...; ``cuda``, ``pallas`` or ``reference``, from the
full-linear rows: the transforms around the kernel included).
"""
from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import tempfile
from typing import Any

TABLE = pathlib.Path(__file__).with_name("tuning.json")
SCALAR_BACKENDS = ("cuda", "pallas", "reference")
LINEAR_BACKENDS = {"linear-cuda": "cuda", "linear-pallas": "pallas", "linear-reference": "reference"}


def _rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of a results file: ``{"results": [...]}`` or several runs ``{"runs": {name: {...}}}``."""
    if "runs" in results:
        return [r for run in results["runs"].values() for r in _rows(run)]
    return list(results.get("results", []))


def _candidate(row: dict[str, Any]) -> tuple[str, int, int, str] | None:
    """(format, bits, batch, backend) of a row that can inform the table, else None."""
    if "error" in row or "us" not in row or row.get("config"):
        return None
    if row.get("kind") == "matvec" and row.get("backend") in SCALAR_BACKENDS:
        return "scalar", int(row["bits"]), int(row["batch"]), row["backend"]
    if row.get("kind") == "vq" and row.get("backend") in LINEAR_BACKENDS:
        return row["format"], int(row["bits"]), int(row["batch"]), LINEAR_BACKENDS[row["backend"]]
    return None


def from_bench(results: dict[str, Any]) -> dict[str, Any]:
    """The table of a ``bench_kernels`` results file: ``{"device", "choices": {"fmt/bits/batch": backend}}``.

    Backends are compared on the shapes where all of them were measured, by geometric-mean time; while
    no shape is common to all, the backend measured on the fewest shapes is left out."""
    times: dict[tuple[str, int, int], dict[str, dict[tuple[int, int], float]]] = {}
    device = None
    for row in _rows(results):
        cand = _candidate(row)
        if cand is None:
            continue
        fmt, bits, batch, backend = cand
        shapes = times.setdefault((fmt, bits, batch), {}).setdefault(backend, {})
        shape = (int(row["out"]), int(row["inp"]))
        shapes[shape] = min(shapes.get(shape, math.inf), float(row["us"]))
    if "runs" in results:
        device = next((run.get("meta", {}).get("device") for run in results["runs"].values()), None)
    device = device or results.get("meta", {}).get("device")
    choices = {}
    for (fmt, bits, batch), by_backend in sorted(times.items()):
        common = set.intersection(*(set(s) for s in by_backend.values()))
        while not common and len(by_backend) > 1:
            by_backend = dict(sorted(by_backend.items(), key=lambda kv: len(kv[1]))[1:])
            common = set.intersection(*(set(s) for s in by_backend.values()))
        score = {b: sum(math.log(s[shape]) for shape in common) / len(common) for b, s in by_backend.items()}
        choices[f"{fmt}/{bits}/{batch}"] = min(score, key=score.get)
    return {"device": device, "choices": choices}


def write(table: dict[str, Any], path: str | os.PathLike = TABLE) -> pathlib.Path:
    """Write the table atomically (a crash leaves the old one) and forget the cached copy."""
    path = pathlib.Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(f.name, path)
    load.cache_clear()
    return path


@functools.cache
def load(path: str | os.PathLike = TABLE) -> dict[str, Any]:
    """The stored table; an empty one when the file is missing or unreadable (``auto`` then uses its
    built-in order)."""
    try:
        table = json.loads(pathlib.Path(path).read_text())
        return table if isinstance(table.get("choices"), dict) else {"device": None, "choices": {}}
    except (OSError, ValueError, AttributeError):
        return {"device": None, "choices": {}}


def preferred(fmt: str, bits: int, batch: int) -> str | None:
    """The measured backend for ``fmt`` at ``bits`` and ``batch`` rows of x: the entry of the
    largest measured batch not above ``batch`` (else the smallest measured), or None if unmeasured."""
    measured = {}
    for key, backend in load()["choices"].items():
        f, b, n = key.split("/")
        if f == fmt and int(b) == bits:
            measured[int(n)] = backend
    if not measured:
        return None
    below = [n for n in measured if n <= batch]
    return measured[max(below) if below else min(measured)]
