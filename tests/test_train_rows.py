"""Rows of one document (data.packing "document" and "none"): long documents fill several rows
and nothing is cut off, the iterator state resumes mid-document, and dropping the segment mask
for such rows (plain causal attention, what the trainer does) leaves the loss unchanged."""

from __future__ import annotations

import json

import jax
import numpy as np
from flax import nnx

import jaxprefill as jp
from jaxprefill.config import ModelConfig
from jaxprefill.data import ByteTokenizer, make_loader, open_source
from jaxprefill.train.step import StepOptions, token_losses

LENGTHS = (10, 40, 100, 63, 64, 50)  # + EOS: 11, 41, 101, 64, 65, 51 tokens in rows of 32
DOCS = [chr(ord("a") + i) * n for i, n in enumerate(LENGTHS)]


def loader(tmp_path, **kw):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return make_loader(open_source("jsonl", [str(path)]), ByteTokenizer(), seq_len=32,
                       batch_size=1, packing="document", shuffle=False, **kw)


def test_document_rows_split_long_documents(tmp_path):
    rows = [{k: v[0] for k, v in b.items()} for b in loader(tmp_path, repeat=False)]
    eos = ByteTokenizer.eos_id
    # (document, start) of every row: consecutive pieces; a rest of >= 16 tokens gets one more
    # row ending at the document's end, a shorter rest is dropped
    want = [(0, 0), (1, 0), (2, 0), (2, 32), (2, 64), (3, 0), (3, 32), (4, 0), (4, 32),
            (5, 0), (5, 19)]
    assert len(rows) == len(want)
    for (i, start), row in zip(want, rows):
        ids = np.append(np.frombuffer(DOCS[i].encode(), np.uint8).astype(np.int32), eos)
        piece = ids[start:start + 32]
        n = len(piece)
        np.testing.assert_array_equal(row["tokens"][:n], piece)
        np.testing.assert_array_equal(row["segment_ids"], (np.arange(32) < n).astype(np.int32))
        np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
        assert n == 32 or len(ids) < 32  # only a document shorter than a row is padded


def test_document_rows_resume_mid_document(tmp_path):
    first = loader(tmp_path)
    for _ in range(4):  # inside the third document's rows
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    want = [next(first)["tokens"] for _ in range(6)]
    again = loader(tmp_path)
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again)["tokens"], w)


def test_one_document_rows_need_no_segment_mask():
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    model = jp.Llama(cfg, rngs=nnx.Rngs(0), attention=jp.AttentionSpec("xla"))
    n = 11
    tokens = np.zeros((2, 16), np.int32)
    tokens[:, :n] = np.random.default_rng(0).integers(1, 64, (2, n))
    tokens[1] = np.random.default_rng(1).integers(1, 64, 16)  # a full row
    segs = np.zeros((2, 16), np.int32)
    segs[0, :n], segs[1] = 1, 1
    pos = np.where(segs > 0, np.arange(16), 0).astype(np.int32)
    batch = {"tokens": tokens, "positions": pos, "segment_ids": segs}
    graphdef, state = nnx.split(model)
    losses = {}
    for packed in (True, False):
        fn = jax.jit(lambda s, b, packed=packed: token_losses(nnx.merge(graphdef, s), b,
                                                              StepOptions(packed=packed)))
        losses[packed] = [float(x) for x in fn(state, batch)]
    assert losses[True][1] == losses[False][1] == n - 1 + 15
    np.testing.assert_allclose(losses[False][0], losses[True][0], rtol=1e-6)
