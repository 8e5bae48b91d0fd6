"""A checkpoint restored onto a mesh of 8 simulated CPU devices: sharded leaves, the same logits."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax, jax.numpy as jnp
    sys.path.insert(0, sys.argv[2])
    import jaxquant as jq
    from helpers import random_params, tiny_config
    from jaxquant import checkpoint
    from jaxquant.model.params import model_from_params, named_params
    from jaxquant.pipeline import quantize_model
    assert jax.device_count() == 8
    cfg = tiny_config()
    model = model_from_params(cfg, random_params(cfg, seed=int(sys.argv[3])))
    qmodel = quantize_model(model, jq.RTNConfig(bits=4, group_size=32))
    path = checkpoint.save(qmodel, sys.argv[1])
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("model",))
    loaded = checkpoint.load(path, sharding=checkpoint.shard_rows(mesh))
    codes = named_params(loaded)["layers.0.mlp.up_proj.weight"].codes
    assert len(codes.sharding.device_set) == 8 and codes.addressable_shards[0].data.shape[0] == codes.shape[0] // 8
    norm = named_params(loaded)["norm.weight"]
    assert norm.sharding.spec[0] == "model"
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)))
    a, _ = jax.jit(lambda t: loaded(t))(tokens)
    b, _ = qmodel(tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    print("ok")
""")


@pytest.mark.multidevice
def test_restore_onto_a_mesh(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    seed = str(int.from_bytes(os.urandom(2), "little"))
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ck"), tests_dir, seed],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
