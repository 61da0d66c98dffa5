"""`jaxprefill perplexity`: chunked next-token NLL equals the full-logits computation, the
perplexities read from it, the command's files, resume and one-line errors (tiny models, CPU)."""

from __future__ import annotations

import json
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_eval_suite import HashTokenizer, tiny_model

from jaxprefill import cli
from jaxprefill.eval import perplexity_cli
from jaxprefill.eval.perplexity import context_perplexity, position_buckets, token_nll


class TextTokenizer(HashTokenizer):
    """HashTokenizer plus the text surface the perplexity command tokenizes documents with."""

    vocab_size = 97
    bos_token_id = None

    def encode(self, text, add_special_tokens=True):
        return [zlib.crc32(w.encode()) % 96 + 1 for w in text.split()]


def full_nll(model, tokens: np.ndarray) -> np.ndarray:
    """The reference: all logits of the row at once, log-softmax, the next token's entry."""
    logp = jax.nn.log_softmax(model(jnp.asarray(tokens[:, :-1])), axis=-1)
    return -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)[..., 0]


def test_token_nll_equals_full_logits_log_softmax():
    model = tiny_model()
    tokens = np.random.default_rng(0).integers(0, 97, (2, 45)).astype(np.int32)  # odd S
    ref = full_nll(model, tokens)
    got = np.asarray(token_nll(model, tokens, chunk=7))  # 7 does not divide the 44 predictions
    assert got.shape == (2, 44) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # Causal: a truncated row's NLL is the long row's prefix (why one forward gives every L).
    np.testing.assert_allclose(np.asarray(token_nll(model, tokens[:, :21], chunk=7)),
                               got[:, :20], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="S >= 2"):
        token_nll(model, tokens[:, :1])


def test_context_perplexity_and_position_buckets_by_hand():
    nll = np.array([[0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 5.0]])
    ppl = context_perplexity(nll, [1, 2, 4])
    assert ppl == pytest.approx({1: math.exp(1.0), 2: math.exp(1.5), 4: math.exp(2.5)})
    b = position_buckets(nll, [0, 1, 4])
    assert [(r["start"], r["end"], r["predictions"]) for r in b] == [(0, 1, 2), (1, 4, 6)]
    assert b[0]["ppl"] == pytest.approx(math.e) and b[1]["nll"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="outside"):
        context_perplexity(nll, [5])
    with pytest.raises(ValueError, match="increase"):
        position_buckets(nll, [0, 2, 2])


