"""Model families. `build_model(cfg)` picks the class for a config."""

from jaxprefill.models.deepseek import DeepSeek, MLACache
from jaxprefill.models.llama import KVCache, Llama

__all__ = ["DeepSeek", "KVCache", "Llama", "MLACache"]
