"""A tiny DeepSeek-V3.2 (DSA) model for engine tests, built without torch (cheap to import in a
subprocess)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprefill.config import MLAConfig, RopeConfig
from jaxprefill.models.dsa import DeepSeekV32


def tiny_v32(num_layers: int = 1, index_topk: int = 12) -> DeepSeekV32:
    """float32, 4 heads, d_c 32 + d_r 8, 4 index heads of 16; dense MLPs (compile fast)."""
    cfg = MLAConfig(model_type="deepseek_v32", vocab_size=97, hidden_size=32, intermediate_size=48,
                    num_layers=num_layers, num_heads=4, kv_lora_rank=32, qk_nope_head_dim=8,
                    qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=256,
                    q_lora_rank=16, eos_token_ids=(0,), index_n_heads=4, index_head_dim=16,
                    index_topk=index_topk,
                    rope=RopeConfig(type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=1.0,
                                    original_max_position_embeddings=64))
    # parameters drawn on the host (no compiled or eager init): norms 1, biases 0, weights
    # 0.12 x normal (6x the 0.02 init: peaked attention, so a wrong cache entry, position or
    # selection changes the greedy tokens), embeddings 0.02 x normal
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DeepSeekV32(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if path[-1] == "scale":
            value = np.ones(var.shape, np.float32)
        elif path[-1].endswith("bias"):
            value = np.zeros(var.shape, np.float32)
        else:
            std = 0.02 if path[-1] == "embed" or len(var.shape) < 2 else 0.12
            value = std * rng.standard_normal(var.shape).astype(np.float32)
        flat.append((path, var.replace(jnp.asarray(value, var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))

