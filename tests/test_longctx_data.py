"""The long-context training data builder (scripts/tools/build_longctx_data.py) and its
helpers (jaxprefill/data/longdocs*.py): text extraction, exact token sums, document assembly,
the validation pick, the haystack and task-wording guards, synthetic retrieval rows, and whole
builds on a small fake source tree (CPU, bundled SmolLM2 tokenizer)."""

import gzip
import hashlib
import json
import random
from pathlib import Path

import pytest

from jaxprefill.data import longdocs as ld
from jaxprefill.data.longdocs_guard import (HaystackGuard, find_phrases, sha256,
                                            template_phrases)
from jaxprefill.data.longdocs_pack import Doc, assemble, pick_validation
from jaxprefill.data.longdocs_synth import ALL_FAMILIES, FAMILIES, retrieval_row
from jaxprefill.eval import haystack
from scripts.tools import build_longctx_data as b
from scripts.tools.build_eval_haystacks import clean


@pytest.fixture(scope="module")
def count():
    return b.TokenCounter()


# ---------------------------------------------------------------------------- text

ROFF = r""".\" a comment that must not appear
.de XX
a macro definition that must not appear
..
.TH FROB 1 "2024" "frob 1.0"
.SH NAME
frob \- twist the \fBwidgets\fR
.SH DESCRIPTION
.B frob
reads
.I files
and writes \(lqthem\(rq.
.TP
.BR \-v ", " \-\-verbose
say more
.ie n \{\
nroff text kept
.\}
.el \{\
troff text dropped
.\}
.TS
tab(;);
l l.
alpha;beta
.TE
"""


def test_roff_to_text_keeps_text_and_drops_layout():
    text = ld.roff_to_text(ROFF)
    assert text.startswith("FROB(1)")
    assert "NAME\nfrob - twist the widgets" in text
    assert 'frob reads files and writes "them".' in text  # one filled paragraph
    assert "-v, --verbose\nsay more" in text  # a .TP tag on its own line, fonts joined
    assert "nroff text kept" in text and "troff text dropped" not in text
    assert "alpha  beta" in text  # a table row; its format lines dropped
    for gone in ("comment", "macro definition", "\\f", ".TP", "tab(;)"):
        assert gone not in text
    assert ld.roff_to_text(".so man1/other.1\n").strip() == ""  # a redirect page is empty


def test_info_to_text_drops_node_lines_and_tables():
    src = ("This is x.info.\n\x1f\nFile: x.info,  Node: Top,  Next: Intro\n\nTop text.\n"
           "\x1f\nFile: x.info,  Node: Intro\n\nIntro text.\n\x1f\nTag Table:\nNode: Top\x7f12\n"
           "\x1f\nEnd Tag Table\n")
    text = ld.info_to_text(src)
    assert "Top text." in text and "Intro text." in text
    assert "Node:" not in text and "Tag Table" not in text and "\x1f" not in text


def test_docstring_outline_in_source_order():
    src = ('"""Module doc."""\n\nclass A(B):\n    """Class doc."""\n\n    def m(self, x):\n'
           '        """Method doc."""\n\ndef f(y=1):\n    """Function doc."""\n\ndef g():\n'
           '    pass\n')
    out = ld.docstring_outline(src, "pkg.mod")
    assert out.index("Module doc.") < out.index("class A(B):") < out.index("def A.m(self, x):") \
        < out.index("def f(y=1):")
    assert "def g" not in out  # no docstring, not listed
    assert ld.docstring_outline("def (", "bad") == ""
    assert ld.module_name("Lib/asyncio/__init__.py") == "asyncio"


