"""CUDA sources, their build and their jax.ffi registration. Imports nothing of jaxquant."""
