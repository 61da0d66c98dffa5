"""Batch inference: `Engine(model, tokenizer, EngineConfig(...)).generate(prompts)` and JSONL jobs."""

from jaxprefill.infer.config import EngineConfig
from jaxprefill.infer.data_parallel import DataParallelEngine, make_engine
from jaxprefill.infer.engine import Engine, Request, Result

__all__ = ["DataParallelEngine", "Engine", "EngineConfig", "Request", "Result", "make_engine"]
