"""jaxquant: extreme weight-only quantization of Llama-family LLMs in JAX."""
from jaxquant.checkpoint import load, save
from jaxquant.evaluate import perplexity
from jaxquant.finetune import FinetuneConfig, add_lora, finetune_block, finetune_model, merge_lora
from jaxquant.formats import FORMATS, QuantizedWeight, ScalarQuantized
from jaxquant.methods import METHODS, GPTQConfig, GPTVQConfig, HQQConfig, QTIPConfig, QuIPSharpConfig, RTNConfig
from jaxquant.model.fuse import fuse_linears
from jaxquant.model.load import load_model, load_tokenizer
from jaxquant.pipeline import Rule, quantize_model
from jaxquant.quant import bits_per_weight, dequantize, matmul, quantize_weight

__version__ = "0.1.0"
