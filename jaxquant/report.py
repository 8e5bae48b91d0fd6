"""Summaries of a (partly) quantized model: exact bits per weight, formats used."""
from __future__ import annotations

from collections import Counter

import numpy as np

from jaxquant.formats.base import QuantizedWeight
from jaxquant.model.params import named_params


def summarize(model) -> dict:
    """Bits per weight over the quantized linears, and over all parameters of the model."""
    q_bits = q_count = all_bits = all_count = 0
    formats: Counter = Counter()
    for value in named_params(model).values():
        n = int(np.prod(value.shape))
        if isinstance(value, QuantizedWeight):
            bits = value.bits_per_weight * n
            q_bits, q_count = q_bits + bits, q_count + n
            formats[value.format_name] += 1
        else:
            bits = np.dtype(value.dtype).itemsize * 8 * n
        all_bits, all_count = all_bits + bits, all_count + n
    return {"bits_per_weight": q_bits / q_count if q_count else None,
            "bits_per_param_all": all_bits / all_count, "quantized_layers": dict(formats),
            "quantized_weights": q_count}
