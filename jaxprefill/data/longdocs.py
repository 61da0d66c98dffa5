"""Long documents from text every machine has: the Python standard library, man pages, info
manuals and package documentation under /usr/share. No network, no downloads.

The walkers list *files* in a deterministic order (sorted walks) and give each a ``group`` (the
unit that becomes one document: a stdlib package, a man-page family, a package's doc folder, an
info manual); :func:`file_text` turns one file into normalized text; :func:`piece` wraps it
with a one-line path header. Missing folders give empty lists, never errors: the same builder
runs on machines with another Python version or another /usr/share.

Piece texts are made so that tokenizing a concatenation of pieces gives exactly the sum of the
pieces' token counts for byte-level BPE tokenizers of the GPT-2 family: every piece starts
with a non-space character (its header) and ends with one newline after a non-space character,
so no pre-token crosses a piece boundary. A document's token count is then the sum of its
pieces' counts (tested; the builder re-checks a sample).
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import os
import re
import zlib
from pathlib import Path

# Folders of the stdlib that are not its sources.
STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "lib-dynload"}
STDLIB_SUFFIXES = (".py", ".txt")
# /usr/share/doc: what counts as readable documentation (a name prefix or an extension, with
# or without .gz); copyright files, HTML, logs, JSON and code are left out.
DOC_NAMES = re.compile(r"(?i)^(readme|news|changes|changelog|history|release|todo|faq|"
                       r"thanks|authors|bugs|upgrading)")
DOC_SUFFIXES = (".txt", ".md", ".rst", ".text")
DOC_SKIP = re.compile(r"(?i)(\.(html?|json|log|ps|pdf|xml|css|js|png|gif|svg|c|h|py|pl|pm|sh)"
                      r"(\.gz)?$)|^copyright$")


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One input file: ``source`` (stdlib, docstrings, man, info, doc), ``group`` (the
    document it belongs to), ``rel`` (its path shown in headers and the manifest), ``path``."""

    source: str
    group: str
    rel: str
    path: Path


@dataclasses.dataclass
class Piece:
    """A file's text with its header, ready to concatenate (see the module docstring)."""

    source: str
    group: str
    rel: str
    text: str
    truncated: bool = False


# ---------------------------------------------------------------------------- walkers