def test_piece_token_counts_add_up(count):
    """A document's token count is the sum of its pieces' (no pre-token crosses a header)."""
    bodies = ["def f(x):\n    return x + 1   \n\n\n\n", "    indented start\n\ttab\n",
              "prose with digits 12345 and émigré unicode.  \n", "x" * 3000 + "\n  y",
              "end with spaces   ", "1234\n\n\n5678\n", "# comment\n    \n    code()"]
    pieces = [ld.piece("stdlib" if i % 2 else "doc", "g", f"Lib/f{i}.py", ld.normalize(t))
              for i, t in enumerate(bodies)]
    assert all(p.text[0] not in " \n\t" and p.text.endswith("\n") and p.text[-2] != "\n"
               for p in pieces)
    assert count(["".join(p.text for p in pieces)])[0] == sum(count([p.text for p in pieces]))
    parts = ld.split_piece(pieces[3], 3)  # a long line is cut, later parts say (continued)
    assert len(parts) == 3 and "(continued)" in parts[1].text.split("\n")[0]
    assert "".join(p.text.split("\n", 1)[1].rstrip("\n") for p in parts).replace("\n", "") == \
        pieces[3].text.split("\n", 1)[1].rstrip("\n").replace("\n", "")


# ---------------------------------------------------------------------------- assembly

def pieces_of(spec: list[tuple[str, str, int]]) -> tuple[list[ld.Piece], list[int]]:
    return [ld.piece(s, g, f"{g}/{i}", "x") for i, (s, g, _) in enumerate(spec)], \
        [n for _, _, n in spec]


def test_assemble_keeps_groups_bundles_small_ones_splits_large_ones():
    spec = [("stdlib", "big", 400), ("stdlib", "big", 500), ("stdlib", "big", 300),
            ("stdlib", "mid", 250), ("stdlib", "mid", 100), ("stdlib", "s1", 120),
            ("stdlib", "s2", 90), ("stdlib", "s3", 150), ("stdlib", "s4", 40),
            ("man", "m1", 30)]
    pieces, counts = pieces_of(spec)
    docs, dropped = assemble(pieces, counts, min_tokens=100, target=300, max_tokens=1000)
    by_id = {d.id: d for d in docs}
    assert [d.id for d in docs] == ["stdlib/big#part1of2", "stdlib/big#part2of2", "stdlib/mid",
                                    "stdlib/s1..s3"]
    assert by_id["stdlib/big#part1of2"].pieces == [0, 1] and by_id["stdlib/mid"].tokens == 350
    assert by_id["stdlib/s1..s3"].groups == ["s1", "s2", "s3"]  # bundled in order up to 300
    assert [d.id for d in dropped] == ["stdlib/s4", "man/m1"]  # below min_tokens
    assert all(d.tokens == sum(counts[i] for i in d.pieces) for d in docs)
    with pytest.raises(ValueError, match="exceeds max_tokens"):
        assemble(pieces, [2000] * len(pieces), min_tokens=1, target=2, max_tokens=1000)


def test_pick_validation_keeps_parts_together_and_drops_shared_text():
    docs = [Doc("stdlib/a#part1of2", "stdlib", ["a"], [], 500, 1),
            Doc("stdlib/a#part2of2", "stdlib", ["a"], [], 500, 1),
            Doc("stdlib/b", "stdlib", ["b"], [], 500, 1),
            Doc("docstrings/a..b", "docstrings", ["a", "b"], [], 500, 1),
            Doc("man/m", "man", ["m"], [], 500, 1), Doc("doc/d", "doc", ["d"], [], 100, 1)]
    for seed in range(6):
        train, val, dropped = pick_validation(docs, 3, 300, seed)
        ids = {docs[i].id for i in val}
        assert sorted(train + val + dropped) == list(range(len(docs)))
        assert ("stdlib/a#part1of2" in ids) == ("stdlib/a#part2of2" in ids)
        assert "docstrings/a..b" not in ids and "doc/d" not in ids  # derived / too short
        assert "man/m" in ids  # one source at a time: prose is picked too
        if ids & {"stdlib/b", "stdlib/a#part1of2"}:
            assert [docs[i].id for i in dropped] == ["docstrings/a..b"]


# ---------------------------------------------------------------------------- guards

