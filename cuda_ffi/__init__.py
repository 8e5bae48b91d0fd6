"""CUDA sources, their build and their jax.ffi registration. Imports nothing of jaxquant.

``scalar_matvec`` and ``hadamard`` build the library with nvcc on first use (cached) and register
the FFI targets for the CUDA platform; ``CudaFFIUnavailable`` says why they cannot run here.
"""
from cuda_ffi.build import CudaFFIUnavailable, available, compile_library, load
from cuda_ffi.ops import hadamard, scalar_matvec

__all__ = ["CudaFFIUnavailable", "available", "compile_library", "hadamard", "load", "scalar_matvec"]