def _walk(root: Path, skip: set[str] = frozenset()) -> list[Path]:
    """Regular files under ``root`` (symlinks left out: they duplicate other files), sorted by
    relative path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not p.is_symlink() and p.is_file():
                out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def stdlib_files(root: Path, max_group_bytes: int) -> list[SourceFile]:
    """The stdlib's ``.py`` / ``.txt`` files; group = top-level package or module, except a
    package over ``max_group_bytes`` (``test``), whose children become the groups."""
    if not root.is_dir():
        return []
    files = [p for p in _walk(root, STDLIB_SKIP) if p.suffix in STDLIB_SUFFIXES]
    rels = [p.relative_to(root).as_posix() for p in files]
    size: dict[str, int] = {}
    for p, rel in zip(files, rels):
        top = rel.split("/")[0]
        size[top] = size.get(top, 0) + p.stat().st_size
    out = []
    for p, rel in zip(files, rels):
        parts = rel.split("/")
        deep = size[parts[0]] > max_group_bytes and len(parts) > 1
        group = "/".join(parts[:2]) if deep else parts[0]
        out.append(SourceFile("stdlib", _stem(group), f"Lib/{rel}", p))
    return out


def _stem(name: str) -> str:
    return name[:-3] if name.endswith(".py") else name


def man_files(root: Path) -> list[SourceFile]:
    """English man pages (``man1`` ... ``man9`` directly under ``root``); group = section and
    name prefix (``git-add``, ``git-log`` -> ``man1/git``), so a command family is one
    document."""
    out = []
    if not root.is_dir():
        return out
    for sec in sorted(d for d in os.listdir(root) if re.fullmatch(r"man[1-9][a-z]*", d)):
        for p in _walk(root / sec):
            family = re.split(r"[-_.]", p.name, maxsplit=1)[0] or p.name
            out.append(SourceFile("man", f"{sec}/{family}", f"man/{sec}/{p.name}", p))
    return out


def info_files(root: Path) -> list[SourceFile]:
    """Info manuals; group = manual (``find.info``, ``find.info-1``, ... in part order)."""
    if not root.is_dir():
        return []
    out = []
    for p in _walk(root):
        m = re.fullmatch(r"(.+?)\.info(?:-(\d+))?(?:\.gz)?", p.name)
        if m:
            out.append((m.group(1), int(m.group(2) or 0), p))
    return [SourceFile("info", name, f"info/{p.name}", p) for name, _, p in sorted(out)]


def doc_files(root: Path) -> list[SourceFile]:
    """READMEs, upstream changelogs, NEWS and plain-text docs under ``root`` (/usr/share/doc);
    group = package folder. Debian packaging changelogs (``changelog.Debian``: templated
    entries, one per package) are left out."""
    if not root.is_dir():
        return []
    out = []
    for p in _walk(root):
        rel = p.relative_to(root).as_posix()
        name = p.name[:-3] if p.name.endswith(".gz") else p.name
        if "/" not in rel or DOC_SKIP.search(name) or name.startswith("changelog.Debian"):
            continue
        if DOC_NAMES.match(name) or name.lower().endswith(DOC_SUFFIXES):
            out.append(SourceFile("doc", rel.split("/")[0], f"doc/{rel}", p))
    return out


# ---------------------------------------------------------------------------- file text

def read_bytes(path: Path, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the file (gunzipped if ``.gz``) and whether it had more."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit], len(data) > limit


def decode(data: bytes) -> str | None:
    """UTF-8 text, or None for binary data (a NUL byte, or over 1% undecodable or control
    characters)."""
    if b"\x00" in data:
        return None
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") + len(re.findall(r"[\x01-\x08\x0e-\x1a\x1c-\x1f\x7f]", text))
    return None if bad > 0.01 * max(len(text), 1) else text


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]+")
_TRAILING = re.compile(r"[ \t]+$", re.M)
_BLANKS = re.compile(r"\n{4,}")


def normalize(text: str) -> str:
    """Newlines unified, control characters other than tab dropped, trailing blanks cut, runs
    of 3+ blank lines cut to 2, no leading or trailing blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING.sub("", _CONTROL.sub("", text))
    return _BLANKS.sub("\n\n\n", text).strip("\n")


def file_text(f: SourceFile, max_chars: int) -> tuple[str, bool] | None:
    """(normalized text, truncated) of one file, or None if it is binary or unreadable. Man
    pages go through :func:`roff_to_text`, info files through :func:`info_to_text`; a file
    over ``max_chars`` keeps its head, cut at a line end (changelogs: the newest entries)."""
    try:
        raw, more = read_bytes(f.path, 4 * max_chars)
    except (OSError, EOFError, zlib.error):  # unreadable or a broken .gz: left out, counted
        return None
    if f.source == "info":  # makeinfo's index markers hold NUL bytes, its tag tables DEL
        raw = raw.replace(b"\x00\x08[", b"").replace(b"\x00\x08]", b"").replace(b"\x7f", b" ")
    text = decode(raw)
    if text is None:
        return None
    if f.source == "man":
        text = roff_to_text(text)
    elif f.source == "info":
        text = info_to_text(text)
    text = normalize(text)
    if len(text) > max_chars:
        text, more = text[:text.rfind("\n", 0, max_chars) + 1 or max_chars].rstrip(), True
    return text, more


def header(source: str, rel: str, continued: bool = False) -> str:
    """The piece's first line: ``# file: Lib/x.py`` for code, ``==> path <==`` otherwise."""
    tail = " (continued)" if continued else ""
    return f"# file: {rel}{tail}" if source == "stdlib" else f"==> {rel}{tail} <=="


def piece(source: str, group: str, rel: str, body: str, truncated: bool = False,
          continued: bool = False) -> Piece:
    """Header line + ``body`` + one newline (``body`` non-empty, normalized)."""
    body = body.rstrip()
    return Piece(source, group, rel, f"{header(source, rel, continued)}\n{body}\n", truncated)


