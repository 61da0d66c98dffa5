"""The engine's TPLA decode (`EngineConfig.tpla`) for DeepSeek-V3.2 (DSA) models
(jaxprefill/mla/dsa_tpla_steps.py), on tiny float32 models whose top-k selects a strict subset:

  * g = 1 is the plain DSA engine: the same greedy tokens for prompts above and below k
    (packed rows, chunks, continuous batching, two layers);
  * one decode step equals a float64 reference of "TPLA restricted to the indexer's top-k"
    (`tests/tpla_numpy.py` with the unselected keys masked) at g = 1 and at g = 2, and at g = 2
    differs from exact DSA and from dense TPLA (so a wrong merge or an ignored selection
    fails); a row with at most k keys decodes alike in a sparse batch and alone on the dense
    path;
  * at g = 2 a mix of prompts above and below k gives each prompt the tokens it gets alone;
  * a tensor size that does not divide the latent is refused in one line naming the field.
The g = 2 cases run on 2 fake CPU devices in a subprocess (tests/dsa_tpla_cases.py).
"""

import numpy as np
import pytest

from fake_devices import run_result
from jaxprefill.infer import Engine, EngineConfig
from jaxprefill.mla.dsa_cache import PagedDSACache
from tests.dsa_tiny import tiny_v32

TOL = 1e-5        # float32 rounding, relative to the largest logit
DIFFERENT = 1e-2  # what a real change of the attention does to the logits (measured: >= 0.12)


def test_g1_engine_equals_plain_dsa_engine():
    model = tiny_v32(num_layers=2)  # k = 12
    rng = np.random.default_rng(4)
    # 70: chunked (64-token rows); 5, 33, 9: packed; the prompts of 5 and 9 are below k
    prompts = [rng.integers(1, 97, n).tolist() for n in (70, 5, 33, 9)]
    kw = dict(max_batch=2, prefill_tokens=64, prefill_rows=2, page_size=16, num_pages=40,
              max_new_tokens=5, bucket=128, chat=False)
    plain = [r.tokens for r in Engine(model, None, EngineConfig(**kw)).generate(prompts)]
    engine = Engine(model, None, EngineConfig(**kw, tpla={"tensor": 1}))
    assert isinstance(engine.cache, PagedDSACache)
    assert engine.cache.pages[0].shape == (40, 16, 32 + 8)
    assert engine.cache.index_pages[0].shape == (40, 16, 16)
    got = [r.tokens for r in engine.generate(prompts)]
    assert got == plain
    assert engine.stats["packed_rows"] > 0 and engine.stats["chunk_rows"] > 0
    assert engine.allocator.num_free == 39


def test_decode_step_equals_masked_tpla_reference():
    res = run_result(["-m", "tests.dsa_tpla_cases", "decode"], devices=2)
    for case, got in res.items():  # g1; g2 rope replicated; g2 rope split, logit scale g
        # rows of 31 and 22 keys select 12 (a strict subset); the 9-key row selects all
        assert got["selected"] == [[12, 31], [12, 22], [9, 9]], (case, got)
        assert min(got["gap"]) > 1e-3, (case, got)  # no near-tie at the k-th key
        assert got["vs_reference"] < TOL, (case, got)
        assert got["cache_vs_reference"] < TOL, (case, got)  # every latent and index key
        assert min(got["vs_dense_tpla"]) > DIFFERENT, (case, got)  # the selection matters
        if case == "g1":  # one shard: exact DSA
            assert max(got["vs_exact_dsa"]) < TOL, (case, got)
        else:  # one softmax per shard: TPLA's approximation, not exact DSA
            assert min(got["vs_exact_dsa"]) > DIFFERENT, (case, got)
    # a row of at most k keys: sparse beside long rows = alone on the dense path
    assert res["replicated"]["short_alone_vs_batch"] < TOL, res["replicated"]


def test_g2_engine_mixed_prompt_lengths_as_alone():
    res = run_result(["-m", "tests.dsa_tpla_cases", "mixed"], devices=2)
    assert res["together"] == res["alone"], res
    assert len({tuple(t) for t in res["together"]}) == 5, res  # distinct outputs per prompt
    assert res["stats"]["packed_rows"] > 0 and res["stats"]["chunk_rows"] > 0, res
    assert res["free_pages"] == 63, res
    # each device: half of every latent (16 of 32) + the whole rope key (8); every index key
    assert res["latent_shards"] == [[64, 8, 16 + 8]], res
    assert res["index_shards"] == [[64, 8, 16]], res


def test_index_keys_split_over_devices_select_what_replicated_keys_select():
    res = run_result(["-m", "tests.dsa_tpla_cases", "sharded"], devices=2)
    assert res["step_vs_replicated"] < TOL, res
    assert res["sharded"] == res["replicated"], res
    assert len({tuple(t) for t in res["sharded"]}) == 4, res
    # each device: 4 of every page's 8 slots (sharded) against all 8 (replicated), FP8 rows
    assert res["sharded_shards"] == [[64, 4, 16 + 4]], res
    assert res["replicated_shards"] == [[64, 8, 16 + 4]], res
    assert res["odd_page"] == ("tpla index_keys='sharded' needs tensor=2 to divide page_size "
                               "(9)"), res


def test_tpla_tensor_not_dividing_the_latent_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"tpla tensor=3 must divide the model's "
                                         r"kv_lora_rank \(32\)") as err:
        Engine(tiny_v32(), None, EngineConfig(tpla={"tensor": 3}))
    assert "\n" not in str(err.value)
