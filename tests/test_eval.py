"""Measurement: density / recall / output error against brute force, synthetic tasks, plots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprefill import sparse
from jaxprefill.eval import metrics, plots
from jaxprefill.eval.tasks import TASKS, make_sample
from jaxprefill.validate import InputError


def peaked_tiny_model(num_layers: int, seed: int):
    """A tiny Llama (6 query / 2 KV heads) with weights x6: peaked attention, so a sparse mask
    changes its outputs."""
    import jaxprefill as jp
    from flax import nnx

    from jaxprefill.attention import AttentionSpec

    cfg = jp.ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_layers=num_layers, num_heads=6, num_kv_heads=2, head_dim=8,
                         max_position_embeddings=512, eos_token_ids=(0,))
    model = jp.Llama(cfg, rngs=nnx.Rngs(seed), attention=AttentionSpec(impl="xla"))
    for _, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if p[...].ndim >= 2:
            p[...] = p[...] * 6.0
    return model


def test_recall_density_error_match_bruteforce():
    rng = np.random.default_rng(0)
    b, s, hq, hkv, d, block = 1, 256, 4, 2, 8, 64
    q = rng.standard_normal((b, s, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
    n = s // block
    mask = np.tril(np.ones((n, n), bool))
    mask[3, 1] = mask[2, 1] = False  # drop two blocks
    mask = np.broadcast_to(mask, (b, hkv, n, n))
    rows = np.array([[70, 150, 200, 255]], np.int32)
    st = metrics.head_stats(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, [s], block, rows)
    np.testing.assert_allclose(st.density, 8 / 10)
    for h in range(hq):
        rec, err = [], []
        for i in rows[0]:
            logit = k[0, : i + 1, h // 2] @ q[0, i, h] / np.sqrt(d)
            p = np.exp(logit - logit.max())
            p /= p.sum()
            keep = mask[0, h // 2, i // block][np.arange(i + 1) // block]
            rec.append(p[keep].sum())
            o = p @ v[0, : i + 1, h // 2]
            os_ = (p * keep) @ v[0, : i + 1, h // 2] / p[keep].sum()
            err.append(np.linalg.norm(os_ - o) / np.linalg.norm(o))
        np.testing.assert_allclose(st.recall[h], np.mean(rec), rtol=1e-5)
        np.testing.assert_allclose(st.output_error[h], np.mean(err), rtol=1e-4, atol=1e-6)
    assert st.recall.max() < 1.0  # the dropped blocks hold mass (a test that can fail)
    full = metrics.head_stats(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                              np.broadcast_to(np.tril(np.ones((n, n), bool)), (b, hkv, n, n)),
                              [s], block, rows)
    np.testing.assert_allclose(full.recall, 1.0, rtol=1e-6)
    np.testing.assert_allclose(full.output_error, 0.0, atol=1e-5)
    np.testing.assert_allclose(full.density, 1.0)


def test_sample_rows_cover_the_row_and_end_at_last_token():
    rows = metrics.sample_rows([1000, 300], 16, min_pos=100)
    assert rows.shape == (2, 16) and (rows[:, -1] == [999, 299]).all()
    assert rows.min() >= 100 and rows[0].max() <= 999 and rows[1].max() <= 299


class WordTokenizer:
    """Whitespace 'tokenizer' with the encode_prompt interface of jaxprefill's tokenizer."""

    def encode_prompt(self, messages, chat=True):
        return messages[0]["content"].split()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("kind", ["code", "prose"])
