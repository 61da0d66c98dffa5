"""scripts.common.synthetic_weights: random Llama weights with local attention by
construction (for speed runs where plain random weights make every policy dense)."""

import jax.numpy as jnp
import numpy as np

from jaxprefill import sparse
from jaxprefill.eval.probe import layer_qkv
from scripts.benchmarks.bench_sparse_ttft_gpu import llama3_8b_shapes
from scripts.common.synthetic_weights import local_mass, random_llama


def test_local_weights_concentrate_attention_near_the_query_in_every_layer():
    cfg = llama3_8b_shapes(2, tiny=True)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (1, 1024)),
                         jnp.int32)
    plain, _ = random_llama(cfg, jnp.float32, "random")
    local, what = random_llama(cfg, jnp.float32, "local")
    assert "local attention" in what
    # plain random weights: about the uniform share of the last 128 of ~770 visible keys
    assert local_mass(plain, tokens, 128) < 0.25
    assert local_mass(local, tokens, 128) > 0.7
    policy = sparse.get("xattention", block_size=64, stride=8, key_columns=0)
    dens = {name: [float(policy.build(q, k).density()) for _, q, k, _ in layer_qkv(m, tokens)]
            for name, m in (("plain", plain), ("local", local))}
    # random weights: every causal block (16 x 17 / 2 of 16 x 16); local ones: fewer, in
    # every layer (0.27-0.45 over the seeds tried: the tiny model's 8 RoPE frequencies make a
    # blunter window than a 128-wide head's 64)
    assert min(dens["plain"]) > 0.5 and max(dens["local"]) < 0.47