def test_guard_paths_hashes_and_shared_lines():
    hay_text = "\n".join(f"line number {i} of the haystack module, long enough to count"
                         for i in range(30)) + "\n"
    guard = HaystackGuard([{"name": "code/hay.py", "source_path": "hay.py",
                            "sha256": sha256(clean(hay_text)), "text": hay_text}], clean=clean)
    assert guard.check_path("hay.py") and guard.check_path("pkg/hay.py") is None
    assert "hash" in guard.check_text(hay_text.rstrip("\n") + "   ", prose=False).excluded
    moved = "# a moved module\n" + hay_text.replace("line number 3 ", "line no. 3 ")
    assert "haystack lines" in guard.check_text(moved, prose=False).excluded
    news = "Entry one.\n\n" + hay_text.split("\n")[0] + "\nmore\n\n" + "Entry three.\n" * 3
    v = guard.check_text(news, prose=True)  # one shared line: its paragraph goes
    assert v.excluded is None and v.scrubbed == 1 and "haystack" not in v.text
    assert v.text.startswith("Entry one.") and "Entry three." in v.text
    v = guard.check_text(news, prose=False)  # code keeps a shared idiom, counted
    assert v.excluded is None and v.text == news and v.shared == 1


TASKS_SRC = '''
"""Module docstring: The secret token for a test is not a template."""
WORDS = ("alpha", "beta")
INSTR = {"x": "Please look very closely at the text below. Then answer."}
FACT = ("{p} keeps a pet lizard named {a}.", "What is the lizard of {p} called?")

def make(k, v):
    """Docstring words are not a template either."""
    if v < 0:
        raise ValueError(f"value for key {k} must be positive here, got {v}")
    return f"The secret token for {k} is {v}. Keep it."
'''


def test_template_phrases_from_literals_and_fstrings():
    phrases = template_phrases(TASKS_SRC)
    assert "the secret token for" in phrases  # an f-string cut at its placeholder
    assert "keeps a pet lizard named" in phrases and "what is the lizard of" in phrases
    assert "please look very closely at the text below" in phrases  # a sentence of it
    assert not any("docstring" in p or "positive" in p for p in phrases)  # docstrings, raise
    assert "alpha" not in phrases and "keep it" not in phrases  # under four words
    hits = find_phrases([("a.txt", "...THE  Secret\ntoken, for Bob is 7"),
                         ("b.txt", "the secret tokens for Bob")], phrases)
    assert hits == [("a.txt", "the secret token for")]  # case, punctuation, line breaks


def test_real_task_wordings_are_found():
    phrases, info = b.task_phrases()
    assert "jaxprefill/eval/tasks.py" in info
    assert "one of the special magic numbers for" in phrases
    assert "the pass key is" in phrases and "what is the pass key" in phrases


def test_synthetic_rows_answer_right_after_the_question_and_avoid_eval_wordings():
    phrases, _ = b.task_phrases()
    lines = [f"real text line {i} with some words" for i in range(200)]
    rows = []
    for seed in range(70):
        family = ALL_FAMILIES[seed % len(ALL_FAMILIES)]
        text, meta = retrieval_row(lines, random.Random(seed), family)
        rows.append((f"row{seed}", text))
        assert all(f in text for f in meta["facts"]) and text.count("real text line") == 200
        last = meta["questions"][-1]
        assert text.rstrip().endswith(last["answer"])  # the answer follows its question
        # each answer span is " " + the answer, right after its own question
        assert [text[a:e] for a, e in meta["answer_spans"]] == \
            [" " + q["answer"] for q in meta["questions"]]
        assert meta["answer_spans"][-1][1] == len(text)
        body = text[:text.rindex(meta["questions"][0]["question"])]
        for q in meta["questions"]:  # every answer is stated in the facts before it
            for part in q["answer"].replace('"', "").split(", "):
                assert part.removeprefix("box ").removeprefix("a ").removeprefix("an ") in body
            assert all(0 <= d <= 1 for d in q["depths"])
    assert find_phrases(rows, phrases) == []


def test_the_single_family_is_drawn_only_when_named():
    lines = [f"real text line {i} with some words" for i in range(200)]
    default = {retrieval_row(lines, random.Random(s))[1]["family"] for s in range(200)}
    assert default == set(FAMILIES) and "single" not in FAMILIES
    for seed in range(20):
        text, meta = retrieval_row(lines, random.Random(seed), families=("single",))
        (fact,), (q,) = meta["facts"], meta["questions"]
        assert meta["family"] == "single" and q["answer"] in fact and q["answer"].isdigit()
        assert 4 <= len(q["answer"]) <= 6 and text.count(q["answer"]) == 2  # fact + answer
    weighted = [retrieval_row(lines, random.Random(s), families=("single", "single", "ferry"))
                [1]["family"] for s in range(300)]
    assert 150 < weighted.count("single") < 250 and set(weighted) == {"single", "ferry"}


