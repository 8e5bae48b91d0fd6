"""Worker for tests/test_hessian_distributed.py: offline Hessians of a seeded tiny model on several devices.

    python hessian_worker.py devices OUT SEED              # 8 simulated CPU devices, one process
    python hessian_worker.py process OUT SEED PORT ID      # one of 2 processes x 4 CPU devices (jax.distributed)

The device count is set before JAX's first computation: the parent pytest process keeps its single device.
"""
import os
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import random_params, tiny_config  # noqa: E402


def setup(seed):
    """The model and calibration windows every process (and the reference) builds from ``seed``."""
    from jaxquant.model.params import model_from_params

    cfg = tiny_config(num_hidden_layers=2)
    model = model_from_params(cfg, random_params(cfg, seed=seed))
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (11, 16)).astype(np.int32)
    return model, tokens


def main(mode, out, seed, port=None, pid=None):
    jax.config.update("jax_num_cpu_devices", 8 if mode == "devices" else 4)
    if mode == "process":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=60)
    from jaxquant import hessian as hz

    model, tokens = setup(seed)
    assert len(jax.devices()) == 8, jax.devices()
    if mode == "devices":
        hz.collect_offline(model, tokens, out / "d1", mesh=hz.make_mesh(jax.devices()[:1]), batch_size=1, cond=False)
        hz.collect_offline(model, tokens, out / "d8", mesh=hz.make_mesh(), batch_size=8, cond=False)
        hz.collect_offline(model, tokens, out / "d8o", mesh=hz.make_mesh(), batch_size=8, cond=False, offload=True)
        hz.collect_offline(model, tokens, out / "d4r2", mesh=hz.make_mesh(rows=2), batch_size=8, cond=False)
        x = np.random.default_rng(seed).standard_normal((5000, 24)).astype(np.float32) + 30
        for name, mesh in [("m1", hz.make_mesh(jax.devices()[:1])), ("m8", hz.make_mesh()), ("m2r4", hz.make_mesh(rows=4))]:
            h, mean = hz.moments(x, mesh=mesh, chunk_tokens=256).numpy()
            np.savez(out / f"{name}.npz", h=h, mean=mean)
    else:
        hz.collect_offline(model, tokens, out / "p8", batch_size=8, cond=False)
        hz.collect_offline(model, tokens, out / "p4r2", mesh=hz.make_mesh(rows=2), batch_size=8, cond=False)
        jax.distributed.shutdown()
    print("worker done", mode, jax.process_index(), flush=True)


if __name__ == "__main__":
    mode, out, seed = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])
    main(mode, out, seed, *(sys.argv[4], int(sys.argv[5])) if mode == "process" else ())