def split_piece(p: Piece, parts: int) -> list[Piece]:
    """``p`` cut at line ends into ``parts`` pieces of about equal length (a line longer than
    a part is cut too); the later ones get a ``(continued)`` header."""
    body = p.text.split("\n", 1)[1].rstrip()
    per = max(1, len(body) // parts)
    # (separator, text) segments: lines, and slices of lines longer than a part
    segs = [("\n" if i == 0 else "", ln[i:i + per]) for ln in body.split("\n")
            for i in range(0, max(len(ln), 1), per)]
    chunks, cur, size = [], "", 0
    for sep, text in segs:
        cur += (sep if cur else "") + text
        size += len(text) + 1
        if size >= per and len(chunks) < parts - 1:
            chunks.append(cur)
            cur, size = "", 0
    chunks.append(cur)
    chunks = [c for c in chunks if c.strip()]
    return [piece(p.source, p.group, p.rel, c, p.truncated, continued=i > 0)
            for i, c in enumerate(chunks)]


# ---------------------------------------------------------------------------- roff

_ROFF_CHARS = {"em": "--", "en": "-", "hy": "-", "aq": "'", "dq": '"', "lq": '"', "rq": '"',
               "oq": "'", "cq": "'", "bu": "*", "co": "(c)", "rg": "(R)", "tm": "(TM)",
               "de": "deg", "mu": "x", "di": "/", "+-": "+-", "<=": "<=", ">=": ">=",
               "!=": "!=", "->": "->", "<-": "<-", "ti": "~", "ha": "^", "rs": "\\",
               "sl": "/", "ba": "|", "or": "|", "at": "@", "sh": "#", "Do": "$", "ga": "`",
               "aa": "'", "bv": "|", "fo": "<", "fc": ">", "Fo": "<<", "Fc": ">>"}
_ROFF_ESC = re.compile(r"""\\(?:
      f(?:\(..|\[[^\]]*\]|.)          # font change
    | s[-+]?(?:\(\d\d|\[\d+\]|\d)      # size change
    | \*(?:\(..|\[[^\]]*\]|.)          # string interpolation
    | n[-+]?(?:\(..|\[[^\]]*\]|.)      # number register
    | [kz].                            # marks
    | [hvwlLxoDbHSRZNXYjAB](?:'[^']*'|\[[^\]]*\])  # motions, width, drawing, ...
    | (\(..)                           # named character (group 1)
    | \[([^\]]*)\]                     # named character (group 2)
    | (.)                              # any other escape (group 3)
    )""", re.X)
_SIMPLE_ESC = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "&": "", "|": "",
               "^": "", "/": "", ",": "", "c": "", "%": "", "{": "", "}": "", ":": "",
               ".": ".", "'": "'", "`": "`", "t": " ", "p": "", "a": "", "d": "", "u": "",
               "r": "", "!": "", "E": "\\"}
# man(7) / mdoc(7) macros whose arguments are text (the rest are layout and are dropped).
_TEXT_MACROS = {"B", "I", "SM", "SB", "BR", "BI", "IB", "IR", "RB", "RI", "OP", "SY", "UR",
                "MT", "Nm", "Nd", "Fl", "Ar", "Op", "Xr", "Pa", "It", "Em", "Sy", "Li", "Cm",
                "Va", "Dv", "Ev", "Ic", "Fn", "Fa", "Ft", "Fd", "In", "Dl", "D1", "Dq", "Sq",
                "Pq", "Ql", "Aq", "Bq", "Brq", "Qq", "An", "Lk", "Mt", "Er", "Vt", "Tn", "Ms",
                "St", "Ux", "Bx", "At", "Nx", "Fx", "Ox", "Ad", "Cd", "Lb", "Ot", "No", "Ns",
                "%A", "%T", "%B", "%J", "%D", "%O", "%N", "%V", "%P"}
_HEADINGS = {"SH", "SS", "Sh", "Ss"}
_PARAGRAPH = {"PP", "LP", "P", "sp", "Pp", "Lp", "Bl", "El", "Bd", "Ed", "RS", "RE", "HP", "It",
              "Rs", "Re", "YS", "TP", "TQ", "IP", "Ex", "Rv"}
