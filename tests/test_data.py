"""The grain data pipeline: sources, tokenization, packing, shuffling, host sharding, resumable state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxprefill.data import (ByteTokenizer, SyntheticLoader, build_corpus, make_loader,
                             make_tokenizer, open_source)
from jaxprefill.data.sources import DataError, expand

# Distinct documents of varied length (some longer than a row) so packing has work to do.
DOCS = [f"doc{i:03d}:" + "abcdefghij"[i % 10] * (5 + (i * 7) % 40) for i in range(60)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    return str(path)


def stream(source, **kw):
    return make_loader(source, ByteTokenizer(), **kw)


def segments(batch):
    """[(tokens of one segment, positions)] for every segment of every row."""
    out = []
    for toks, pos, seg in zip(batch["tokens"], batch["positions"], batch["segment_ids"]):
        for s in sorted(set(seg.tolist()) - {0}):
            m = seg == s
            out.append((toks[m], pos[m]))
    return out


def test_concat_then_split_rows_reassemble_the_token_stream(jsonl):
    src = open_source("jsonl", [jsonl])
    loader = stream(src, seq_len=32, batch_size=4, shuffle=False, repeat=False)
    batches = list(loader)
    assert len(batches) >= 10
    tok = ByteTokenizer()
    expected = np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in DOCS])
    got = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    np.testing.assert_array_equal(got, expected[:len(got)])  # no token lost, duplicated or reordered
    for b in batches:
        assert b["tokens"].shape == (4, 32) and b["tokens"].dtype == np.int32
        assert np.all(b["segment_ids"] >= 1)  # concat-then-split never pads
        for toks, pos in segments(b):
            np.testing.assert_array_equal(pos, np.arange(len(toks)))  # restart per document
        # segment ids increase along a row and start at 1
        assert np.all(b["segment_ids"][:, 0] == 1) and np.all(np.diff(b["segment_ids"], axis=1) >= 0)


def test_first_fit_keeps_documents_whole_and_pads(jsonl):
    src = open_source("jsonl", [jsonl])
    batch = next(stream(src, seq_len=48, batch_size=4, packing="first_fit", shuffle=False))
    tok = ByteTokenizer()
    whole = {tuple(np.append(tok.encode(d), tok.eos_id)[:48]) for d in DOCS}
    segs = segments(batch)
    assert len(segs) > 4  # several documents share rows
    for toks, pos in segs:
        assert tuple(toks) in whole
        np.testing.assert_array_equal(pos, np.arange(len(toks)))
    pad = batch["segment_ids"] == 0
    assert pad.any() and np.all(batch["tokens"][pad] == 0)


def test_no_packing_is_one_document_per_row(jsonl):
    src = open_source("jsonl", [jsonl])
    batch = next(stream(src, seq_len=40, batch_size=6, packing="none", shuffle=False))
    assert np.all(batch["segment_ids"].max(axis=1) == 1)
    first = bytes(batch["tokens"][0][batch["segment_ids"][0] == 1][:-1].tolist()).decode()
    assert first == DOCS[0][:39]


def test_shuffle_is_seeded_and_epochs_differ(jsonl):
    src = open_source("jsonl", [jsonl])
    kw = dict(seq_len=16, batch_size=2, packing="none")

    def first_ids(seed, n_batches):
        loader = stream(src, seed=seed, **kw)
        return [bytes(r[:6].tolist()).decode() for _ in range(n_batches) for r in next(loader)["tokens"]]

    a, b, c = first_ids(1, 60), first_ids(1, 60), first_ids(2, 60)
    assert a == b and a != c
    epoch1, epoch2 = a[:60], a[60:]  # 60 documents per epoch
    assert sorted(epoch1) == sorted(f"doc{i:03d}" for i in range(60))
    assert sorted(epoch1) == sorted(epoch2) and epoch1 != epoch2  # reshuffled each epoch


def test_hosts_get_disjoint_shards(jsonl):
    src = open_source("jsonl", [jsonl])
    seen = []
    for host in range(3):
        loader = stream(src, seq_len=16, batch_size=4, packing="none", repeat=False,
                        shard_index=host, shard_count=3)
        seen.append({bytes(r[:6].tolist()).decode() for b in loader for r in b["tokens"]})
    assert all(len(s) == 20 for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])


@pytest.mark.parametrize("packing", ["concat_then_split", "first_fit"])
def test_iterator_state_resumes_exactly(jsonl, packing):
    src = open_source("jsonl", [jsonl])
    kw = dict(seq_len=24, batch_size=3, packing=packing, seed=5)
    loader = stream(src, **kw)
    for _ in range(7):
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))  # what the checkpoint stores
    expected = [next(loader) for _ in range(5)]
    resumed = stream(src, **kw)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_sources_text_jsonl_array_record(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b.txt").write_text("second file")
    text = open_source("text", [str(tmp_path / "*.txt")])
    assert [text[i] for i in range(len(text))] == ["first file", "second file"]
    (tmp_path / "x.jsonl").write_text('{"body": "one"}\n\n{"body": "two"}\n')
    js = open_source("jsonl", [str(tmp_path / "x.jsonl")], text_key="body")
    assert (len(js), js[0], js[1]) == (2, "one", "two")
    with pytest.raises(DataError, match="text_key"):
        open_source("jsonl", [str(tmp_path / "x.jsonl")])[0]
    with pytest.raises(FileNotFoundError, match=r"data\.validation.*nothing-\*"):
        expand([str(tmp_path / "nothing-*")], "data.validation")
    stats = build_corpus(tmp_path / "corpus", max_files=40, val_fraction=0.2, array_record=True)
    train_j = open_source("jsonl", [str(tmp_path / "corpus" / "train.jsonl")])
    train_a = open_source("array_record", [str(tmp_path / "corpus" / "train.array_record")])
    val = open_source("jsonl", [str(tmp_path / "corpus" / "validation.jsonl")])
    assert len(train_j) == len(train_a) == stats["train"] and len(val) == stats["validation"] > 0
    assert all(train_j[i] == train_a[i] for i in range(len(train_j)))
    assert not {train_j[i] for i in range(len(train_j))} & {val[i] for i in range(len(val))}


def test_tokenizers():
    tok = make_tokenizer("byte")
    ids = tok.encode("héllo")
    assert ids.dtype == np.int32 and len(ids) == 6 and tok.decode(ids) == "héllo"
    with pytest.raises(ValueError, match="data.tokenizer"):
        make_tokenizer("no-such-tokenizer")
    with pytest.raises(ValueError, match="model.pretrained"):
        make_tokenizer("model", None)


def test_synthetic_loader_is_deterministic_and_resumable():
    kw = dict(vocab_size=100, seq_len=64, batch_size=2, seed=3, documents=True, mean_doc_len=10)
    a = SyntheticLoader(**kw)
    first = [next(a) for _ in range(3)]
    b = SyntheticLoader(**kw)
    b.set_state({"index": 2})
    np.testing.assert_array_equal(next(b)["tokens"], first[2]["tokens"])
    seg, pos = first[0]["segment_ids"], first[0]["positions"]
    assert seg.max() > 2 and np.all(seg >= 1)
    starts = np.diff(seg, axis=1) > 0
    assert np.all(pos[:, 1:][starts] == 0)
    assert len({next(a)["tokens"].tobytes() for _ in range(3)}) == 3