# ------------------------------------------------------------------------------ the command
def words(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(f"w{int(i)}" for i in rng.integers(0, 500, n))


@pytest.fixture
def docs(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [{"id": "a", "text": words(150, 1)}, {"id": "short", "text": words(40, 2)},
             {"id": "b", "text": words(129, 3)}, {"id": "c", "text": words(200, 4)}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path


def test_command_writes_labels_resumes_and_skips_finished(tmp_path, docs, monkeypatch, capsys):
    """Two labels (one beyond its context) in one directory; an interrupted label resumes at
    its next document; a finished label with the same identity computes nothing; a changed
    one is replaced, the other label kept."""
    models = {"base": tiny_model(context=64), "scaled": tiny_model(context=128)}
    loads, calls = [], []
    tok = TextTokenizer()

    def load_model(name, dtype, adapter=None, overrides=None):
        loads.append((name, overrides))
        return models[name], tok

    real = perplexity_cli.token_nll
    interrupt_at = {"call": 2}  # Ctrl-C during the second document of the first run

    def counting_nll(model, tokens, chunk):
        calls.append(tokens.shape)
        if len(calls) == interrupt_at["call"]:
            raise KeyboardInterrupt
        return real(model, tokens, chunk)

    monkeypatch.setattr(perplexity_cli, "load_model", load_model)
    monkeypatch.setattr(perplexity_cli, "token_nll", counting_nll)
    out = tmp_path / "ppl"

    def run(label, model, *extra):
        return cli.main(["perplexity", "--model", model, "--docs", str(docs), "--lengths",
                         "128", "32", "64", "--label", label, "--chunk", "16", "--out-dir",
                         str(out), *extra])

    assert run("base", "base") == 130  # interrupted during its second document
    assert not (out / "perplexity.json").exists() and len(calls) == 2
    calls.clear()
    interrupt_at["call"] = 0
    assert run("base", "base") == 0  # resumes: documents b and c only
    assert calls == [(1, 129), (1, 129)]
    err = capsys.readouterr().err
    assert "3 of 4 documents kept (129 tokens each" in err
    assert "1 skipped as shorter (short: 40 tokens)" in err
    assert "resuming with 1 document(s) done" in err
    assert "[perplexity] base: doc 2/3 (b): 129 tokens in" in err and "(compile included)" in err
    assert "[perplexity] base: doc 3/3 (c): 129 tokens in" in err
    assert run("scaled", "scaled", "--override", "max_position_embeddings=128",
               "--docs-limit", "2") == 0

    data = json.loads((out / "perplexity.json").read_text())["labels"]
    assert list(data) == ["base", "scaled"]
    base = data["base"]
    assert base["finished"] and base["documents"]["kept"] == 3
    assert [(r["length"], r["beyond_context"]) for r in base["context"]] == [
        (32, False), (64, False), (128, True)]
    assert data["scaled"]["documents"]["kept"] == 2 and data["scaled"]["documents"]["not_read"] == 1
    assert data["scaled"]["identity"]["overrides"] == {"max_position_embeddings": 128}
    # The numbers: the library functions over the kept documents' rows.
    rows = np.stack([np.asarray(tok.encode(words(n, s)))[:129] for n, s in ((150, 1), (129, 3),
                                                                             (200, 4))])
    nll = full_nll(models["base"], rows.astype(np.int32))
    want = context_perplexity(nll, [32, 64, 128])
    assert [r["ppl"] for r in base["context"]] == pytest.approx([want[n] for n in (32, 64, 128)],
                                                                rel=1e-5)
    assert [(r["start"], r["end"]) for r in base["buckets"]] == [(0, 32), (32, 64), (64, 128)]
    assert base["buckets"][2]["ppl"] == pytest.approx(position_buckets(nll, [0, 64, 128])[1]["ppl"],
                                                      rel=1e-5)
    saved = np.load(out / base["nll_file"])
    assert saved["nll"].shape == (3, 128) and list(saved["ids"]) == ["a", "b", "c"]
    md = (out / "perplexity.md").read_text()
    assert "| label | 32 | 64 | 128 |" in md
    assert f"| base | {want[32]:.3f} | {want[64]:.3f} | {want[128]:.3f} † |" in md
    assert "| label | 0-31 | 32-63 | 64-127 |" in md and "| scaled |" in md
    assert (out / "perplexity.png").stat().st_size > 5000

    # A finished label, same identity: nothing loaded, nothing computed, nothing rewritten.
    before = (out / "perplexity.json").read_bytes()
    loads.clear()
    calls.clear()
    assert run("base", "base") == 0
    assert loads == [] and calls == [] and (out / "perplexity.json").read_bytes() == before
    assert "nothing to compute" in capsys.readouterr().err
    # Another identity replaces the label's entry once finished; the other label stays.
    assert run("base", "base", "--docs-limit", "1") == 0
    data = json.loads((out / "perplexity.json").read_text())["labels"]
    assert list(data) == ["base", "scaled"] and data["base"]["documents"]["kept"] == 1
    assert "holds it with other docs_limit" in capsys.readouterr().err


@pytest.mark.parametrize("case,message", [
    ("missing", "error: --docs {tmp}/nope.jsonl: no such file"),
    ("short", "error: --docs {tmp}/docs.jsonl: no document has the 1025 tokens --lengths 1024 "
              "needs (max(--lengths) + 1; the longest has 200)"),
    ("lengths", "error: --lengths must be positive token counts, got [0, 64]"),
    ("label", "error: --label 'a b': use 1-64 letters, digits and . _ + = - "),
    ("json", "error: --docs {tmp}/bad.jsonl:2: not a JSON record"),
    ("dir", "error: --docs {tmp}: a directory; give a JSONL file"),
    ("binary", "error: --docs {tmp}/bin.jsonl:2: not UTF-8 text (a JSONL file is)"),
    ("out-dir", "error: --out-dir {tmp}/docs.jsonl is a file; give a directory"),
])
def test_ordinary_mistakes_are_one_line(case, message, tmp_path, docs, monkeypatch, capsys):
    monkeypatch.setattr(perplexity_cli, "load_model",
                        lambda *a, **k: (tiny_model(context=64), TextTokenizer()))
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{"text": \n')
    (tmp_path / "bin.jsonl").write_bytes(b'{"text": "x"}\n\xd0\x00\xff\n')
    argv = {"docs": str(docs), "lengths": ["1024"], "label": "x", "out": str(tmp_path / "out")}
    if case == "missing":
        argv["docs"] = str(tmp_path / "nope.jsonl")
    elif case == "lengths":
        argv["lengths"] = ["0", "64"]
    elif case == "label":
        argv["label"] = "a b"
    elif case == "json":
        argv["docs"] = str(tmp_path / "bad.jsonl")
    elif case == "dir":
        argv["docs"] = str(tmp_path)
    elif case == "binary":
        argv["docs"] = str(tmp_path / "bin.jsonl")
    elif case == "out-dir":
        argv["out"] = str(docs)
    rc = cli.main(["perplexity", "--docs", argv["docs"], "--lengths", *argv["lengths"],
                   "--label", argv["label"], "--out-dir", argv["out"]])
    assert rc == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message.format(tmp=tmp_path)), lines