def test_tasks_fit_length_hold_needles_and_score(task, kind):
    tok = WordTokenizer()
    a = make_sample(tok, task, 1500, 0.3, seed=1, haystack=kind)
    assert 1400 <= len(tok.encode_prompt(a.messages)) <= 1500
    text = a.messages[0]["content"]
    assert all(ans in text for ans in a.answers + a.distractors)
    assert a.score(" ".join(a.answers)) == 1.0 and a.score("no idea") == 0.0
    assert a.partial(a.answers[0]) == 1 / len(a.answers)
    if a.distractors:  # naming another key's number / another person's fact is wrong
        assert a.score(" ".join(a.answers + a.distractors[:1])) == 0.0
    b = make_sample(tok, task, 1500, 0.3, seed=1, haystack=kind)
    assert b.messages == a.messages  # deterministic
    c = make_sample(tok, task, 1500, 0.9, seed=2, haystack=kind)
    assert c.messages != a.messages
    assert make_sample(tok, task, 1500, 0.3, seed=1, split="test",
                       haystack=kind).messages != a.messages
    if task == "cwe":  # no needle: 10 words repeated, the rest once
        words = text.split()
        assert a.depth is None and all(words.count(w) == 2 for w in a.answers)
        return
    assert a.haystack == ("prose" if task == "qa" else kind)
    first = a.answers[0] if task != "vt" else f"VAR {a.answers[0]} ="
    # Depth 0.3: the (first) needle sits about 30% into the haystack.
    pos = text.find(first) / len(text)
    assert 0.15 < pos < 0.45, pos


class BatchWordTokenizer(WordTokenizer):
    """WordTokenizer with a batch encoder that records its batch sizes."""

    def __init__(self):
        self.batches = []

    def encode_prompts(self, prompts, chat=True):
        self.batches.append(len(prompts))
        return [self.encode_prompt(p) for p in prompts]


def test_make_samples_equals_make_sample_and_batches_its_counts():
    from jaxprefill.eval.tasks import build_prompts, make_samples

    reqs = [(task, n, None if task == "cwe" else d, seed, split, kind)
            for task in TASKS for n, d, seed, split, kind in
            ((1500, 0.3, 1, "dev", "code"), (2500, 0.9, 2, "test", "prose"))]
    want = [make_sample(WordTokenizer(), *r) for r in reqs]
    tok = BatchWordTokenizer()
    got = make_samples(tok, reqs)
    assert [g.messages for g in got] == [w.messages for w in want]
    assert [(g.task, g.answers, g.depth) for g in got] == [(w.task, w.answers, w.depth)
                                                           for w in want]
    assert tok.batches[0] == len(reqs) and len(tok.batches) < 12  # rounds, not prompts
    pairs = build_prompts(BatchWordTokenizer(), reqs)
    assert [ids for _, ids in pairs] == [tok.encode_prompt(w.messages) for w in want]
    assert [s.messages for s in make_samples(WordTokenizer(), reqs[:3])] == \
        [w.messages for w in want[:3]]  # without a batch encoder: one call per probe
    with pytest.raises(InputError, match="too short"):
        make_samples(tok, [("passkey", 10, 0.5, 0, "dev", "code")])


def test_fit_finds_the_largest_unit_count_that_fits():
    """tasks._fit (how many haystack units a prompt holds) against brute force on random
    non-decreasing token counts: the same answer, its errors, and fewer calls than bisection."""
    import random

    from jaxprefill.eval import tasks

    def drive(fit, count):  # the search is a generator: send it each yielded size's count
        m = next(fit)
        while True:
            try:
                m = fit.send(count(m))
            except StopIteration as stop:
                return stop.value

    rng = random.Random(0)
    calls = 0
    for _ in range(400):
        limit = rng.randint(1, 4000)
        cum = [rng.randint(0, 50)]
        for _ in range(limit):
            cum.append(cum[-1] + rng.choice([0, 1, 3, 8, 12, 40]))
        length = rng.randint(cum[0], cum[-1] + 10)
        n = [0]

        def count(m, n=n):
            n[0] += 1
            return cum[m]

        if cum[-1] <= length:
            with pytest.raises(InputError, match="needs more than"):
                drive(tasks._fit(limit, length, "the text"), count)
            continue
        want = max(m for m in range(limit + 1) if cum[m] <= length)
        assert drive(tasks._fit(limit, length, "the text"), count) == want
        calls += n[0]
    assert calls / 400 < 12
    with pytest.raises(InputError, match="too short"):
        drive(tasks._fit(10, 50, "the text"), lambda m: 100 + m)


