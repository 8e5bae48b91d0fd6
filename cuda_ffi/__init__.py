"""CUDA sources, their build and their jax.ffi registration. Imports nothing of jaxquant.

``scalar_matvec`` and ``hadamard`` build the library with nvcc on first use (cached) and register
the FFI targets for the CUDA platform; ``CudaFFIUnavailable`` says why they cannot run here.
"""
from cuda_ffi.build import CudaFFIUnavailable, available, compile_library, load
from cuda_ffi.ops import (decode_attention, e8p_abs_table, e8p_linear, e8p_matvec, e8p_mlp, e8p_mma, e8p_xs_rht_fits,
                          hadamard, hadamard_k, hadamard_k_factor, qtip_matvec, rht_cluster, scalar_matvec, scalar_mma,
                          vq2_matvec)

__all__ = ["CudaFFIUnavailable", "available", "compile_library", "decode_attention", "e8p_abs_table", "e8p_linear",
           "e8p_matvec", "e8p_mlp", "e8p_mma", "e8p_xs_rht_fits", "hadamard", "hadamard_k", "hadamard_k_factor", "load",
           "qtip_matvec", "rht_cluster", "scalar_matvec", "scalar_mma", "vq2_matvec"]
