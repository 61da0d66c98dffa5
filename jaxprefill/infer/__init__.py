"""Batch inference: `Engine(model, tokenizer, EngineConfig(...)).generate(prompts)` and JSONL jobs."""

from jaxprefill.infer.config import EngineConfig
from jaxprefill.infer.engine import Engine, Request, Result

__all__ = ["Engine", "EngineConfig", "Request", "Result"]