def test_answer_matching_is_normalized_whole_words():
    from jaxprefill.eval.tasks import contains

    assert contains("The answer is: **Mipelmi**.", "mipelmi")
    assert contains("the pass key is 12,345", "12345")
    assert not contains("1234567", "123456")  # a longer number is not the answer
    assert not contains("Mipelmiro", "Mipelmi")
    assert contains("It is the Velvet Harbor.", "velvet harbor")


def test_plots_write_pngs(tmp_path):
    m = np.tril(np.ones((8, 8), bool))
    plots.mask_heatmaps(str(tmp_path / "h.png"), np.tril(np.full((8, 8), 0.1)),
                        {"streaming": m & (np.arange(8)[None] < 2)}, "t")
    rows = [{"policy": "x", "length": 4096, "density": 0.4, "recall": 0.9,
             "per_head_density": [0.3, 0.5], "per_head_recall": [0.85, 0.95]}]
    plots.density_recall(str(tmp_path / "d.png"), rows)
    assert (tmp_path / "h.png").stat().st_size > 1000 and (tmp_path / "d.png").stat().st_size > 1000


def test_structured_qk_has_sinks_and_locality():
    from jaxprefill.eval.synthetic_qk import structured_qk
    from jaxprefill.sparse.base import make_geometry
    from jaxprefill.sparse.oracle import exact_block_mass

    q, k = structured_qk(jax.random.key(0), 1, 512, 4, 2, 32, local=64, dtype=jnp.float32)
    mass = np.asarray(exact_block_mass(q, k, make_geometry(q, k, 64, None)))[0]  # [H, 8, 8]
    last = mass[:, -1]  # the last query block's mass per key block
    middle = np.median(last[:, 1:6], axis=1)
    assert (last[:, 0] > 2 * middle).all()  # sink block beats the typical middle block
    assert (last[:, -1] > 2 * middle).all()  # diagonal (local window) too
    dense = sparse.get("oracle_topk", block_size=64, gamma=0.9)
    m = np.asarray(dense.block_mask(q, k))
    assert m.sum() < 0.8 * 4 * 36  # structured: 90% of the mass fits in < 80% of the blocks


