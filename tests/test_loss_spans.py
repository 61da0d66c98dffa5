"""Weighted training losses from JSONL `loss_spans` (data.span_weight): the spans' tokens get the
weight, rows carry it through packing "document" and "none", the loss sums it, and a training
run uses it end to end."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

import jaxprefill as jp
from jaxprefill.config import ConfigError, ModelConfig
from jaxprefill.data import ByteTokenizer, make_loader, open_source
from jaxprefill.data.pipeline import encode_spans
from jaxprefill.train import TrainConfig, Trainer
from jaxprefill.train.metrics import read_jsonl
from jaxprefill.train.step import StepOptions, token_losses
from tests.test_train import RECIPE, enable_compilation_cache

W = 7.0


def qa_doc(i: int, filler: int) -> dict:
    """A document of `filler` characters, then two questions; spans cover " answer"."""
    text = "x" * filler
    spans = []
    for q, a in ((f"what is {i}?", f"val{i}"), (f"and {i + 1}?", f"v{i + 1}")):
        text += f"\n\nQ: {q}\nA: {a}"
        spans.append([len(text) - len(a) - 1, len(text)])
    return {"text": text, "loss_spans": spans}


def expected_weights(doc: dict) -> np.ndarray:
    """Byte tokenizer: one token per ASCII character, then EOS (weight 1)."""
    w = np.ones(len(doc["text"]) + 1, np.float32)
    for a, b in doc["loss_spans"]:
        w[a:b] = W
    return w


@pytest.fixture
def docs_file(tmp_path):
    docs = [qa_doc(0, 10), qa_doc(1, 70), {"text": "plain document without spans " * 2}]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path, docs


def test_encode_spans_weights_exactly_the_span_tokens():
    doc = qa_doc(3, 25)
    tok = ByteTokenizer()
    ids, w = encode_spans(tok, doc["text"], doc["loss_spans"], W)
    np.testing.assert_array_equal(ids, tok.encode(doc["text"]))  # pieces join to the text
    np.testing.assert_array_equal(w, expected_weights(doc)[:-1])
    ids, w = encode_spans(tok, "abc", [], W)
    assert len(ids) == 3 and (w == 1).all()


def row_starts(n: int, s: int, packing: str) -> list[int]:
    """Where the rows of an n-token document start (jaxprefill.data.pipeline's packings)."""
    full, rest = divmod(n, s)
    if packing == "none" or full == 0:
        return [0]
    return [i * s for i in range(full)] + ([n - s] if 2 * rest >= s else [])


@pytest.mark.parametrize("packing", ["document", "none"])
def test_rows_carry_the_weights_of_their_tokens(docs_file, packing):
    path, docs = docs_file
    source = open_source("jsonl", [str(path)], spans_key="loss_spans")
    rows = [{k: v[0] for k, v in b.items()} for b in make_loader(
        source, ByteTokenizer(), seq_len=32, batch_size=1, packing=packing, shuffle=False,
        repeat=False, span_weight=W)]
    got = {}  # document index -> row starts
    i = 0
    for d, doc in enumerate(docs):
        want = expected_weights(doc) if "loss_spans" in doc else np.ones(len(doc["text"]) + 1)
        for s in row_starts(len(want), 32, packing):
            row = rows[i]
            i += 1
            piece = want[s:s + 32]
            n = len(piece)
            np.testing.assert_array_equal(row["loss_weights"][:n], piece)
            assert (row["loss_weights"][n:] == 0).all()  # padding weighs nothing
            assert row["loss_weights"].dtype == np.float32
            got.setdefault(d, []).append(s)
    assert i == len(rows) and len(got) == 3


def test_jsonl_spans_are_checked(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "abcdef", "loss_spans": [[2, 9]]}) + "\n"
                    + json.dumps({"text": "abcdef", "loss_spans": [[3, 4], [1, 2]]}) + "\n"
                    + json.dumps({"text": "abcdef", "loss_spans": "3-4"}) + "\n"
                    + json.dumps({"text": "abcdef"}) + "\n")
    src = open_source("jsonl", [str(path)], spans_key="loss_spans")
    with pytest.raises(ValueError, match=r"bad.jsonl: line at byte 0: loss_spans: span \[2, 9\]"):
        src[0]
    with pytest.raises(ValueError, match="not sorted, disjoint"):
        src[1]
    with pytest.raises(ValueError, match="list of \\[start, end\\] pairs"):
        src[2]
    assert src[3] == ("abcdef", [])
    assert open_source("jsonl", [str(path)])[3] == "abcdef"  # without spans_key: plain text
    with pytest.raises(ValueError, match="need data.format=jsonl"):
        open_source("text", [str(path)], spans_key="loss_spans")


