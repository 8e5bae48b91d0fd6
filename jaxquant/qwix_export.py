"""Scalar formats as qwix ``QArray`` pytrees (the layout MaxText / tpu-inference style stacks load).

qwix dequantizes ``(qvalue - zero_point) * scale`` with an integer zero point of qvalue's dtype and
scales that tile the array, so a ``ScalarQuantized`` exports exactly when its groups run along the
input axis without row padding and its zeros are whole numbers (RTN with ``round_zero=True``,
symmetric GPTQ, HQQ at 4 bits); anything else is refused with the reason.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxquant.formats import packing
from jaxquant.formats.scalar import ScalarQuantized


def to_qarray(qw: ScalarQuantized, *, transpose: bool = False):
    """A qwix ``QArray`` equal to ``qw`` (``[out, in]``, or ``[in, out]`` with ``transpose``)."""
    from qwix._src.core.qarray import QArray

    if not isinstance(qw, ScalarQuantized) or qw.axis != 1 or qw.shape[1] % qw.group_size:
        raise ValueError("qwix export needs a ScalarQuantized weight grouped along inputs, group size dividing "
                         f"the width (got {type(qw).__name__}, axis {getattr(qw, 'axis', None)}, "
                         f"group {getattr(qw, 'group_size', None)}, shape {qw.shape})")
    zero = np.asarray(qw.zero, np.float32)
    if not np.array_equal(zero, np.round(zero)):
        raise ValueError("qwix needs whole-number zero points; quantize with round_zero=True or a symmetric grid")
    qtype = jnp.uint4 if qw.bits <= 4 else jnp.uint8
    out, n = qw.shape
    codes = packing.unpack(qw.codes, qw.bits, n).astype(qtype)
    scale = jnp.asarray(qw.scale).reshape(out, n // qw.group_size)
    zero = jnp.asarray(zero).reshape(out, n // qw.group_size).astype(qtype)
    if transpose:
        codes, scale, zero = codes.T, scale.T, zero.T
    return QArray(qvalue=codes, scale=scale, zero_point=zero, qtype=qtype)


def from_qarray(qa, *, bits: int, transpose: bool = False) -> ScalarQuantized:
    """Inverse of ``to_qarray`` (``bits``: the code width to pack, at most qa's storage width)."""
    codes, scale, zero = qa.qvalue, qa.scale, qa.zero_point
    if transpose:
        codes, scale, zero = codes.T, scale.T, zero.T
    out, n = codes.shape
    group = n // scale.shape[1]
    return ScalarQuantized(packing.pack(codes.astype(jnp.uint32), bits), scale.reshape(-1, 1).astype(jnp.float16),
                           zero.reshape(-1, 1).astype(jnp.float16), (out, n), bits, group)
