"""Model families. `build_model(cfg)` picks the class for a config."""

from jaxprefill.models.deepseek import DeepSeek, MLACache
from jaxprefill.models.dsa import DSACache, DeepSeekV32
from jaxprefill.models.llama import KVCache, Llama

__all__ = ["DSACache", "DeepSeek", "DeepSeekV32", "KVCache", "Llama", "MLACache"]