def test_synthetic_facts_stay_in_the_depth_range():
    lines = [f"real text line {i} with some words" for i in range(400)]
    for seed in range(30):
        default = retrieval_row(lines, random.Random(seed))
        assert retrieval_row(lines, random.Random(seed), depth=(0.0, 1.0)) == default
        text, meta = retrieval_row(lines, random.Random(seed), depth=(0.0, 0.25))
        depths = [d for q in meta["questions"] for d in q["depths"]]
        assert depths and max(depths) <= 0.27  # 100 of 400 lines (+ the inserted facts)
        assert text.count("real text line") == 400 and all(f in text for f in meta["facts"])
    with pytest.raises(ValueError, match="depth must satisfy"):
        retrieval_row(lines, random.Random(0), depth=(0.5, 0.2))


# ---------------------------------------------------------------------------- whole builds

HAY_TEXT = "\n".join(f"HAYSTACK_VALUE_{i} = compute_the_haystack_value({i}, flag=True)"
                     for i in range(40)) + "\n"


def module_text(name: str, n: int) -> str:
    return "\n".join(f'def {name}_{i}(x):\n    """Return x plus {i} ({name})."""\n'
                     f"    return x + {i}\n" for i in range(n))


def write_gz(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode(), mtime=0))


def fake_tree(root: Path) -> Path:
    lib = root / "Lib"
    for pkg in ("yard", "zoo"):
        for mod in ("__init__", "alpha", "beta", "gamma"):
            (lib / pkg).mkdir(parents=True, exist_ok=True)
            (lib / pkg / f"{mod}.py").write_text(module_text(f"{pkg}_{mod}", 25))
    (lib / "tiny.py").write_text('"""A tiny module."""\nX = 1\n')
    (lib / "planted_path.py").write_text(module_text("planted_path", 30))  # a haystack path
    (lib / "copied.py").write_text(HAY_TEXT)  # a haystack text under another name
    page = ".TH FOO{n} 1\n.SH NAME\nfoo{n} \\- do foo things\n.SH DESCRIPTION\n" + \
        "".join(f".PP\nParagraph {{n}}.{i}: foo reads the input and writes output {i}.\n"
                for i in range(60))
    write_gz(root / "man" / "man1" / "foo-a.1.gz", page.format(n="a"))
    write_gz(root / "man" / "man1" / "foo-b.1.gz", page.format(n="b"))
    (root / "doc" / "pkgx").mkdir(parents=True)
    (root / "doc" / "pkgx" / "README").write_text(
        "".join(f"README line {i}: pkgx explains itself at some length.\n" for i in range(80)))
    write_gz(root / "doc" / "pkgx" / "changelog.gz",
             "".join(f"version 1.{i}\n  * fixed bug number {i} in the parser\n\n"
                     for i in range(120)))
    (root / "doc" / "pkgx" / "copyright").write_text("not documentation " * 40)
    return root


def fake_guards():
    guard = HaystackGuard([{"name": "code/planted_path.py", "source_path": "planted_path.py",
                            "sha256": "0" * 64},
                           {"name": "code/copied_source.py", "source_path": "elsewhere.py",
                            "sha256": sha256(clean(HAY_TEXT))}], clean=clean)
    return guard, {"documents": 2}, *b.task_phrases()