def test_token_losses_sum_the_weights():
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                      max_position_embeddings=64)
    model = jp.Llama(cfg, rngs=nnx.Rngs(0), attention=jp.AttentionSpec("xla"))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 64, (2, 16)).astype(np.int32)
    segs = np.ones((2, 16), np.int32)
    segs[1, 11:] = 0  # padding
    batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16)),
             "segment_ids": segs}
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, b: token_losses(nnx.merge(graphdef, s), b, StepOptions(packed=True)))
    total, count = (float(x) for x in fn(state, batch))
    ones = fn(state, {**batch, "loss_weights": np.ones((2, 16), np.float32)})
    np.testing.assert_allclose([float(x) for x in ones], [total, count], rtol=1e-6)
    # the weight of token t scales the loss of predicting it (from t - 1); one token alone
    # gives that token's loss, and the sum over one-hot weights gives back the total
    per_token = []
    for t in range(1, 11):
        w = np.zeros((2, 16), np.float32)
        w[1, t] = 3.0
        lt, ct = (float(x) for x in fn(state, {**batch, "loss_weights": w}))
        assert ct == 3.0
        per_token.append(lt / 3.0)
    w = np.zeros((2, 16), np.float32)
    w[1, 11:] = 5.0  # padding: no loss whatever its weight
    w[1, 0] = 5.0  # the first token is predicted by nothing
    assert [float(x) for x in fn(state, {**batch, "loss_weights": w})] == [0.0, 0.0]
    w = np.zeros((2, 16), np.float32)
    w[1, 1:11] = 1.0
    lw, cw = (float(x) for x in fn(state, {**batch, "loss_weights": w}))
    np.testing.assert_allclose(lw, sum(per_token), rtol=1e-5)
    assert cw == 10.0


def test_span_weight_config_is_checked(tmp_path):
    base = [f"output_dir={tmp_path}", f"data.train=[{tmp_path}/x.jsonl]"]
    with pytest.raises(ConfigError, match="data.span_weight=5 needs data.format=jsonl and "
                                          "data.packing none or document"):
        TrainConfig.load(RECIPE, base + ["data.span_weight=5", "data.packing=concat_then_split"])
    with pytest.raises(ConfigError, match="data.span_weight must be positive"):
        TrainConfig.load(RECIPE, base + ["data.span_weight=0", "data.packing=document"])


def test_training_with_span_weights(docs_file, tmp_path):
    enable_compilation_cache()
    path, docs = docs_file
    train = tmp_path / "train.jsonl"
    train.write_text(path.read_text() * 3)
    out = tmp_path / "run"
    cfg = TrainConfig.load(RECIPE, [f"output_dir={out}", f"data.train=[{train}]",
                                    f"data.validation=[{path}]", "log.progress=false",
                                    "steps=2", "batch_size=2", "data.seq_len=32",
                                    "data.packing=document", f"data.span_weight={W}",
                                    "log.every=1", "log.eval_every=0", "checkpoint.enabled=false"])
    trainer = Trainer(cfg)
    result = trainer.fit()
    trainer.close()
    assert result.status == "finished" and result.step == 2
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    # the loss's denominator is the weights' sum: above the 2 x 31 predicted tokens when a
    # span is in the batch (the first rows hold the first documents' answers)
    assert max(r["tokens"] for r in records) > 2 * 31


def test_answer_spans_keep_the_bundled_tokenizers_tokens():
    """The data builder's answer spans start at a space and end the text or a line: encoding
    piece by piece gives SmolLM2's tokens of the whole row, for every family and format."""
    import random

    from jaxprefill.data import make_tokenizer
    from jaxprefill.data.longdocs_synth import FAMILIES, retrieval_row

    tok = make_tokenizer("smollm2-135m-instruct")
    lines = [f"line {i}: some real text, with (punctuation) and numbers {i * 7}" for i in range(40)]
    for seed in range(36):
        text, meta = retrieval_row(lines, random.Random(seed), FAMILIES[seed % len(FAMILIES)])
        ids, w = encode_spans(tok, text, meta["answer_spans"], W)
        np.testing.assert_array_equal(ids, tok.encode(text))
        assert (w == W).sum() >= len(meta["answer_spans"])


def test_a_bad_span_in_training_data_is_one_error_line(tmp_path, capsys):
    from jaxprefill.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": "hello world " * 30, "loss_spans": [[4, 9000]]})
                           + "\n" for _ in range(4)))
    status = main(["train", "--config", RECIPE, f"output_dir={tmp_path / 'run'}",
                   f"data.train=[{bad}]", "data.validation=[]", "data.packing=document",
                   "data.span_weight=5", "steps=2", "log.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert re.fullmatch(rf"error: {re.escape(str(bad))}: line at byte \d+: loss_spans: span "
                        r"\[4, 9000\] is not sorted, disjoint and inside the text's 360 "
                        r"characters", err[-1]), err[-1]
    assert not any("Traceback" in line for line in err)
