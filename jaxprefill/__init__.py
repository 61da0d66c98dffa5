"""jaxprefill: fast long-context LLM prefill in JAX.

    import jaxprefill as jp
    model, tokenizer = jp.load("smollm2-135m-instruct")
    outs = jp.generate(model, tokenizer, ["What is the capital of France?"], chat=True)
"""

from jaxprefill.attention import AttentionSpec, attend
from jaxprefill.config import ConfigError, MLAConfig, ModelConfig, RopeConfig
from jaxprefill.generate import GenerationResult, PromptTooLongError, generate
from jaxprefill.loading import BUNDLED_MODELS, WeightError, load
from jaxprefill.models import DeepSeek, KVCache, Llama, MLACache
from jaxprefill import sparse
from jaxprefill.sharding import make_mesh
from pallas_kernels import BlockSparseLayout, SegmentIds, block_sparse_attention

__version__ = "0.1.0"

__all__ = [
    "AttentionSpec", "BUNDLED_MODELS", "ConfigError", "GenerationResult", "KVCache", "Llama",
    "ModelConfig", "PromptTooLongError", "RopeConfig", "WeightError", "attend", "generate", "load",
    "make_mesh", "BlockSparseLayout", "SegmentIds", "block_sparse_attention", "DeepSeek",
    "MLACache", "MLAConfig", "sparse",
]
