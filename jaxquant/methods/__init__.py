"""Quantization methods. Each module registers itself; a new method is a new file plus a line here."""
from jaxquant.methods.registry import METHODS, Method, config_from_dict, config_to_dict, method_of
from jaxquant.methods.gptq import GPTQConfig
from jaxquant.methods.gptvq import GPTVQConfig
from jaxquant.methods.hqq import HQQConfig
from jaxquant.methods.qtip import QTIPConfig
from jaxquant.methods.quip_sharp import QuIPSharpConfig
from jaxquant.methods.rtn import RTNConfig

__all__ = ["METHODS", "GPTQConfig", "GPTVQConfig", "HQQConfig", "Method", "QTIPConfig", "QuIPSharpConfig", "RTNConfig", "config_from_dict", "config_to_dict",
           "method_of"]
