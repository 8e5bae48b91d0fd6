"""Scalar weights exported as qwix QArrays dequantize identically and import back bit-exactly."""
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.qwix_export import from_qarray, to_qarray

qarray = pytest.importorskip("qwix._src.core.qarray")


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("transpose", [False, True])
def test_qarray_roundtrip(bits, transpose):
    w = np.random.default_rng().standard_normal((48, 256)).astype(np.float32)
    qw = jq.quantize_weight(w, jq.RTNConfig(bits=bits, group_size=64, round_zero=True))
    qa = to_qarray(qw, transpose=transpose)
    dense = np.asarray(qw.dequantize())
    np.testing.assert_allclose(np.asarray(qarray.dequantize(qa), np.float32), dense.T if transpose else dense,
                               rtol=1e-3, atol=1e-3)  # qwix dequantizes in the scale's dtype (fp16)
    back = from_qarray(qa, bits=bits, transpose=transpose)
    for field, arr in qw.arrays().items():
        np.testing.assert_array_equal(np.asarray(back.arrays()[field]), np.asarray(arr))


def test_fractional_zeros_are_refused():
    w = np.random.default_rng().standard_normal((8, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="round_zero"):
        to_qarray(jq.quantize_weight(w, jq.RTNConfig(bits=4, group_size=32)))
