"""jaxquant: extreme weight-only quantization of Llama-family LLMs in JAX."""
from jaxquant.formats import FORMATS, QuantizedWeight, ScalarQuantized
from jaxquant.methods import METHODS, GPTQConfig, GPTVQConfig, HQQConfig, QTIPConfig, QuIPSharpConfig, RTNConfig
from jaxquant.quant import bits_per_weight, dequantize, matmul, quantize_weight

__version__ = "0.1.0"
