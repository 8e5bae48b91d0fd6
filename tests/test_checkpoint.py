"""Checkpoints round-trip bit-exactly; interrupted saves never leave a loadable partial checkpoint."""
import json

import numpy as np
import pytest

import jaxquant as jq
from helpers import random_params, tiny_config
from jaxquant import checkpoint
from jaxquant.model.load import load_model
from jaxquant.model.params import model_from_params, named_params
from jaxquant.pipeline import Rule, quantize_model


@pytest.fixture()
def qmodel():
    cfg = tiny_config()
    model = model_from_params(cfg, random_params(cfg, seed=np.random.SeedSequence().entropy % 2**32))
    return quantize_model(model, jq.RTNConfig(bits=3, group_size=32), rules=[Rule(r"layers\.1\.mlp", None)])


def _assert_identical(a, b):
    pa, pb = named_params(a), named_params(b)
    assert sorted(pa) == sorted(pb)
    for name in pa:
        assert type(pa[name]) is type(pb[name]), name
        if isinstance(pa[name], jq.QuantizedWeight):
            assert pa[name].static_metadata() == pb[name].static_metadata()
            for field, arr in pa[name].arrays().items():
                np.testing.assert_array_equal(np.asarray(arr), np.asarray(pb[name].arrays()[field]))
        else:
            np.testing.assert_array_equal(np.asarray(pa[name]), np.asarray(pb[name]))


def test_roundtrip_bit_exact(tmp_path, qmodel):
    path = checkpoint.save(qmodel, tmp_path / "ck", recipe={"note": "test"})
    loaded = load_model(path)
    _assert_identical(qmodel, loaded)
    assert isinstance(named_params(loaded)["layers.0.mlp.up_proj.weight"], jq.ScalarQuantized)
    assert not isinstance(named_params(loaded)["layers.1.mlp.up_proj.weight"], jq.QuantizedWeight)


def test_interrupted_save_keeps_previous(tmp_path, qmodel, monkeypatch):
    path = checkpoint.save(qmodel, tmp_path / "ck")
    import orbax.checkpoint as ocp

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed midway")

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(qmodel, path)
    _assert_identical(qmodel, checkpoint.load(path))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no partial folder left behind


def test_partial_folder_is_rejected(tmp_path, qmodel):
    path = checkpoint.save(qmodel, tmp_path / "ck")
    (path / "jaxquant.json").unlink()  # what a save killed before its last step looks like
    with pytest.raises((FileNotFoundError, ValueError)):
        load_model(path)


def test_corruption_and_version_are_detected(tmp_path, qmodel):
    path = checkpoint.save(qmodel, tmp_path / "ck")
    sidecar = json.loads((path / "jaxquant.json").read_text())
    sidecar["params"]["norm.weight"]["sha256"] = "0" * 64
    (path / "jaxquant.json").write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match="checksum mismatch for norm.weight"):
        checkpoint.load(path)
    sidecar["jaxquant_checkpoint_version"] = 99
    (path / "jaxquant.json").write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match="version 99"):
        checkpoint.load(path)


def test_quantize_model_leaves_its_input_unchanged():
    cfg = tiny_config()
    model = model_from_params(cfg, random_params(cfg))
    before = named_params(model)
    quantize_model(model, jq.RTNConfig(bits=4, group_size=32))
    after = named_params(model)
    assert all(after[n] is before[n] for n in before)
    quantize_model(model, jq.RTNConfig(bits=2, group_size=32))  # a second recipe on the same model
