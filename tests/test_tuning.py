"""The kernel tuning table: derived from benchmark rows, stored atomically, followed by backend='auto'."""
import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxquant.formats import dispatch, tuning


def _bench(rng, times):
    """A bench_kernels results file: ``times[backend]`` scales random per-shape times."""
    rows = []
    for out, inp in [(4096, 4096), (11008, 4096), (8192, 28672)]:
        base = rng.uniform(10, 100)
        for backend, factor in times.items():
            rows.append(dict(kind="matvec", model="m", out=out, inp=inp, bits=4, batch=1, backend=backend,
                             config={}, us=base * factor * rng.uniform(0.95, 1.05)))
            rows.append(dict(kind="matvec", model="m", out=out, inp=inp, bits=4, batch=1, backend=backend,
                             config={"rows_per_warp": 2}, us=1e-3))  # a sweep row: never the automatic choice
    rows.append(dict(kind="vq", out=8192, inp=8192, bits=2, batch=1, format="e8p", backend="linear-cuda", us=5.0))
    rows.append(dict(kind="vq", out=8192, inp=8192, bits=2, batch=1, format="e8p", backend="linear-reference", us=50.0))
    rows.append(dict(kind="matvec", out=8192, inp=8192, bits=2, batch=1, backend="cuda", config={}, error="boom"))
    return {"meta": {"device": "Test GPU"}, "results": rows}


def test_table_picks_the_fastest_backend_on_the_shapes_measured(tmp_path):
    rng = np.random.default_rng()
    fast, slow = rng.permutation(["cuda", "pallas"])
    table = tuning.from_bench(_bench(rng, {fast: 1.0, slow: 2.0, "fp16-xla": 0.5}))
    assert table["device"] == "Test GPU"
    assert table["choices"] == {"scalar/4/1": fast, "e8p/2/1": "cuda"}  # errors and dense rows never count
    path = tuning.write(table, tmp_path / "t.json")
    assert tuning.load(path) == json.loads(path.read_text()) == table
    assert not list(tmp_path.glob("*.tmp"))


def test_a_backend_sharing_no_shape_is_left_out_not_the_batch():
    """Files measured at different shapes: the backend with the fewest shapes and none in common
    with the others drops out, and the batch still gets a choice."""
    rng = np.random.default_rng()
    fast, slow = rng.permutation(["linear-cuda", "linear-pallas"])
    rows = [dict(kind="vq", out=out, inp=4096, bits=2, batch=8, format="e8p", backend=backend,
                 us=factor * rng.uniform(10, 11))
            for out in (4096, 11008) for backend, factor in ((fast, 1.0), (slow, 3.0))]
    rows.append(dict(kind="vq", out=28672, inp=8192, bits=2, batch=8, format="e8p", backend="linear-reference",
                     us=1.0))  # the fastest, but only where nothing else was timed
    assert tuning.from_bench({"results": rows})["choices"] == {"e8p/2/8": tuning.LINEAR_BACKENDS[fast]}


def test_preferred_uses_the_nearest_measured_batch_below(monkeypatch):
    table = {"choices": {"scalar/4/1": "cuda", "scalar/4/8": "pallas", "scalar/4/16": "reference"}}
    monkeypatch.setattr(tuning, "load", lambda path=None: table)
    assert [tuning.preferred("scalar", 4, n) for n in (1, 4, 8, 15, 16)] == ["cuda", "cuda", "pallas", "pallas", "reference"]
    assert tuning.preferred("scalar", 3, 1) is None


def test_auto_follows_the_table_on_a_gpu(monkeypatch):
    from test_kernels import random_scalar

    qw = random_scalar(jax.random.key(0), 64, 256, 4, 64)
    x = jnp.ones((1, 256), jnp.bfloat16)
    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
    monkeypatch.setattr(dispatch, "_cuda_ready", lambda: True)
    for best in ("cuda", "pallas", "reference"):
        monkeypatch.setattr(tuning, "load", lambda path=None, best=best: {"choices": {"scalar/4/1": best}})
        assert dispatch.choose_scalar(qw, x) == best
    monkeypatch.setattr(dispatch, "_cuda_ready", lambda: False)  # the preferred kernel is not built: the other one
    monkeypatch.setattr(tuning, "load", lambda path=None: {"choices": {"scalar/4/1": "cuda"}})
    assert dispatch.choose_scalar(qw, x) == "pallas"


def test_the_stored_table_is_readable_and_names_its_device():
    table = tuning.load()
    assert table["device"] and table["choices"]
    assert set(table["choices"].values()) <= {"cuda", "pallas", "reference"}


def test_bench_tune_command(tmp_path, capsys):
    from jaxquant import cli

    src = tmp_path / "run.json"
    src.write_text(json.dumps(_bench(np.random.default_rng(), {"cuda": 1.0, "pallas": 3.0})))
    cli.main(["bench", "tune", "--from", str(src), "--out", str(tmp_path / "table.json")])
    assert json.loads((tmp_path / "table.json").read_text())["choices"]["scalar/4/1"] == "cuda"
    faster = tmp_path / "run2.json"  # a second run where the Pallas kernel is 100x faster: its times count
    faster.write_text(json.dumps(_bench(np.random.default_rng(), {"pallas": 0.01})))
    cli.main(["bench", "tune", "--from", str(src), str(faster), "--out", str(tmp_path / "table.json")])
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["choices"]["scalar/4/1"] == "pallas" and table["source"] == f"{src} + {faster}"
    with pytest.raises(SystemExit, match="cannot read"):
        cli.main(["bench", "tune", "--from", str(tmp_path / "missing.json"), "--out", str(tmp_path / "t2.json")])


def test_bench_kernels_command_feeds_bench_tune(tmp_path):
    """`jaxquant bench kernels` (its own parser behind the CLI) writes rows that `bench tune` reads."""
    from jaxquant import cli

    run = tmp_path / "run.json"
    cli.main(["bench", "kernels", "--shapes", "32x256", "--bits", "4", "--batch", "2", "--backends", "pallas",
              "--hadamard-n", "--copy-mib", "1", "--json", str(run)])
    rows = json.loads(run.read_text())["results"]
    assert {r["backend"] for r in rows} >= {"fp16-xla", "reference", "pallas"}
    assert all(np.isfinite(r["us"]) and r["rel_err"] < 1e-2 for r in rows)
    cli.main(["bench", "tune", "--from", str(run), "--out", str(tmp_path / "table.json")])
    assert json.loads((tmp_path / "table.json").read_text())["choices"]["scalar/4/2"] in ("pallas", "reference")
