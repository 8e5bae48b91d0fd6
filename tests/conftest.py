import os
import pathlib

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> pathlib.Path:
    """The default model's GGUF (downloaded once into the jaxquant cache)."""
    from jaxquant.model.hub import resolve_alias

    return resolve_alias("smollm2-135m")


@pytest.fixture(scope="session")
def wikitext_dir() -> pathlib.Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _printed_seeds(monkeypatch):
    """Tests draw fresh random inputs with ``np.random.default_rng()``: each unseeded call prints the
    seed it drew, so a failure's captured output says how to replay it."""
    seeded = np.random.default_rng

    def default_rng(seed=None):
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**63)
            print(f"seed {seed}")
        return seeded(seed)

    monkeypatch.setattr(np.random, "default_rng", default_rng)
