"""Every relative Markdown link in the documentation points at something that exists.

Checked files: README.md, docs/**/*.md, scripts/README.md, benchmarks/results/**/README.md.
A link `[text](path#anchor)` (or `#anchor`, or an image, or a reference definition
`[ref]: path`) is resolved against its file's folder (a leading `/` means the repository root);
the path must exist, and an anchor into a Markdown file must be one of that file's heading slugs
(GitHub's rules) or an explicit `<a id=...>`/`<a name=...>`. Links with a scheme (http:, https:,
mailto:, ...) are not checked; neither is anything inside fenced code blocks, inline code spans or
HTML comments, so paths written as plain text in backticks are never links. No network, no JAX.
"""

import re
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parent.parent

_FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
# A code span: a run of backticks, then anything up to the same run (not across a blank line).
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)
# [text](target) or ![alt](target); the target may be <...>, may hold balanced parentheses and
# may be followed by a "title". The text may hold one level of nested brackets.
_INLINE_LINK = re.compile(
    r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*"
    r"(<[^<>\n]*>|(?:[^\s()]|\([^\s()]*\))*)"
    r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^()]*\)))?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^<>\n]*>|\S+)", re.M)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
# A line that cannot be a setext heading's text: a table row, list item or quote.
_NOT_PARAGRAPH = re.compile(r"^\s*(\||[-*+>]\s|\d+[.)]\s)")
_EXPLICIT_ANCHOR = re.compile(r"<a\s[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)


def doc_files():
    files = [REPO / "README.md", REPO / "scripts" / "README.md"]
    files += sorted((REPO / "docs").rglob("*.md"))
    files += sorted((REPO / "benchmarks" / "results").rglob("README.md"))
    return [f for f in files if f.is_file()]


def _blank(text):
    """The same text with every character but newlines turned into a space (keeps line numbers)."""
    return re.sub(r"[^\n]", " ", text)


def strip_code(text):
    """Blank fenced code blocks, HTML comments and inline code spans; line numbers are kept."""
    out, fence = [], None
    for line in text.split("\n"):
        if fence is None:
            m = _FENCE_OPEN.match(line)
            if m:
                fence = m.group(1)
                out.append("")
                continue
            out.append(line)
        else:
            stripped = line.strip()
            if stripped and set(stripped) == {fence[0]} and len(stripped) >= len(fence):
                fence = None
            out.append("")
    text = "\n".join(out)
    text = _HTML_COMMENT.sub(lambda m: _blank(m.group(0)), text)
    return _CODE_SPAN.sub(lambda m: _blank(m.group(0)), text)


def github_slug(heading):
    """GitHub's anchor for a heading's text: markup reduced to its text, lower-cased, every
    character but letters, digits, spaces, hyphens and underscores removed, spaces to hyphens."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # links: text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def heading_texts(text):
    """The headings of a Markdown text (ATX and setext), outside code blocks, in order."""
    lines = strip_code(text).split("\n")
    raw = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        m = _ATX_HEADING.match(line)
        if m:
            # Take the heading from the raw line: code spans count (their backticks are dropped).
            rm = _ATX_HEADING.match(raw[i])
            out.append((rm or m).group(2) or "")
        elif (i > 0 and _SETEXT_UNDERLINE.match(line) and lines[i - 1].strip()
              and not _ATX_HEADING.match(lines[i - 1])
              and not _NOT_PARAGRAPH.match(lines[i - 1])):
            out.append(raw[i - 1].strip())
    return out


def anchors(text):
    """Every anchor a Markdown file offers: heading slugs (duplicates get -1, -2, ...) and
    explicit <a id/name> anchors."""
    found, seen = set(), {}
    for heading in heading_texts(text):
        slug = github_slug(heading)
        if slug in seen:
            seen[slug] += 1
            found.add(f"{slug}-{seen[slug]}")
        else:
            seen[slug] = 0
            found.add(slug)
    found.update(_EXPLICIT_ANCHOR.findall(text))
    return found


def links(text):
    """(line number, target) for each link in the text outside code."""
    clean = strip_code(text)
    out = []
    for pattern in (_INLINE_LINK, _REF_DEF):
        for m in pattern.finditer(clean):
            target = m.group(1)
            if target.startswith("<") and target.endswith(">"):
                target = target[1:-1]
            out.append((clean.count("\n", 0, m.start(1)) + 1, target))
    return sorted(out)


def broken_links():
    """'file:line: target: why' for each broken relative link in the documentation."""
    anchor_cache, problems = {}, []

    def anchors_of(path):
        if path not in anchor_cache:
            anchor_cache[path] = anchors(path.read_text(encoding="utf-8"))
        return anchor_cache[path]

    for doc in doc_files():
        rel = doc.relative_to(REPO)
        for line, target in links(doc.read_text(encoding="utf-8")):
            where = f"{rel}:{line}: ({target})"
            if not target:
                problems.append(f"{where}: empty link target")
                continue
            if _SCHEME.match(target) or target.startswith("//"):
                continue  # http(s)://, mailto:, ...: not a path in the repository
            path_part, _, anchor = target.partition("#")
            path_part = unquote(path_part.split("?", 1)[0])
            if not path_part:
                dest = doc
            elif path_part.startswith("/"):
                dest = REPO / path_part.lstrip("/")
            else:
                dest = doc.parent / path_part
            resolved = dest.resolve()
            if resolved != REPO and REPO not in resolved.parents:
                problems.append(f"{where}: points outside the repository")
                continue
            if not resolved.exists():
                problems.append(f"{where}: no such file or folder {resolved.relative_to(REPO)}")
                continue
            if anchor and resolved.is_file() and resolved.suffix.lower() == ".md":
                if unquote(anchor) not in anchors_of(resolved):
                    problems.append(f"{where}: no heading or anchor '#{anchor}' in "
                                    f"{resolved.relative_to(REPO)}")
    return problems


def test_github_slug():
    assert (github_slug("The shipped 32K model: `smollm2-135m-32k`")
            == "the-shipped-32k-model-smollm2-135m-32k")
    assert (github_slug("TPLA with the Mosaic `mla_decode` (08:31)")
            == "tpla-with-the-mosaic-mla_decode-0831")
    assert github_slug("Kernels (`pallas_kernels/dsa_ops.py`)") == "kernels-pallas_kernelsdsa_opspy"
    assert github_slug("Model of a 1M-token prefill, Llama-3-8B shapes") == \
        "model-of-a-1m-token-prefill-llama-3-8b-shapes"
    assert github_slug("Results & caveats -- v2.1") == "results--caveats----v21"
    assert github_slug("See [the docs](docs/x.md) now") == "see-the-docs-now"


def test_anchors_duplicates_code_and_explicit():
    text = ("# Title\n## Notes\n```bash\n# not a heading\n[x](missing.md)\n```\n"
            "## Notes\n## Notes\nSetext one\n----------\n<a id=\"custom-id\"></a>\n")
    assert anchors(text) == {"title", "notes", "notes-1", "notes-2", "setext-one", "custom-id"}


def test_links_skip_code():
    text = ("See [a](a.md#x) and `[b](b.md)` and ``[c](c.md)``.\n```\n[d](d.md)\n```\n"
            "Plain `benchmarks/results/x` text, [e](<e f.md> \"title\"), ![img](p.png).\n"
            "<!-- [g](g.md) -->\n[ref]: docs/h.md\n")
    assert links(text) == [(1, "a.md#x"), (5, "e f.md"), (5, "p.png"), (7, "docs/h.md")]


def test_relative_doc_links_resolve():
    problems = broken_links()
    assert not problems, (f"{len(problems)} broken documentation link(s):\n  "
                          + "\n  ".join(problems))
