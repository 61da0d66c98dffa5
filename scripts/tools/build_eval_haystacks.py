"""Build the haystack documents of `jaxprefill eval` (jaxprefill/assets/eval_haystacks.json.gz).

Run once on a machine with a CPython source tree; the output is committed, so evaluation never
reads the running interpreter's stdlib (machines with another Python version build the same
prompts):

    python -m scripts.tools.build_eval_haystacks           # this interpreter's stdlib
    python -m scripts.tools.build_eval_haystacks --root /usr/lib/python3.11 --out /tmp/h.json.gz

Two kinds of text, each split into disjoint `dev` and `test` document sets:

* code: whole standard-library modules (``CODE`` below);
* prose: the Python Language Reference topics of ``pydoc_data/topics.py`` (the plain-text docs
  `help()` shows; balanced between the splits by size) and IDLE's plain-text release notes.

All of it is CPython's own text, under the PSF License Agreement (redistribution allowed with
the PSF notice, which the asset carries in ``license_text``). Each document records its source
path inside the CPython tree and the sha256 of its stored text
(`jaxprefill.eval.haystack.test_documents()` exposes the test ones).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import platform
import sys
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "jaxprefill" / "assets" / "eval_haystacks.json.gz"

# Whole modules, about 550 KB (~150K tokens) of code per split; no module is in both.
CODE = {
    "dev": ["argparse.py", "inspect.py", "tarfile.py", "subprocess.py", "enum.py",
            "threading.py"],
    "test": ["doctest.py", "difflib.py", "datetime.py", "mailbox.py", "ipaddress.py",
             "dataclasses.py", "shutil.py"],
}
# Plain-text prose besides the reference topics.
PROSE_FILES = {"dev": ["idlelib/NEWS.txt"],
               "test": ["idlelib/NEWS2x.txt", "idlelib/HISTORY.txt", "idlelib/README.txt"]}
TOPICS = "pydoc_data/topics.py"
LICENSE = "PSF-2.0 (Python Software Foundation License Version 2)"


def clean(text: str) -> str:
    """Trailing spaces removed, tabs expanded, runs of 3+ blank lines cut to 2, one final
    newline: the same bytes on every platform."""
    lines = [line.rstrip().expandtabs(8) for line in text.replace("\r\n", "\n").split("\n")]
    out: list[str] = []
    blank = 0
    for line in lines:
        blank = blank + 1 if not line else 0
        if blank <= 2:
            out.append(line)
    return "\n".join(out).strip("\n") + "\n"


def reference_topics(root: Path) -> dict[str, str]:
    """topic name -> text of pydoc_data/topics.py, read with ast (never imported)."""
    tree = ast.parse((root / TOPICS).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "topics":
            return ast.literal_eval(node.value)
    raise ValueError(f"{root / TOPICS}: no 'topics = {{...}}' assignment")


def split_topics(topics: dict[str, str]) -> dict[str, list[str]]:
    """Topics assigned greedily (largest group first) to the split with less text: two halves
    of about equal size. Topics that share a name stem (``typesseq``, ``typesseq-mutable``) or
    any line of 50+ characters (``compound`` repeats ``if``, ``while``, ...) form one group and
    go to the same split, so no text straddles dev and test. A topic whose text an earlier
    topic already has (``else`` = ``if``) is left out."""
    parent = {name: name for name in topics}

    def find(x: str) -> str:
        while parent[x] != x:
            x = parent[x]
        return x

    def join(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    seen_line: dict[str, str] = {}
    seen_stem: dict[str, str] = {}
    for name in sorted(topics):
        join(name, seen_stem.setdefault(name.split("-")[0], name))
        for line in topics[name].split("\n"):
            if len(line.strip()) >= 50:
                join(name, seen_line.setdefault(line.strip(), name))
    first: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for name in sorted(topics):
        if first.setdefault(topics[name], name) == name:
            groups.setdefault(find(name), []).append(name)
    size = {g: sum(len(topics[n]) for n in names) for g, names in groups.items()}
    out: dict[str, list[str]] = {"dev": [], "test": []}
    total = {"dev": 0, "test": 0}
    for g in sorted(groups, key=lambda g: (-size[g], g)):
        split = "dev" if total["dev"] <= total["test"] else "test"
        out[split] += groups[g]
        total[split] += size[g]
    return out


def document(name: str, kind: str, split: str, source_path: str, text: str,
             version: str) -> dict:
    text = clean(text)
    return {"name": name, "kind": kind, "split": split,
            "source": f"CPython {version}, Lib/{source_path}", "source_path": source_path,
            "license": LICENSE, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "chars": len(text), "text": text}


def build(root: Path, version: str) -> dict:
    """The asset as a dict (see module docstring)."""
    docs = []
    for split, files in CODE.items():
        for rel in files:
            docs.append(document(f"code/{rel}", "code", split, rel,
                                 (root / rel).read_text(encoding="utf-8"), version))
    topics = reference_topics(root)
    for split, names in split_topics(topics).items():
        for name in names:
            docs.append(document(f"prose/reference/{name}", "prose", split, TOPICS,
                                 topics[name], version))
        for rel in PROSE_FILES[split]:
            docs.append(document(f"prose/{rel}", "prose", split, rel,
                                 (root / rel).read_text(encoding="utf-8"), version))
    seen: dict[str, str] = {}
    for d in docs:
        if seen.setdefault(d["sha256"], d["name"]) != d["name"]:
            raise ValueError(f"{d['name']} has the same text as {seen[d['sha256']]}")
    license_path = root / "LICENSE.txt"
    if not license_path.exists():
        raise FileNotFoundError(f"{license_path}: the PSF license text must ship with the asset")
    return {"format": 1, "builder": "scripts/tools/build_eval_haystacks.py",
            "python": version, "license": LICENSE,
            "license_text": license_path.read_text(encoding="utf-8"), "documents": docs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=None,
                   help="CPython Lib/ directory (default: this interpreter's stdlib)")
    p.add_argument("--version", default=platform.python_version(),
                   help="CPython version of --root, recorded in each document's source")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    root = Path(args.root or sysconfig.get_paths()["stdlib"])
    asset = build(root, args.version)
    data = json.dumps(asset, ensure_ascii=False, sort_keys=True).encode("utf-8")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "wb") as raw:  # mtime 0: the same input gives the same bytes
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f:
            f.write(data)
    for split in ("dev", "test"):
        for kind in ("code", "prose"):
            sel = [d for d in asset["documents"] if d["split"] == split and d["kind"] == kind]
            print(f"{split:>4s} {kind:>5s}: {len(sel):3d} documents, "
                  f"{sum(d['chars'] for d in sel) / 1e3:7.1f}K characters")
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
