"""Quantized weight formats (pytrees) and their registry."""
from jaxquant.formats.base import FORMATS, QuantizedWeight, is_quantized, quantized_format, static
from jaxquant.formats.scalar import ScalarQuantized
from jaxquant.formats import lora  # noqa: F401  (registers the "lora" adapter format)

__all__ = ["FORMATS", "QuantizedWeight", "ScalarQuantized", "is_quantized", "quantized_format", "static"]
