"""Pallas GPU kernels (Hadamard transform, decode + matvec per format). Imports nothing of jaxquant.

All use the Triton lowering: the decode kernels load code-stream words and table entries at
computed positions (loads with index arrays), which it supports; Mosaic GPU versions were not
attempted. ``interpret=True`` runs them anywhere (the CPU tests).

``scalar_matvec``: decode-matvec of the packed scalar format (2/4/8 bits);
``scalar_matmul``: the same format for 2-16 rows of 16-bit x on tensor cores (``plan_tc``: its tiles);
``qtip_matvec``: QTIP trellis decode-matvec (1MAD, 3INST, HYB; k = 2, 3, 4) in the rotated domain;
``e8p_matvec``: QuIP# E8P / E8P-RVQ4 decode-matvec in the rotated domain (``e8p_table``: its table);
``e8p_matmul``: the same for up to 16 rows of x on tensor cores (``e8p_product``: the one of the two
the Pallas QuIP# linear calls);
``vq_matvec``: GPTVQ decode-matvec (D = 1, 2, 4; 1-16 index bits; optional block scales);
``hadamard``: Walsh-Hadamard transform of a power-of-two last axis, optional signs, 1/sqrt(n).
"""
from pallas_kernels.e8p_matvec import e8p_matmul, e8p_matvec, e8p_product, e8p_table
from pallas_kernels.hadamard import hadamard
from pallas_kernels.qtip_matvec import qtip_matvec
from pallas_kernels.scalar_matmul import plan_tc, scalar_matmul
from pallas_kernels.scalar_matvec import SUPPORTED_BITS, plan, scalar_matvec
from pallas_kernels.vq_matvec import vq_matvec

__all__ = ["SUPPORTED_BITS", "e8p_matmul", "e8p_matvec", "e8p_product", "e8p_table", "hadamard", "plan", "plan_tc",
           "qtip_matvec", "scalar_matmul", "scalar_matvec", "vq_matvec"]
