"""Build the CUDA sources with nvcc on first use, cache the shared library, register its FFI targets.

The library lands in ``$JAXQUANT_CUDA_CACHE`` (default ``~/.cache/jaxquant/cuda_ffi``) under a
name that hashes the sources, the flags and the jaxlib FFI headers, so a changed source or a new
jaxlib rebuilds it and concurrent builds never see a half-written file (write, then rename).

Environment: ``JAXQUANT_CUDA_LIBRARY`` (a prebuilt library, e.g. from CMakeLists.txt, used as is),
``JAXQUANT_NVCC`` (compiler, default ``nvcc`` on PATH), ``JAXQUANT_CUDA_ARCHS``
(semicolon-separated compute capabilities, default ``90``; ``80;90`` adds Ampere machine code).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import struct
import subprocess
import tempfile

import jax

SOURCE_DIR = pathlib.Path(__file__).resolve().parent
SOURCES = ("jaxquant_kernels.cu", "decode_attention.cu", "rht_cluster.cu")
HEADERS = ("pdl.h", "rht_cluster.h")  # included by the sources: part of the build's fingerprint
LIBRARY_STEM = "libjaxquant_cuda_ffi"

# FFI target name -> exported handler symbol.
TARGETS = {
    "jaxquant_scalar_matvec": "JaxquantScalarMatvec",
    "jaxquant_scalar_mma": "JaxquantScalarMma",
    "jaxquant_e8p_mma": "JaxquantE8pMma",
    "jaxquant_hadamard": "JaxquantHadamard",
    "jaxquant_hadamard_k": "JaxquantHadamardK",
    "jaxquant_e8p_matvec": "JaxquantE8pMatvec",
    "jaxquant_e8p_matvec_xs": "JaxquantE8pMatvecXs",
    "jaxquant_e8p_linear": "JaxquantE8pLinear",
    "jaxquant_e8p_mlp": "JaxquantE8pMlp",
    "jaxquant_qtip_matvec": "JaxquantQtipMatvec",
    "jaxquant_vq2_matvec": "JaxquantVq2Matvec",
    "jaxquant_decode_attention": "JaxquantDecodeAttention",
    "jaxquant_rht_cluster": "JaxquantRhtCluster",
}


class CudaFFIUnavailable(RuntimeError):
    """No NVIDIA GPU backend, no nvcc, or the build failed: use the jnp reference instead."""


def nvcc_path() -> str | None:
    explicit = os.environ.get("JAXQUANT_NVCC")
    if explicit:
        return explicit if pathlib.Path(explicit).exists() else None
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in ("/usr/local/cuda/bin/nvcc",):
        if pathlib.Path(candidate).exists():
            return candidate
    return None


def archs() -> list[str]:
    spec = os.environ.get("JAXQUANT_CUDA_ARCHS", "90")
    out = [a.strip() for a in spec.replace(",", ";").split(";") if a.strip()]
    for a in out:
        if not a.isdigit():
            raise CudaFFIUnavailable(f"JAXQUANT_CUDA_ARCHS: {a!r} is not a compute capability like 90")
    return out


def nvcc_flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-Wno-return-type", "-lineinfo",
             "--split-compile=0",
             "-diag-suppress", "177,940,2473", f"-I{jax.ffi.include_dir()}"]
    arch_list = archs()
    for a in arch_list:
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    flags.append(f"-gencode=arch=compute_{max(arch_list, key=int)},code=compute_{max(arch_list, key=int)}")
    return flags


def cache_dir() -> pathlib.Path:
    root = os.environ.get("JAXQUANT_CUDA_CACHE")
    return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "jaxquant" / "cuda_ffi"


def _fingerprint(flags: list[str]) -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update((SOURCE_DIR / name).read_bytes())
    h.update(" ".join(flags).encode())
    header = pathlib.Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "ffi.h"
    if header.exists():
        h.update(header.read_bytes())
    return h.hexdigest()[:16]


def compile_library(out_dir: pathlib.Path | None = None, *, force: bool = False) -> pathlib.Path:
    """Compile the sources (unless a cached build exists) and return the library's path."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise CudaFFIUnavailable("nvcc not found (set JAXQUANT_NVCC or put nvcc on PATH): "
                                 "the CUDA kernels cannot be built; the jnp reference still works")
    flags = nvcc_flags()
    out_dir = pathlib.Path(out_dir) if out_dir is not None else cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"{LIBRARY_STEM}-{_fingerprint(flags)}.so"
    if lib.exists() and not force:
        return lib
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    cmd = [nvcc, *flags, *[str(SOURCE_DIR / s) for s in SOURCES], "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CudaFFIUnavailable(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def gpu_platform() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL:
    """Build if needed, load the library and register every FFI target for the CUDA platform.

    Raises ``CudaFFIUnavailable`` with the reason when no NVIDIA GPU backend is present or the
    build fails. Cached: the second call returns the loaded library.
    """
    if not gpu_platform():
        raise CudaFFIUnavailable("no GPU backend in this JAX installation: the CUDA kernels need an NVIDIA GPU")
    prebuilt = os.environ.get("JAXQUANT_CUDA_LIBRARY")
    lib = ctypes.cdll.LoadLibrary(prebuilt or str(compile_library()))
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="CUDA")
    return lib


def available() -> bool:
    """True when the kernels are (or could now be) built and registered on a GPU."""
    try:
        load()
    except CudaFFIUnavailable:
        return False
    return True


def _cubin_text_sizes(data: bytes) -> dict[str, int]:
    """Mangled kernel name -> bytes of its ``.text`` section in one cubin (an ELF64 file)."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    entsize, count, names = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * entsize) for i in range(count)]
    table = headers[names][4]
    sizes = {}
    for name_off, _, _, _, _, size in headers:
        name = data[table + name_off:data.index(b"\0", table + name_off)].decode()
        if name.startswith(".text."):
            sizes[name[6:]] = size
    return sizes


def kernel_code_sizes(source: str, arch: str = "90") -> dict[str, int]:
    """Machine-code bytes per kernel of one of ``SOURCES`` compiled for ``sm_<arch>`` with the build's
    flags (mangled name -> size). In a decode step the weights evict kernel code from L2 between
    layers, so what a call executes is fetched from memory each time (cuda_ffi/NOTES.md, session 15)."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise CudaFFIUnavailable("nvcc not found (set JAXQUANT_NVCC or put nvcc on PATH)")
    flags = [f for f in nvcc_flags() if f not in ("-shared", "-Xcompiler") and not f.startswith(("-fPIC", "-gencode"))]
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "kernels.cubin"
        proc = subprocess.run([nvcc, *flags, f"-arch=sm_{arch}", "-cubin", str(SOURCE_DIR / source), "-o", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise CudaFFIUnavailable(f"nvcc failed on {source}:\n{proc.stderr[-2000:]}")
        return _cubin_text_sizes(out.read_bytes())
