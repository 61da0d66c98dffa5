"""Engine prefill rows holding one prompt each: a plain causal prompt forward
(`steps.prefill_single`) that equals the packed step (`steps.prefill_packed`), dense and sparse."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprefill as jp
from jaxprefill.attention import dispatch
from jaxprefill.decoding import sparse_graphdef
from jaxprefill.infer import Engine, EngineConfig, steps
from jaxprefill.infer.paged_cache import PagedKVCache
from test_engine_sparse import peaked_tiny_llama

LENGTHS = [61, 40, 50]  # ragged, one prompt per row (40 < min_length: dense); a fourth unused
WIDTH, ROWS, PAGE, PAGES = 64, 4, 16, 24
# n_last 0 and no key columns: the method's own block layout (a 128-query dense tail or 64
# columns would cover these rows).
POLICIES = {
    "dense": None,
    "streaming": {"min_length": 48, "policy": "streaming",
                  "params": {"block_size": 16, "sink": 16, "local": 16}},
    "xattention": {"min_length": 48, "policy": "xattention",
                   "params": {"block_size": 16, "threshold": 0.6, "stride": 4, "n_last": 0,
                              "key_columns": 0}},
}


@pytest.fixture(scope="module")
def model():
    return peaked_tiny_llama()


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(2)
    return [rng.integers(1, 97, n).tolist() for n in LENGTHS]


def batch(prompts):
    """The engine's arrays for rows of one prompt each: tokens, positions, segment ids, slots
    [R, C], lengths [R], last_index [R] (row r's prompt on pages 1 + 4r ..)."""
    tokens = np.zeros((ROWS, WIDTH), np.int32)
    positions = np.zeros((ROWS, WIDTH), np.int32)
    segments = np.zeros((ROWS, WIDTH), np.int32)
    slots = np.full((ROWS, WIDTH), PAGES * PAGE, np.int32)  # out of range: dropped
    lengths = np.ones(ROWS, np.int32)
    last = np.zeros(ROWS, np.int32)
    for r, ids in enumerate(prompts):
        n = len(ids)
        tokens[r, :n], positions[r, :n], segments[r, :n] = ids, np.arange(n), 1
        slots[r, :n] = (1 + 4 * r) * PAGE + np.arange(n)
        lengths[r], last[r] = n, r * WIDTH + n - 1
    return tuple(jnp.asarray(a) for a in (tokens, positions, segments, slots, lengths, last))


def record_calls(monkeypatch) -> dict:
    """Records (at trace time) whether dense calls are mask-free and which sparse kind runs."""
    seen = {"simple": [], "kind": []}
    backend, classify = dispatch.attention_backend, dispatch.sparse_call

    def attention_backend(*a, simple, **kw):
        seen["simple"].append(simple)
        return backend(*a, simple=simple, **kw)

    def sparse_call(*a, **kw):
        call = classify(*a, **kw)
        seen["kind"].append(None if call is None else call.kind)
        return call
    monkeypatch.setattr(dispatch, "attention_backend", attention_backend)
    monkeypatch.setattr(dispatch, "sparse_call", sparse_call)
    return seen


@pytest.mark.parametrize("policy", list(POLICIES))
def test_single_rows_equal_packed_rows(model, prompts, policy, monkeypatch):
    """Same last-token logits (float32, 1e-5), greedy tokens and cache pages from the causal
    prompt forward as from the packed rows with one segment each; the prompt forward runs
    mask-free (dense) or the policy's "prompt" layout (sparse), the packed one the segments."""
    sparse = POLICIES[policy]
    graphdef = sparse_graphdef(model, sparse) if sparse else nnx.graphdef(model)
    state = nnx.state(model)
    tokens, positions, segments, slots, lengths, last = batch(prompts)
    cache = PagedKVCache.zeros(model.config, PAGES, PAGE, jnp.float32)

    def logits_and_cache(fn, graphdef, *args):
        def run(state, cache, *args):
            m = nnx.merge(graphdef, state)
            hidden, new = fn(m, cache, *args)
            return m.logits(hidden), new
        return jax.jit(run)(state, cache, *args)

    seen = record_calls(monkeypatch)
    packed, packed_cache = logits_and_cache(steps.packed_forward, graphdef, tokens, positions,
                                            segments, slots, last)
    packed_seen = {k: list(v) for k, v in seen.items()}
    for calls in seen.values():
        calls.clear()
    single, single_cache = logits_and_cache(steps.single_forward, graphdef, tokens, lengths,
                                            slots, last)
    n = len(prompts)
    np.testing.assert_allclose(np.asarray(single[:n]), np.asarray(packed[:n]), atol=1e-5,
                               rtol=1e-5)
    assert (np.asarray(single[:n]).argmax(-1) == np.asarray(packed[:n]).argmax(-1)).all()
    # the prompts' slots hold the same entries; the single step copies whole pages, so the
    # slots after a prompt's last token in its last page may differ (see write_pages)
    token_slots = np.concatenate([np.asarray(slots)[r, :len(p)] for r, p in enumerate(prompts)])
    owned = np.zeros(PAGES * PAGE, bool)
    owned[(token_slots // PAGE)[:, None] * PAGE + np.arange(PAGE)] = True
    for a, b in zip(single_cache.k + single_cache.v, packed_cache.k + packed_cache.v):
        a, b = np.asarray(a).reshape(PAGES * PAGE, -1), np.asarray(b).reshape(PAGES * PAGE, -1)
        np.testing.assert_allclose(a[token_slots], b[token_slots], atol=1e-5, rtol=1e-5)
        assert not a[~owned].any() and not b[~owned].any()  # no other page was touched
    assert np.abs(np.asarray(single_cache.k[-1])).sum() > 0  # the pages were written
    if sparse is None:
        assert seen["simple"] == [True] * 2 and packed_seen["simple"] == [False] * 2
    else:
        assert seen["kind"] == ["prompt"] * 2 and packed_seen["kind"] == ["packed"] * 2
        dense, _ = logits_and_cache(steps.single_forward, nnx.graphdef(model), tokens, lengths,
                                    slots, last)
        # the policy really is sparse here: it changed the logits
        assert np.abs(np.asarray(dense[:n]) - np.asarray(single[:n])).max() > 1e-3


def packed_only(engine: Engine) -> Engine:
    """The engine with its steps module minus prefill_single: every fresh row runs packed."""
    s = engine.steps
    engine.steps = types.SimpleNamespace(prefill_packed=s.prefill_packed,
                                         prefill_chunk=s.prefill_chunk, decode=s.decode)
    return engine


@pytest.mark.parametrize("policy", ["dense", "streaming"])
def test_engine_single_rows_generate_as_packed(model, prompts, policy):
    """Through the engine: rows of one prompt take prefill_single and complete exactly as the
    packed step does (greedy, 4 new tokens); a step that packs two prompts into a row stays
    on the packed step."""
    config = EngineConfig(max_batch=4, prefill_tokens=WIDTH, prefill_rows=ROWS, page_size=PAGE,
                          num_pages=PAGES, max_new_tokens=4, bucket=128, chat=False,
                          sparse=POLICIES[policy])
    fast = Engine(model, None, config)
    got = [r.tokens for r in fast.generate(prompts)]
    assert fast.stats["single_rows"] == fast.stats["packed_rows"] == len(prompts)
    slow = packed_only(Engine(model, None, config))
    want = [r.tokens for r in slow.generate(prompts)]
    assert slow.stats["single_rows"] == 0 and slow.stats["packed_rows"] == len(prompts)
    assert got == want and all(len(t) == 4 for t in got)
    if policy == "dense":  # rows [61] and [20, 9]: the whole step runs packed
        mixed = Engine(model, None, config)
        mixed.generate([prompts[0], prompts[1][:9], prompts[2][:20]])
        assert mixed.stats["packed_rows"] == 2 and mixed.stats["single_rows"] == 0


def test_the_first_request_compiles_the_program_later_ones_run(model, prompts, caplog):
    """The engine's cache starts committed to the model's device, as the step outputs that
    replace it are: the second request compiles nothing (an uncommitted first cache made the
    first step a program of its own, compiled again on the second request). Weights placed
    on the device, as `jp.load` places them."""
    import logging

    from jaxprefill.infer import Request

    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))

    cfg = EngineConfig(max_batch=1, prefill_tokens=80, prefill_rows=1, page_size=PAGE,
                       num_pages=PAGES + 3, max_seq_len=96, max_new_tokens=1, bucket=80,
                       chat=False)  # shapes no other test compiles
    engine = Engine(model, None, cfg)
    compiles = []
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for i in range(3):
            caplog.clear()
            engine.generate([Request(id=str(i), prompt=prompts[0], max_new_tokens=1)])
            compiles.append(sum("jit(prefill_single)" in r.getMessage() and
                                r.getMessage().startswith("Compiling") for r in caplog.records))
    assert engine.stats["single_rows"] == 3
    assert compiles == [1, 0, 0], compiles


def test_write_pages_equals_token_writes_on_every_token_slot():
    """Whole-page writes (the single-row step) against per-token writes on random entries:
    rows of 37, 64 and 1 tokens and an unused row on 16-token pages. Every token's slot holds
    the same entry; pages a row never reached and the scratch page stay untouched; a row
    width that is not a multiple of the page size is refused."""
    from jaxprefill.infer.paged_cache import write_back, write_pages
    from jaxprefill.models import KVCache

    page, pages, width = 16, 20, 64
    cfg = types.SimpleNamespace(num_kv_heads=2, head_dim=8, num_layers=2)
    lengths = [37, 64, 1, 0]
    slots = np.full((4, width), pages * page, np.int32)
    for r, n in enumerate(lengths):
        own = np.array([3 + 4 * r, 2 + 4 * r, 4 + 4 * r, 1 + 4 * r])[: -(-n // page)]  # unordered
        pos = np.arange(n)
        slots[r, :n] = own[pos // page] * page + pos % page
    rng = np.random.default_rng(0)
    view = KVCache(*(tuple(jnp.asarray(rng.standard_normal((4, width, 2, 8)), jnp.float32)
                           for _ in range(2)) for _ in range(2)))
    pool = PagedKVCache.zeros(cfg, pages, page, jnp.float32)
    pool = PagedKVCache(tuple(a - 7.0 for a in pool.k), tuple(a - 7.0 for a in pool.v))  # poison
    by_token = write_back(pool, view, jnp.broadcast_to(jnp.arange(width), (4, width)),
                          jnp.asarray(slots))
    by_page = write_pages(pool, view, jnp.asarray(slots))
    real = slots[slots < pages * page]
    reached = np.unique(real // page)
    for a, b in zip(by_page.k + by_page.v, by_token.k + by_token.v):
        a, b = np.asarray(a).reshape(pages * page, -1), np.asarray(b).reshape(pages * page, -1)
        np.testing.assert_array_equal(a[real], b[real])
        untouched = ~np.isin(np.arange(pages * page) // page, reached)
        assert (a[untouched] == -7.0).all() and (b[untouched] == -7.0).all()
    assert 0 not in reached
    with pytest.raises(ValueError, match="multiple of the page size"):
        write_pages(pool, KVCache(*(tuple(a[:, :40] for a in t) for t in (view.k, view.v))),
                    jnp.asarray(slots[:, :40]))