_NOFILL = {"nf": True, "EX": True, "Bd": True, "fi": False, "EE": False, "Ed": False}
_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}  # arguments alternate fonts, no blanks
_MDOC_WORDS = ({m for m in _TEXT_MACROS if re.fullmatch(r"[A-Z][a-z]{1,2}|%[A-Z]", m)}
               | {"Oo", "Oc", "Ec", "Eo", "Pc", "Po", "Qo", "Qc", "Do", "Dc", "So", "Sc", "Bo",
                  "Bc", "Ao", "Ac", "Ta"})


def _roff_inline(s: str) -> str:
    return _ROFF_ESC.sub(_roff_sub, s) if "\\" in s else s


def _roff_sub(m: re.Match) -> str:
    if m.group(1):
        return _ROFF_CHARS.get(m.group(1)[1:], "")
    if m.group(2) is not None:
        name = m.group(2)
        if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
            return chr(int(name[1:], 16))
        return _ROFF_CHARS.get(name, "")
    if m.group(3) is not None:
        return _SIMPLE_ESC.get(m.group(3), m.group(3))
    return ""


_ARG = re.compile(r'"[^"]*"?|\S+')


def _macro_args(rest: str) -> list[str]:
    """Arguments of a macro line: blanks separate, double quotes group."""
    return [a[1:-1] if a.startswith('"') and a.endswith('"') and len(a) > 1 else a
            for a in _ARG.findall(rest)]


def _mdoc_args(name: str, args: list[str], page: str) -> list[str]:
    """mdoc arguments with nested macro names dropped: ``Fl x`` -> ``-x``, ``Xr ls 1`` ->
    ``ls(1)``, a bare ``Nm`` -> the page's name."""
    if name == "Xr" and len(args) >= 2:
        return [f"{args[0]}({args[1]})", *args[2:]]
    if name == "Nm" and not args:
        return [page]
    out, dash = [], name == "Fl"
    for a in args:
        if a == "Fl":
            dash = True
        elif a == "Nm":
            out.append(page)
        elif a not in _MDOC_WORDS:
            out.append("-" + a if dash else a)
            dash = False
    return out


