"""Batch engine: exact agreement with jp.generate, paged cache contents, scheduling paths."""

import numpy as np
import pytest
from flax import nnx

import jaxprefill as jp
from jaxprefill.infer import Engine, EngineConfig, Request
from jaxprefill.infer.paged_cache import PageAllocator, gather_view
from jaxprefill.infer.scheduler import pack_rows
from jaxprefill.models import KVCache

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ").split()


@pytest.fixture(scope="module")
def smol():
    return jp.load("smollm2-135m-instruct")


def token_prompts(tokenizer, lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = tokenizer.encode(" ".join(rng.choice(FILLER, size=n + 5)), add_special_tokens=False)
        out.append(ids[:n])
    assert [len(p) for p in out] == list(lengths)
    return out


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([30, 50, 20, 64, 10, 40], width=64, max_rows=3)
    assert rows == [[3], [1, 4], [5, 2]]  # 64 | 50+10 | 40+20; 30 waits for the next step
    assert pack_rows([5, 6], width=64, max_rows=4, pack=False) == [[1], [0]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([65], width=64, max_rows=1)


def test_page_allocator():
    a = PageAllocator(5)
    got = a.allocate(3)
    assert 0 not in got and len(set(got)) == 3 and a.num_free == 1
    assert a.allocate(2) is None and a.num_free == 1  # all or nothing
    a.free(got)
    assert a.num_free == 4
    with pytest.raises(ValueError):
        a.free([0])


def test_engine_equals_generate_on_every_path(smol):
    """16 prompts: packed rows, chunked prompts (> 64 tokens), page boundaries (16-token pages),
    more requests than slots (continuous refill), and a request with its own sampling."""
    model, tokenizer = smol
    lengths = [3, 17, 64, 65, 100, 130, 7, 31, 16, 33, 90, 5, 48, 12, 150, 1]
    prompts = token_prompts(tokenizer, lengths)
    config = EngineConfig(max_batch=4, prefill_tokens=64, prefill_rows=2, page_size=16,
                          num_pages=64, max_new_tokens=6, bucket=256, chat=False)
    engine = Engine(model, tokenizer, config)
    reqs = [Request(id=str(i), prompt=p) for i, p in enumerate(prompts)]
    reqs[3].temperature, reqs[3].seed, reqs[3].top_p = 0.9, 7, 0.95  # a sampled one
    results = engine.generate(reqs)
    assert engine.stats["packed_rows"] > 0 and engine.stats["chunk_rows"] > 0
    assert engine.allocator.num_free == config.num_pages - 1  # every page came back
    # One batched jp.generate call for the greedy prompts (batched == alone is tested in
    # test_smollm2.py) and one for the sampled prompt: few compilations on the CPU.
    greedy = [i for i, r in enumerate(reqs) if r.temperature is None]
    expected = dict(zip(greedy, jp.generate(model, tokenizer, [prompts[i] for i in greedy],
                                            max_new_tokens=config.max_new_tokens)))
    expected[3] = jp.generate(model, tokenizer, [prompts[3]], max_new_tokens=config.max_new_tokens,
                              temperature=0.9, top_p=0.95, seed=7)[0]
    for i, res in enumerate(results):
        assert res.tokens == expected[i].tokens, (i, len(prompts[i]))
        assert res.finish_reason == expected[i].finish_reason
        assert res.prompt_tokens == len(prompts[i]) and res.ttft_s > 0


def test_prepacked_cache_equals_unpacked_prefill(smol):
    """Cache pages written by a packed prefill row hold exactly what a plain prefill computes."""
    model, tokenizer = smol
    prompts = token_prompts(tokenizer, [20, 9, 33], seed=1)
    config = EngineConfig(max_batch=4, prefill_tokens=64, prefill_rows=1, page_size=16,
                          num_pages=16, max_new_tokens=2, bucket=256, chat=False)
    engine = Engine(model, tokenizer, config)
    seqs = [engine.prepare(Request(id=str(i), prompt=p)) for i, p in enumerate(prompts)]
    slots = [None] * config.max_batch
    engine._admit(list(seqs), slots)
    engine._prefill(seqs)
    assert engine.stats["packed_rows"] == 1  # all three shared one row
    for s in seqs:
        n = len(s.ids)
        view = gather_view(engine.cache, np.asarray([s.pages]))
        _, ref = model.forward(np.asarray([s.ids], np.int32),
                               cache=KVCache.zeros(model.config, 1, n, model.dtype))
        for layer in (0, model.config.num_layers - 1):
            np.testing.assert_allclose(np.asarray(view.k[layer][0, :n]), np.asarray(ref.k[layer][0]),
                                       rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(np.asarray(view.v[layer][0, :n]), np.asarray(ref.v[layer][0]),
                                       rtol=2e-5, atol=2e-5)


def test_engine_rejects_bad_requests(smol):
    model, tokenizer = smol
    engine = Engine(model, tokenizer, EngineConfig(max_batch=2, prefill_tokens=64, page_size=16,
                                                   num_pages=8, bucket=256, max_new_tokens=4))
    with pytest.raises(jp.PromptTooLongError, match="pages"):
        engine.prepare(Request(id="big", prompt=list(range(1, 200))))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.prepare(Request(id="e", prompt=[]))
    errors = []
    out = []
    engine.run([Request(id="ok", prompt="Hi"), Request(id="big", prompt=list(range(1, 200)))],
               out.append, on_error=lambda r, e: errors.append((r.id, str(e))))
    assert [r.id for r in out] == ["ok"] and errors[0][0] == "big"


def test_an_interrupted_run_gives_its_pages_back():
    """An exception in the middle of a run (here from on_result; SIGTERM in a job is the same)
    frees the pages of the requests in flight, so the engine can be used again."""
    cfg = jp.ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         max_position_embeddings=512, tie_word_embeddings=True)
    engine = Engine(jp.Llama(cfg, rngs=nnx.Rngs(0)), None,
                    EngineConfig(max_batch=3, prefill_tokens=64, page_size=16, num_pages=16,
                                 bucket=256, max_new_tokens=3, chat=False))
    full = engine.allocator.num_free

    def stop(result):
        raise KeyboardInterrupt

    rng = np.random.default_rng(0)
    reqs = [Request(id=str(i), prompt=rng.integers(1, 97, n).tolist())
            for i, n in enumerate([9, 20, 33])]
    with pytest.raises(KeyboardInterrupt):
        engine.run(reqs, stop)
    assert engine.allocator.num_free == full
    out = []
    engine.run(reqs, out.append)  # usable again
    assert sorted(r.id for r in out) == ["0", "1", "2"]


def test_page_slots_match_the_per_position_formula():
    from jaxprefill.infer.engine import page_slots
    rng = np.random.default_rng(0)
    for page_size in (1, 16, 64):
        pages = rng.permutation(50)[:7].tolist()
        pos = np.arange(len(pages) * page_size)
        want = np.asarray(pages)[pos // page_size] * page_size + pos % page_size
        got = page_slots(pages, page_size)
        assert got.dtype == np.int32 and np.array_equal(got, want)
