"""jaxprefill: fast long-context LLM prefill in JAX.

    import jaxprefill as jp
    model, tokenizer = jp.load("smollm2-135m-instruct")
    outs = jp.generate(model, tokenizer, ["What is the capital of France?"], chat=True)
    engine = jp.Engine(model, tokenizer, jp.EngineConfig(max_batch=16))   # batch inference
"""

from jaxprefill.attention import AttentionSpec, attend
from jaxprefill.config import ConfigError, MLAConfig, ModelConfig, RopeConfig
from jaxprefill.generate import GenerationResult, PromptTooLongError, generate
from jaxprefill.infer import Engine, EngineConfig
from jaxprefill.loading import BUNDLED_MODELS, WeightError, load
from jaxprefill.models import DeepSeek, KVCache, Llama, MLACache
from jaxprefill import sparse
from jaxprefill.sharding import make_mesh
from pallas_kernels import BlockSparseLayout, SegmentIds, block_sparse_attention

__version__ = "0.1.0"

__all__ = [
    "AttentionSpec", "BUNDLED_MODELS", "ConfigError", "Engine", "EngineConfig",
    "GenerationResult", "KVCache", "Llama",
    "ModelConfig", "PromptTooLongError", "RopeConfig", "WeightError", "attend", "generate", "load",
    "make_mesh", "BlockSparseLayout", "SegmentIds", "block_sparse_attention", "DeepSeek",
    "MLACache", "MLAConfig", "sparse",
]