class _RoffWriter:
    """Filled paragraphs (one line each) and no-fill lines, in order."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.para: list[str] = []
        self.nofill = False

    def flush(self) -> None:
        if self.para:
            self.out.append(" ".join(self.para))
            self.para = []

    def blank(self) -> None:
        self.flush()
        if self.out and self.out[-1]:
            self.out.append("")

    def line(self, text: str, own_line: bool = False) -> None:
        if self.nofill or own_line:
            self.flush()
            self.out.append(text)
        elif text.strip():
            self.para.append(text.strip())


def roff_to_text(src: str) -> str:
    """Readable text of a man page (man(7) or mdoc(7) roff): comments, definitions, troff-only
    branches and layout requests dropped; headings on their own lines; running text filled into
    one line per paragraph; no-fill blocks (examples) and table rows kept line by line; font
    and character escapes resolved. Not a typesetter. A page that only redirects
    (``.so other.1``) gives empty text."""
    w = _RoffWriter()
    skip_until = None  # a closing request: ``..`` after .de/.ig, ``\}`` after a troff branch
    table, tab = 0, "\t"  # table 0: none, 1: options/format lines, 2: data rows
    mdoc = bool(re.search(r"^\.Dd\b", src, re.M))
    page = ""
    tag_next = False  # .TP: the next line is a tag, on its own line
    for line in src.split("\n"):
        if skip_until is not None:
            if skip_until in line:
                skip_until = None
            continue
        if line.startswith((".\\\"", "'\\\"", ".\\#", "\\\"")) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")) and len(line) > 1:
            name, _, rest = line[1:].lstrip().partition(" ")
            rest = rest.strip()
            if name in ("de", "de1", "am", "ig"):
                skip_until = ".."
            elif name in ("el", "if", "ie"):
                cond, _, body = rest.partition(" ")
                if name != "el" and cond in ("n", "!t"):  # the nroff branch: keep its text
                    body = body.replace("\\{", "").rstrip("\\").strip()
                    if body and not body.startswith((".", "'")):
                        w.line(_roff_inline(body))
                elif "\\{" in rest and (name == "el" or cond in ("t", "!n")):
                    skip_until = "\\}"  # a troff-only block
            elif name == "TS":
                w.blank()
                table, tab = 1, "\t"
            elif name == "TE":
                w.blank()
                table = 0
            elif name in ("TH", "Dt"):
                args = _macro_args(_roff_inline(rest))
                if args:
                    page = page or args[0].lower()
                    w.line(f"{args[0]}({args[1]})" if len(args) > 1 else args[0], own_line=True)
                    w.blank()
            elif name in _HEADINGS:
                w.blank()
                text = _roff_inline(" ".join(_macro_args(rest)))
                if text.strip():
                    w.line(text, own_line=True)
            else:
                if name in _NOFILL:
                    w.flush()
                    w.nofill = _NOFILL[name]
                if name in _PARAGRAPH:
                    w.blank()
                elif name == "br":
                    w.flush()
                tag_next = name == "TP" or tag_next and name not in _PARAGRAPH
                args = _macro_args(rest)
                if name == "IP":
                    args = args[:1]
                elif name == "Nm" and args and not page:
                    page = args[0]
                elif mdoc:
                    args = _mdoc_args(name, args, page)
                if name in _TEXT_MACROS or name == "IP":
                    joiner = "" if name in _ALTERNATING else " "
                    text = _roff_inline(joiner.join(args)).strip()
                    if text:
                        w.line(text, own_line=name in ("IP", "It") or tag_next)
                        tag_next = False
            continue
        if table == 1:
            sep = re.search(r"tab\s*\((.)\)", line)
            tab = sep.group(1) if sep else tab
            table = 2 if line.rstrip().endswith(".") else 1
            continue
        text = _roff_inline(line)
        if table == 2:
            w.line("  ".join(c.strip() for c in text.split(tab)), own_line=True)
        else:
            w.line(text, own_line=tag_next)
            tag_next = False
    w.flush()
    return "\n".join(w.out)


# ---------------------------------------------------------------------------- info

def info_to_text(src: str) -> str:
    """Readable text of an info file: node separators, ``File: ..., Node: ...`` lines, the
    indirect table and the tag table dropped; the manual's text kept in order."""
    out: list[str] = []
    for block in src.split("\x1f"):
        head = block.lstrip("\n")
        if head.startswith(("Tag Table:", "Indirect:", "End Tag Table")):
            continue
        lines = head.split("\n")
        if lines and lines[0].startswith("File: ") and "Node: " in lines[0]:
            lines = lines[1:]
        out.append("\n".join(lines))
    return "\n".join(out)


# ---------------------------------------------------------------------------- docstrings

def docstring_outline(source: str, module: str) -> str:
    """The docstrings of one module as an outline, in source order: the module's, then each
    class and function (methods nested by two spaces) as ``class Name(bases):`` /
    ``def name(args):`` followed by its docstring. Objects without a docstring are left out;
    empty for a module without any (or one that does not parse on this Python)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    out: list[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        out.append(doc)

    def visit(body: list[ast.stmt], indent: str, prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                inner: list[str] = []
                if doc:
                    if isinstance(node, ast.ClassDef):
                        bases = ", ".join(ast.unparse(b) for b in node.bases)
                        sig = f"class {prefix}{node.name}({bases}):"
                    else:
                        sig = f"def {prefix}{node.name}({ast.unparse(node.args)}):"
                    pad = indent + "    "
                    inner = [indent + sig] + [pad + ln if ln else "" for ln in doc.split("\n")]
                    out.append("\n".join(inner))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, indent + "  ", f"{prefix}{node.name}.")

    visit(tree.body, "", "")
    return "\n\n".join(out)


def module_name(rel: str) -> str:
    """``Lib/asyncio/base_events.py`` -> ``asyncio.base_events`` (``__init__`` dropped)."""
    parts = rel.removeprefix("Lib/").removesuffix(".py").split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)