def test_row_density_and_token_keep_match_block_path():
    """Per-row density matches a brute-force count; a token-level keep built from a block mask
    gives the same recall / error as the block-mask path (pbs uses the token path)."""
    rng = np.random.default_rng(4)
    b, s, hq, hkv, d, block = 2, 256, 6, 2, 8, 64
    q = jnp.asarray(rng.standard_normal((b, s, hq, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
    n = s // block
    mask = rng.random((b, hkv, n, n)) < 0.6
    lengths = np.array([256, 150])
    dens = metrics.row_density(mask, lengths, block)
    for r, length in enumerate(lengths):
        nb = -(-length // block)
        tri = np.tril(np.ones((nb, nb), bool))
        np.testing.assert_allclose(dens[r], (mask[r, :, :nb, :nb] & tri).sum((1, 2)) / tri.sum())
    rows = metrics.sample_rows(lengths, 8, min_pos=10)
    rec_b, err_b = metrics.row_recall_error(q, k, v, mask, rows, block)
    keep = np.stack([np.repeat(mask[r][:, rows[r] // block], block, axis=-1) for r in range(b)])
    rec_t, err_t = metrics.keep_recall_error(q, k, v, keep, rows)
    np.testing.assert_allclose(rec_t, rec_b, rtol=1e-6)
    np.testing.assert_allclose(err_t, err_b, rtol=1e-5, atol=1e-7)
    assert rec_b.min() < 0.99  # dropped blocks hold mass


def test_drivers_batch_rows_like_alone():
    """greedy_answers (sparse prefill, dense decode, one padded batch) gives each row the tokens
    jp.generate gives it alone; row_attention_stats gives each row its stats alone (pbs too)."""
    import jaxprefill as jp
    from jaxprefill.eval.probe import capture_qkv
    from jaxprefill.eval.runner import greedy_answers, row_attention_stats
    from jaxprefill.sparse import SparseConfig

    model = peaked_tiny_model(2, 0)

    class Tok:
        eos_token_ids = (0,)

        def decode(self, ids):
            return " ".join(map(str, ids))

    rng = np.random.default_rng(2)
    lens = np.array([250, 203, 197])  # one prompt bucket (256): jp.generate compiles once
    tokens = np.zeros((3, 256), np.int32)
    for i, n in enumerate(lens):
        tokens[i, :n] = rng.integers(1, 97, n)
    sp = SparseConfig.from_dict({"policy": "streaming", "min_length": 64,
                                 "params": {"block_size": 16, "sink": 16, "local": 32}})
    texts, _ = greedy_answers(model, Tok(), tokens, lens, sp, 6)
    for i, n in enumerate(lens):
        alone = jp.generate(model, None, [tokens[i, :n].tolist()], max_new_tokens=6, sparse=sp,
                            eos_token_ids=(0,))
        assert texts[i] == Tok().decode(alone[0].tokens), i

    configs = {"streaming": sp, "pbs": SparseConfig.from_dict(
        {"policy": "pbs", "min_length": 64, "params": {"block_size": 16, "segment": 32,
                                                        "tau": 0.5}})}
    q, k, v = capture_qkv(model, jnp.asarray(tokens))
    both = row_attention_stats(q, k, v, lens, configs, rows=8, log=lambda m: None)
    q1, k1, v1 = capture_qkv(model, jnp.asarray(tokens[1:2, :lens[1]]))
    alone = row_attention_stats(q1, k1, v1, lens[1:2], configs, rows=8, log=lambda m: None)
    for name in configs:
        for m in ("density", "recall"):
            np.testing.assert_allclose(both[name][m][1], alone[name][m][0], rtol=1e-4,
                                       err_msg=f"{name} {m}")
        assert both[name]["density"].max() < 1.0 and both[name]["recall"].min() < 1.0


def test_column_layout_stats_count_columns_as_tokens():
    """A layout with key columns (minference's column path): density counts each column as
    1/block_k of a block, recall covers exactly listed blocks | columns (brute force)."""
    from jaxprefill.eval.runner import column_layout_stats
    from pallas_kernels import BlockSparseLayout, with_columns

    rng = np.random.default_rng(7)
    b, s, hq, hkv, d, block = 1, 256, 4, 2, 8, 64
    q = jnp.asarray(rng.standard_normal((b, s, hq, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
    n = s // block
    mask = np.eye(n, dtype=bool)[None, None].repeat(hq, axis=1)
    mask[..., 0] = True
    cols = np.array([70, 75, 140], np.int32)  # key positions outside the listed blocks
    layout = with_columns(BlockSparseLayout.from_block_mask(mask, block, block),
                          jnp.broadcast_to(jnp.asarray(cols), (b, hq, 1, 3)), seq_q=s)
    rows = np.array([[100, 200, 255]], np.int32)
    dens, rec, _ = column_layout_stats(layout, q, k, v, np.array([s]), rows)
    causal_blocks = n * (n + 1) / 2
    listed = mask[0, 0].sum()  # 7 blocks; columns 70, 75 visible to query blocks 2, 3; 140 to 3
    np.testing.assert_allclose(dens[0], (listed + (2 + 3) / block) / causal_blocks)
    for h in range(hq):
        want = []
        for i in rows[0]:
            logit = k[0, : i + 1, h // 2] @ q[0, i, h] / np.sqrt(d)
            p = np.exp(logit - logit.max())
            p /= p.sum()
            keep = mask[0, h, i // block][np.arange(i + 1) // block] | np.isin(np.arange(i + 1),
                                                                              cols)
            want.append(p[keep].sum())
        np.testing.assert_allclose(rec[0, h], np.mean(want), rtol=1e-5)


def test_streamed_heads_logprobs_match_the_streaming_policy(tmp_path):
    """The retrieval-head search's log-probabilities with a [layers, kv heads] streaming
    selection equal those of the model prefilled through ``streaming`` with the complementary
    head_config (dense heads listed); all-dense equals the plain model."""
    import json

    import jaxprefill as jp
    from flax import nnx

    from jaxprefill.attention import AttentionSpec
    from jaxprefill.eval.probe import streamed_heads_logprobs
    from jaxprefill.sparse import SparseConfig

    model = peaked_tiny_model(3, 1)
    tokens = np.random.default_rng(5).integers(1, 97, (2, 160)).astype(np.int32)
    qpos = np.array([[150, 151, 152], [120, 121, 159]], np.int32)
    stream = np.array([[True, False], [False, False], [True, True]])
    kw = dict(sink=16, local=32, block=16, impl="xla")

    def logprobs_of(m):  # from the full forward
        logp = np.asarray(jax.nn.log_softmax(m(jnp.asarray(tokens)), axis=-1))
        return logp[np.arange(2)[:, None], qpos]

    dense = np.asarray(streamed_heads_logprobs(model, tokens, np.zeros_like(stream), qpos, **kw))
    np.testing.assert_allclose(dense, logprobs_of(model), rtol=1e-5, atol=1e-5)

    heads = {"dense_heads": {str(l): [h for h in range(2) if not stream[l, h]]
                             for l in range(3)}}
    path = tmp_path / "heads.json"
    path.write_text(json.dumps(heads))
    sp = SparseConfig.from_dict({"policy": "streaming", "min_length": 0, "kernel": "xla",
                                 "params": {"block_size": 16, "sink": 16, "local": 32,
                                            "head_config": str(path)}})
    sparse_model = jp.Llama(model.config, rngs=nnx.Rngs(1),
                            attention=AttentionSpec(impl="xla", sparse=sp))
    nnx.update(sparse_model, nnx.state(model))
    mixed = np.asarray(streamed_heads_logprobs(model, tokens, stream, qpos, **kw))
    np.testing.assert_allclose(mixed, logprobs_of(sparse_model), rtol=1e-5, atol=1e-5)
    assert np.abs(mixed - dense).max() > 1e-3, "streaming changed nothing on these inputs"
    with pytest.raises(ValueError, match="layers, kv heads"):
        streamed_heads_logprobs(model, tokens, stream[:2], qpos, **kw)


def test_streaming_head_search_ablation_order(monkeypatch, tmp_path):
    """scripts/tools/search_streaming_heads.py --criterion ablation on a tiny model: every head
    gets a distinct elimination rank and the written config keeps the heads eliminated last."""
    import argparse
    import json

    from scripts.tools import search_streaming_heads as mod

    model = peaked_tiny_model(3, 1)
    rng = np.random.default_rng(7)

    def fake_prompt(tok, task, length, seed):  # (prompt tokens, answer tokens)
        return rng.integers(1, 97, length).astype(np.int32), rng.integers(1, 97, 3).tolist()

    monkeypatch.setattr(mod, "answer_prompt", fake_prompt)
    args = argparse.Namespace(block=16, sink=16, local=32, impl="xla", loss="kl", rounds=3,
                              dense_fraction=0.5, also=["0.25:x"], model="tiny",
                              lengths=[150], tasks=["t"], seeds=[0, 1], criterion="ablation")
    score = mod.ablation_scores(model, None, [(150, "t", 0), (120, "t", 1)], args)
    assert score.shape == (3, 2)
    np.testing.assert_array_equal(np.sort(score.ravel()), np.arange(1, 7) / 6)
    out = tmp_path / "heads.json"
    mod.write_config(score, 0.5, str(out), args)
    dense = json.loads(out.read_text())["dense_heads"]
    kept = {(int(l), h) for l, hs in dense.items() for h in hs}
    top = {divmod(int(i), 2) for i in np.argsort(-score, axis=None)[:3]}
    assert kept == top