def fake_args(root: Path, out: Path, *extra: str):
    return b.parse_args(["--out", str(out), "--stdlib", str(root / "Lib"),
                         "--man", str(root / "man"), "--doc", str(root / "doc"),
                         "--info", str(root / "no-info-here"), "--min-tokens", "300",
                         "--target-tokens", "1500", "--max-tokens", "6000", "--val-docs", "1",
                         "--synthetic-frac", "0.25", "--synthetic-min-tokens", "200",
                         "--synthetic-max-tokens", "900", "--quiet", *extra])


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_on_a_fake_tree(tmp_path, count):
    root = fake_tree(tmp_path / "src")
    out = tmp_path / "out"
    m = b.build(fake_args(root, out), guards=fake_guards())
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.jsonl",
                                                    "validation.jsonl"]  # no temp files left
    rows = {s: read_rows(out / f"{s}.jsonl") for s in ("train", "validation")}
    docs = {d["id"]: d for d in m["documents"]}
    text = {r["id"]: r["text"] for rs in rows.values() for r in rs}
    # one document per package, files in sorted order after a header each
    zoo = text["stdlib/zoo"]
    heads = [ln for ln in zoo.split("\n") if ln.startswith("# file: ")]
    assert heads == [f"# file: Lib/zoo/{m}.py" for m in ("__init__", "alpha", "beta", "gamma")]
    assert docs["stdlib/zoo"]["files"] == [h[8:] for h in heads]
    assert "man/man1/foo" in text and text["man/man1/foo"].index("FOOa(1)") < \
        text["man/man1/foo"].index("FOOb(1)")
    assert "doc/pkgx" in text and "not documentation" not in text["doc/pkgx"]
    # the minimum length holds; the tiny module is dropped, not written
    assert all(d["tokens"] >= 300 for d in m["documents"])
    assert "stdlib/tiny" in {d["id"] for d in m["dropped_below_min_tokens"]}
    # haystack files are out: a planted source path and a planted text hash
    why = {e["file"]: e["reason"] for e in m["exclusions"]["haystack_excluded"]}
    assert why["Lib/planted_path.py"].startswith("haystack source path")
    assert why["Lib/copied.py"].startswith("haystack text hash")
    assert not any("planted_path" in t or "HAYSTACK_VALUE" in t for t in text.values())
    assert m["exclusions"]["missing_folders"] == [f"info {root / 'no-info-here'}"]
    # exact token counts, splits, synthetic rows, output hashes
    real = [d for d in m["documents"]]
    assert count([text[d["id"]] for d in real]) == [d["tokens"] for d in real]
    assert len(rows["validation"]) == 1 and m["totals"]["validation"]["rows"] == 1
    assert {r["id"] for r in rows["validation"]}.isdisjoint(r["id"] for r in rows["train"])
    synth = m["synthetic"]["rows"]
    assert len(synth) == round(0.25 / 0.75 * (len(rows["train"]) - len(synth))) >= 1
    assert all(r["tokens"] <= 900 for r in synth)
    assert all(r["base"] not in {v["id"] for v in rows["validation"]} for r in synth)
    # synthetic training rows carry their answers' characters as loss spans; real rows none
    by_id = {r["id"]: r for r in rows["train"]}
    for r in synth:
        spans = by_id[r["id"]]["loss_spans"]
        assert [by_id[r["id"]]["text"][a:e] for a, e in spans] == \
            [" " + q["answer"] for q in r["questions"]]
    assert not any("loss_spans" in r for r in rows["train"] if r["source"] != "synthetic")
    for name in ("train.jsonl", "validation.jsonl"):
        digest = hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert m["outputs"][name]["sha256"] == digest
    assert json.loads((out / "manifest.json").read_text())["python"] == m["python"]
    assert set(m["real_documents"]["reach"]) == {">=8192", ">=16384", ">=32768"}
    # deterministic for a given machine
    m2 = b.build(fake_args(root, tmp_path / "again"), guards=fake_guards())
    assert m2["outputs"] == m["outputs"]


def test_synthetic_seed_changes_only_the_synthetic_rows(tmp_path, count):
    root = fake_tree(tmp_path / "src")
    b.build(fake_args(root, tmp_path / "a"), guards=fake_guards())
    b.build(fake_args(root, tmp_path / "b", "--synthetic-seed", "7"), guards=fake_guards())
    rows = {d: read_rows(tmp_path / d / "train.jsonl") for d in ("a", "b")}
    real = {d: sorted((r["id"], r["text"]) for r in rs if r["source"] != "synthetic")
            for d, rs in rows.items()}
    sa, sc = ({r["id"]: r["text"] for r in rows[d] if r["source"] == "synthetic"}
              for d in ("a", "b"))
    assert real["a"] == real["b"]
    assert (tmp_path / "a" / "validation.jsonl").read_bytes() == \
        (tmp_path / "b" / "validation.jsonl").read_bytes()
    assert len(sa) == len(sc) >= 1 and all(i.startswith("synthetic-7/") for i in sc)
    assert set(sa.values()).isdisjoint(sc.values())  # fresh rows, ids that cannot collide


