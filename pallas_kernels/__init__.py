"""Pallas GPU kernels (Hadamard transform, decode + matvec per format). Imports nothing of jaxquant.

``scalar_matvec``: decode-matvec of the packed scalar format (2/4/8 bits), Triton lowering;
``interpret=True`` runs it anywhere (the CPU tests).
"""
from pallas_kernels.scalar_matvec import SUPPORTED_BITS, plan, scalar_matvec

__all__ = ["SUPPORTED_BITS", "plan", "scalar_matvec"]
