"""Hessians on several devices equal the 1-device ones: 8 simulated CPU devices, and 2 processes x 4
devices through jax.distributed on localhost. Each configuration runs in fresh subprocesses
(hessian_worker.py), since the device count is fixed when JAX starts."""
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxquant import hessian as hz

WORKER = pathlib.Path(__file__).with_name("hessian_worker.py")
pytestmark = pytest.mark.multidevice


def _seed():
    return int(np.random.SeedSequence().entropy % 2**31)


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def _assert_same(a: pathlib.Path, b: pathlib.Path, layers: int = 2, tol: float = 0.0):
    """Same Hessians and means; ``tol=0``: bit for bit (same windows per device and step, so the same
    partial products; the devices' sums are combined in a fixed order with TwoSum)."""
    ha, hb = hz.stored_hessians(a), hz.stored_hessians(b)
    for i in range(layers):
        for g in hz.GROUP_NAMES:
            x, y = ha(i, g), hb(i, g)
            assert np.abs(x - y).max() <= tol * np.abs(x).max(), (a.name, b.name, i, g, np.abs(x - y).max())
            ma, mb = np.load(a / f"block_{i:04d}" / f"{g}.mean.npy"), np.load(b / f"block_{i:04d}" / f"{g}.mean.npy")
            assert np.abs(ma - mb).max() <= tol * np.abs(ma).max(), (a.name, b.name, i, g)


def test_8_simulated_devices_give_the_1_device_hessians(tmp_path):
    seed = _seed()
    run = subprocess.run([sys.executable, str(WORKER), "devices", str(tmp_path), str(seed)], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_same(tmp_path / "d1", tmp_path / "d8")
    _assert_same(tmp_path / "d1", tmp_path / "d8o")  # activations kept in host memory between steps
    _assert_same(tmp_path / "d1", tmp_path / "d4r2", tol=1e-6)  # rows split over pairs: other matmul shapes
    x = np.random.default_rng(seed).standard_normal((5000, 24)).astype(np.float32) + 30
    ref = x.astype(np.float64).T @ x.astype(np.float64) / len(x)
    for name in ("m1", "m8", "m2r4"):
        got = np.load(tmp_path / f"{name}.npz")
        assert np.abs(got["h"] - ref).max() < 1e-6 * np.abs(ref).max(), name
        np.testing.assert_allclose(got["mean"], x.astype(np.float64).mean(0), rtol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_2_processes_x_4_devices_give_the_1_device_hessians(tmp_path):
    from hessian_worker import setup

    seed, port = _seed(), _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), "process", str(tmp_path), str(seed), str(port), str(i)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    model, tokens = setup(seed)  # the reference in this process: its single CPU device
    hz.collect_offline(model, tokens, tmp_path / "ref", batch_size=1, cond=False)
    _assert_same(tmp_path / "ref", tmp_path / "p8")
    _assert_same(tmp_path / "ref", tmp_path / "p4r2", tol=1e-6)
