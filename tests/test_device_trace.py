"""Device time from profiler traces (`--clock device` of `bench kernels`, the profile scripts)."""
import gzip
import json

import jax
import numpy as np
import pytest

from jaxquant import device_trace, kernel_bench


def test_busy_time_is_the_length_of_the_union_of_intervals():
    rng = np.random.default_rng()
    starts = rng.integers(0, 1000, 40)
    events = [dict(ts=float(t), dur=float(d)) for t, d in zip(starts, rng.integers(1, 60, 40))]
    covered = np.zeros(1100, bool)  # integer endpoints: a unit grid is exact
    for e in events:
        covered[int(e["ts"]):int(e["ts"] + e["dur"])] = True
    assert device_trace.busy_time(events) == covered.sum()
    assert device_trace.busy_time([]) == 0


def test_device_events_keeps_complete_gpu_events_only(tmp_path):
    meta = [dict(ph="M", name="process_name", pid=1, args=dict(name="/host:CPU")),
            dict(ph="M", name="process_name", pid=7, args=dict(name="/device:GPU:0"))]
    kernels = [dict(ph="X", pid=7, ts=10.0 * i, dur=3.0, name=f"k{i}") for i in range(5)]
    noise = [dict(ph="X", pid=1, ts=0.0, dur=5.0, name="host"), dict(ph="X", pid=7, ts=1.0, dur=0, name="empty"),
             dict(ph="i", pid=7, ts=2.0, name="instant")]
    (tmp_path / "plugins" / "profile").mkdir(parents=True)
    with gzip.open(tmp_path / "plugins" / "profile" / "perfetto_trace.json.gz", "wt") as f:
        json.dump(dict(traceEvents=meta + noise + kernels), f)
    assert device_trace.device_events(str(tmp_path)) == kernels
    with pytest.raises(FileNotFoundError, match="perfetto"):
        device_trace.device_events(str(tmp_path / "plugins" / "none"))


def test_bench_kernels_device_clock_needs_a_gpu():
    if jax.devices()[0].platform == "gpu":
        pytest.skip("on a GPU the device clock is valid")

    with pytest.raises(SystemExit):
        kernel_bench.main(["--clock", "device", "--shapes", "32x256", "--bits", "4", "--hadamard-n"])
