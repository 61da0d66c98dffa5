"""FP8 index keys in DeepSeek-V3.2 caches (`DSAOptions(fp8=True)`): the indexer's keys are
stored as float8 e4m3 values + one float32 scale per key (uint8 rows [..., Di + 4]), and every
path that reads them selects what FP8 scoring selects on the unquantized keys.

  * the packed rows hold exactly `quantize_e4m3`'s values and scales;
  * `index_topk(k8, k_scale=...)` equals `index_topk(k, fp8=True)` (xla, reference, Triton in
    interpret mode), and a scale that does not match the keys is refused;
  * a model's forward over an FP8 cache (prefill, chunk, decode) equals the same model over a
    plain cache with FP8 scoring, logit for logit;
  * the engine (packed rows, chunks, decode) and its TPLA steps give `jp.generate`'s tokens
    with FP8 caches.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprefill as jp
from jaxprefill.infer import Engine, EngineConfig
from jaxprefill.models.dsa import DSACache, DSAOptions, pack_index_keys, unpack_index_keys
from pallas_kernels import dsa_ops
from pallas_kernels.dsa_reference import quantize_e4m3
from tests.dsa_tiny import tiny_v32
from tests.model_steps import cached_step


def fp8_model(**kw):
    model = tiny_v32(**kw)
    model.dsa = DSAOptions(fp8=True)
    return model


def test_packed_rows_hold_the_quantized_keys_and_scales():
    mag = jnp.asarray([1e-3, 1.0, 40.0])[:, None, None]  # scales far from 1 both ways
    k = jax.random.normal(jax.random.key(0), (3, 5, 16)) * mag
    k = k.at[1, 2].set(0.0)  # an all-zero key: scale 1
    rows = pack_index_keys(k)
    assert rows.dtype == jnp.uint8 and rows.shape == (3, 5, 16 + 4)
    k8, scale = unpack_index_keys(rows)
    want8, want_scale = quantize_e4m3(k)
    assert k8.dtype == jnp.float8_e4m3fn and scale.shape == (3, 5)
    np.testing.assert_array_equal(np.asarray(k8, np.float32), np.asarray(want8, np.float32))
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(want_scale))
    assert float(scale[1, 2]) == 1.0
    deq = np.asarray(k8, np.float32) * np.asarray(scale)[..., None]
    amax = np.maximum(np.abs(np.asarray(k)).max(-1, keepdims=True), 1e-30)
    assert np.max(np.abs(deq - np.asarray(k)) / amax) < 0.07  # e4m3: 3 mantissa bits


KERNEL_ARGS = {"xla": {}, "reference": {},
               "triton": dict(interpret=True, chunk=8, config=dict(block_k=16))}


@pytest.mark.parametrize("impl", list(KERNEL_ARGS))
def test_index_topk_on_stored_fp8_keys_equals_fp8_scoring(impl):
    ks = jax.random.split(jax.random.key(1), 3)
    b, s, t, hi, d = 2, 7, 45, 4, 16
    q = jax.random.normal(ks[0], (b, s, hi, d))
    w = jax.random.normal(ks[1], (b, s, hi))
    k = jax.random.normal(ks[2], (b, t, d)) * 3.0
    off = jnp.asarray([20, 38], jnp.int32)
    k8, scale = unpack_index_keys(pack_index_keys(k))
    kw = KERNEL_ARGS[impl]
    got = dsa_ops.index_topk(q, w, k8, 9, q_offset=off, k_scale=scale, impl=impl, **kw)
    want = dsa_ops.index_topk(q, w, k, 9, q_offset=off, fp8=True, impl=impl, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="k_scale"):
        dsa_ops.index_topk(q, w, k, 9, k_scale=scale, impl=impl)  # keys not in FP8
    with pytest.raises(ValueError, match="k_scale"):
        dsa_ops.index_topk(q, w, k8, 9, k_scale=scale[:, :-1], impl=impl)


def test_forward_over_fp8_cache_equals_fp8_scoring_over_plain_cache():
    model = fp8_model(num_layers=2)  # k = 12
    run = cached_step(model)

    b, s0, total = 2, 30, 40
    tokens = jnp.asarray(np.random.default_rng(5).integers(1, 97, (b, total)), jnp.int32)
    caches = {"fp8": DSACache.zeros(model.config, b, 128, **model.cache_options),
              "plain": DSACache.zeros(model.config, b, 128)}
    assert caches["fp8"].index_pages[0].shape == (b * 2, 64, 16 + 4)
    assert caches["fp8"].index_pages[0].dtype == jnp.uint8
    out = {}
    for name, cache in caches.items():
        logits, cache = run(tokens[:, :s0], cache, None)  # sparse prefill (> k)
        got = [np.asarray(logits)]
        for t in range(s0, total - 4):  # decode: the indexer reads the cached keys
            logits, cache = run(tokens[:, t:t + 1], cache, jnp.full((b,), t, jnp.int32))
            got.append(np.asarray(logits))
        logits, cache = run(tokens[:, total - 4:], cache,
                            jnp.full((b,), total - 4, jnp.int32))  # a chunk at an offset
        out[name] = np.concatenate(got + [np.asarray(logits)], axis=1)
        caches[name] = cache
    np.testing.assert_array_equal(out["fp8"], out["plain"])
    # the FP8 pool holds every written token's packed key, as the plain pool holds the key
    packed = caches["fp8"].index_pages[1][caches["fp8"].page_table].reshape(b, -1, 20)[:, :total]
    plain = caches["plain"].index_pages[1][caches["plain"].page_table].reshape(b, -1, 16)[:, :total]
    np.testing.assert_array_equal(np.asarray(packed), np.asarray(pack_index_keys(plain)))
    assert np.asarray(packed).any()


def test_engine_and_tpla_engine_with_fp8_caches_equal_generate():
    model = fp8_model()
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, 97, n).tolist() for n in (70, 5, 33)]  # chunked, packed
    kw = dict(max_batch=2, prefill_tokens=64, prefill_rows=2, page_size=16, num_pages=40,
              max_new_tokens=4, bucket=128, chat=False)
    want = [w.tokens for w in jp.generate(model, None, prompts, max_new_tokens=4)]
    for extra in ({}, {"tpla": {"tensor": 1}}):
        engine = Engine(model, None, EngineConfig(**kw, **extra))
        assert engine.cache.index_pages[0].shape == (40, 16, 16 + 4), extra
        assert engine.cache.index_pages[0].dtype == jnp.uint8, extra
        got = [r.tokens for r in engine.generate(prompts)]
        assert got == want, extra
        assert engine.stats["packed_rows"] > 0 and engine.stats["chunk_rows"] > 0
