"""Measurement: density / recall / output error against brute force, synthetic tasks, plots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprefill import sparse
from jaxprefill.eval import metrics, plots
from jaxprefill.eval.tasks import TASKS, make_sample


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
def test_tasks_fit_length_hold_needles_and_score(task):
    tok = WordTokenizer()
    a = make_sample(tok, task, 1500, 0.3, seed=1)
    assert 1400 <= len(tok.encode_prompt(a.messages)) <= 1500
    text = a.messages[0]["content"]
    assert all(ans in text for ans in a.answers)
    assert a.score(" ".join(a.answers)) == 1.0 and a.score("no idea") == 0.0
    b = make_sample(tok, task, 1500, 0.3, seed=1)
    assert b.messages == a.messages  # deterministic
    c = make_sample(tok, task, 1500, 0.9, seed=2)
    assert c.messages != a.messages
    first = a.answers[0] if task != "vt" else f"VAR {a.answers[0]} ="
    # Depth 0.3: the (first) needle sits about 30% into the haystack.
    pos = text.find(first) / len(text)
    assert 0.15 < pos < 0.45, pos


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
