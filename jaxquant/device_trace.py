"""Device time from a jax.profiler trace: the kernels a GPU ran, and how long it was busy.

Wall-clock timing of a small kernel measures the host whenever dispatch is slower than the device
(at Llama-7B shapes one E8P call is ~10 µs of GPU work; `bench kernels` rows there varied 2x between
processes while every kernel's own duration stayed within 3%). These helpers read the kernels'
device-side intervals instead.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import tempfile

import jax


def device_events(trace_dir: str) -> list[dict]:
    """Complete ('X') events on GPU streams of the perfetto trace that jax.profiler wrote."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto trace under {trace_dir} (jax.profiler.trace(..., "
                                "create_perfetto_trace=True) writes one)")
    with gzip.open(paths[0]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and e.get("dur", 0) > 0]


def busy_time(events: list[dict]) -> float:
    """Length of the union of the events' intervals (µs): time the device was doing anything."""
    total, end = 0.0, -1.0
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def traced_events(run) -> list[dict]:
    """The device events of ``run()`` (which must wait for its own results), ordered by start."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            run()
        return sorted(device_events(tmp), key=lambda e: e["ts"])