def test_synthetic_families_changes_only_the_synthetic_rows(tmp_path, count):
    root = fake_tree(tmp_path / "src")
    b.build(fake_args(root, tmp_path / "a"), guards=fake_guards())
    b.build(fake_args(root, tmp_path / "b", "--synthetic-families", "single"),
            guards=fake_guards())
    rows = {d: read_rows(tmp_path / d / "train.jsonl") for d in ("a", "b")}
    real = {d: sorted((r["id"], r["text"]) for r in rs if r["source"] != "synthetic")
            for d, rs in rows.items()}
    assert real["a"] == real["b"]
    assert (tmp_path / "a" / "validation.jsonl").read_bytes() == \
        (tmp_path / "b" / "validation.jsonl").read_bytes()
    synth = json.loads((tmp_path / "b" / "manifest.json").read_text())["synthetic"]
    assert synth["families"] == ["single"] and synth["rows"]
    assert {r["family"] for r in synth["rows"]} == {"single"}


def test_build_fails_on_an_evaluation_wording(tmp_path):
    root = fake_tree(tmp_path / "src")
    (root / "Lib" / "zoo" / "beta.py").write_text(
        module_text("zoo_beta", 25) + "\n# One of the special magic numbers for kiwi is: 123.\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"stdlib/zoo: 'one of the special magic numbers for'"):
        b.build(fake_args(root, out, "--synthetic-frac", "0"), guards=fake_guards())
    assert not out.exists() or not any(out.iterdir())  # nothing half written
    b.build(fake_args(root, out, "--synthetic-frac", "0", "--exclude", "Lib/zoo/beta.py"),
            guards=fake_guards())  # leaving the file out is the way through
    built = (out / "train.jsonl").read_text() + (out / "validation.jsonl").read_text()
    assert "stdlib/zoo" in built


def test_list_only_writes_sources_without_tokenizing(tmp_path):
    root = fake_tree(tmp_path / "src")
    m = b.build(fake_args(root, tmp_path / "out", "--list-only"), guards=fake_guards())
    listed = json.loads((tmp_path / "out" / "sources.json").read_text())
    assert listed["files"] == m["files"] and "documents" not in m
    assert {f["file"] for f in m["files"]} >= {"Lib/zoo/alpha.py", "man/man1/foo-a.1.gz"}


def test_bad_options_give_one_line(capsys):
    for argv in (["--synthetic-frac", "1.0"], ["--source-chars", "nope=1"],
                 ["--min-tokens", "9", "--target-tokens", "8"], ["--synthetic-depth", "0.5", "2"],
                 ["--synthetic-families", "nope"]):
        with pytest.raises(SystemExit) as e:
            b.parse_args(argv)
        assert e.value.code == 2
    assert "--synthetic-frac must be in [0, 1)" in capsys.readouterr().err


def test_this_machines_stdlib_leaves_out_every_haystack_document(tmp_path):
    """The real asset's dev and test documents on this interpreter's stdlib (the test suite
    is left out to keep this fast: no haystack document comes from Lib/test)."""
    args = b.parse_args(["--out", str(tmp_path), "--sources", "stdlib", "--exclude",
                         "Lib/test/*", "--quiet"])
    guard, _ = b.haystack_guard()
    pieces, report = b.collect(args, guard, b.Log(quiet=True))
    hay = [d for split in haystack.SPLITS for d in haystack.documents(split)]
    assert {d["source_path"] for d in haystack.test_documents()} <= {d.source_path for d in hay}
    used = {p.rel.removeprefix("Lib/") for p in pieces}
    excluded = {e["file"].removeprefix("Lib/") for e in report["haystack_excluded"]}
    present = {d.source_path for d in hay if (Path(args.stdlib) / d.source_path).is_file()}
    assert present, "no haystack source file on this machine's stdlib"
    assert present <= excluded and not used & {d.source_path for d in hay}
    hashes = {d.sha256 for d in hay}
    for p in pieces:
        body = p.text.split("\n", 1)[1]
        assert not {sha256(body), sha256(clean(body))} & hashes, p.rel
