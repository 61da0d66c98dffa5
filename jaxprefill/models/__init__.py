"""Model families. `build_model(cfg)` picks the class for a config."""

from jaxprefill.models.llama import KVCache, Llama

__all__ = ["KVCache", "Llama"]
