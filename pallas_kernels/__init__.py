"""Pallas GPU kernels (Hadamard transform, decode + matvec per format). Imports nothing of jaxquant."""
