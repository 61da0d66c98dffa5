"""Engine with MLA models: paged latent cache, packed/chunked prefill, absorbed paged decode."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprefill as jp
from jaxprefill.config import MLAConfig, RopeConfig
from jaxprefill.decoding import sparse_graphdef
from jaxprefill.infer import Engine, EngineConfig, Request
from jaxprefill.mla.latent_cache import PagedLatentCache
from jaxprefill.models.deepseek import DeepSeek

# 64-token prefill rows and 16-token pages: 70, 100, 120 are chunked (and cross pages mid-chunk),
# 64 fills a row exactly, 5 + 17 + 33 pack into rows; 7 requests > 3 slots (continuous refill)
LENGTHS = [5, 70, 33, 64, 100, 17, 120]


def tiny_deepseek_v3() -> DeepSeek:
    cfg = MLAConfig(model_type="deepseek_v3", vocab_size=97, hidden_size=32, intermediate_size=48,
                    num_layers=2, num_heads=4, kv_lora_rank=32, qk_nope_head_dim=8,
                    qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=256, q_lora_rank=16,
                    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    first_k_dense_replace=1, n_shared_experts=1, eos_token_ids=(0,),
                    rope=RopeConfig(type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=1.0,
                                    original_max_position_embeddings=64))
    model = DeepSeek(cfg, rngs=nnx.Rngs(0))
    # larger weights than the 0.02 init: peaked attention and decisive routing, so a wrong
    # cache entry or position changes the greedy tokens
    for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if p[...].ndim >= 2 and path[-1] != "embed":
            p[...] = p[...] * 6.0
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_deepseek_v3()


def test_mla_engine_equals_generate_per_prompt(model):
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, 97, n).tolist() for n in LENGTHS]
    config = EngineConfig(max_batch=3, prefill_tokens=64, prefill_rows=2, page_size=16,
                          num_pages=40, max_new_tokens=7, bucket=64, chat=False)
    engine = Engine(model, None, config)
    assert isinstance(engine.cache, PagedLatentCache)
    assert engine.cache.pages[0].shape == (40, 16, 32 + 8)  # latent pages, no per-head K/V
    results = engine.generate([Request(id=str(i), prompt=p) for i, p in enumerate(prompts)])
    assert engine.stats["packed_rows"] > 0 and engine.stats["chunk_rows"] >= 5
    assert engine.stats["decode_calls"] > 0
    assert engine.allocator.num_free == 39  # every page returned
    for p, r in zip(prompts, results):
        want = jp.generate(model, None, [p], max_new_tokens=7)[0]
        assert r.tokens == want.tokens, (len(p), r.tokens, want.tokens)
        assert r.finish_reason == want.finish_reason


def streaming(local: int) -> dict:
    return {"min_length": 32, "policy": "streaming",
            "params": {"block_size": 16, "sink": 16, "local": local}}


def test_mla_sparse_prefill_in_generate_and_engine(model, monkeypatch):
    """Sparse prefill of MLA models (decompressed Dqk=16 / Dv=8 attention through the
    block-sparse kernel): (a) a window covering every prompt equals dense prefill exactly;
    (b) a narrow streaming window changes the prefill and the engine's greedy tokens (packed rows,
    block-aligned chunks) equal jp.generate with the same policy."""
    import jaxprefill.attention.dispatch as dispatch

    calls = {"prompt": 0, "chunk": 0, "packed": 0}
    real = dispatch.sparse_attend

    def count(q, k, v, cfg, call, share=None):
        calls[call.kind] += 1
        return real(q, k, v, cfg, call, share)

    monkeypatch.setattr(dispatch, "sparse_attend", count)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(1, 97, n).tolist() for n in (150, 40, 70, 9)]
    tokens = jnp.asarray([prompts[0]], jnp.int32)
    dense_h = model.forward(tokens)[0]
    wide_h = nnx.merge(sparse_graphdef(model, streaming(1024)),
                       nnx.state(model)).forward(tokens)[0]
    narrow_h = nnx.merge(sparse_graphdef(model, streaming(32)),
                         nnx.state(model)).forward(tokens)[0]
    assert calls["prompt"] >= 2 * len(model.layers)  # the sparse path really ran
    np.testing.assert_allclose(np.asarray(wide_h), np.asarray(dense_h), rtol=1e-5, atol=1e-5)
    # the narrow window changes the hidden states only past sink + local tokens
    diff = np.abs(np.asarray(narrow_h) - np.asarray(dense_h)).max(axis=-1)[0]
    assert diff[:32].max() < 1e-5 and diff[64:].max() > 1e-3

    config = EngineConfig(max_batch=3, prefill_tokens=64, prefill_rows=2, page_size=16,
                          num_pages=40, max_new_tokens=5, bucket=64, chat=False,
                          sparse=streaming(32))
    engine = Engine(model, None, config)
    got = [r.tokens for r in engine.generate(prompts)]
    assert calls["chunk"] > 0 and engine.stats["chunk_rows"] >= 2
    want = jp.generate(model, None, prompts, max_new_tokens=5, sparse=streaming(32))
    assert got == [r.tokens for r in want]


def test_mla_engine_latent_pages_hold_the_prompt_latents(model):
    """After prefill, each prompt token's latent sits in its page slot (packed and chunked)."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, 97, n).tolist() for n in (40, 90)]
    engine = Engine(model, None, EngineConfig(max_batch=2, prefill_tokens=64, prefill_rows=2,
                                              page_size=16, num_pages=20, max_new_tokens=1,
                                              bucket=64, chat=False))
    seqs = [engine.prepare(Request(id=str(i), prompt=p)) for i, p in enumerate(prompts)]
    slots = [None, None]
    engine._admit(seqs, slots)
    engine._prefill([s for s in slots])  # 40: packed row; 90: first chunk
    engine._prefill([s for s in slots if s.prefilled < len(s.ids)])  # 90: second chunk
    attn, norm = model.layers[0].attn, model.layers[0].attn_norm
    for s in slots:
        ids = jnp.asarray([s.ids], jnp.int32)
        pos = jnp.arange(len(s.ids))[None]
        want = np.asarray(attn.latent(norm(jnp.take(model.embed[...], ids, axis=0)),
                                      *model.rope_tables(pos)))[0]
        pages = np.asarray(engine.cache.pages[0])[np.asarray(s.pages)].reshape(-1, 40)
        np.testing.assert_allclose(pages[:len(s.ids)], want, rtol=1e-5, atol=1e-5)
