"""A real-text corpus every machine has: the Python standard library's own sources.

`build_corpus` writes `train.jsonl` and `validation.jsonl` (one {"text", "path"} object per
source file) and optionally the same documents as `.array_record` shards. The split is a pure
function of each file's relative path (crc32), so every machine with the same Python version
builds the same corpus.
"""

from __future__ import annotations

import json
import os
import sysconfig
import zlib
from pathlib import Path


def stdlib_files(root: str | None = None, suffixes: tuple[str, ...] = (".py",)) -> list[Path]:
    """Sorted source files under `root` (default: this interpreter's stdlib), site-packages and
    caches excluded."""
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root_path.rglob("*")):
        rel = path.relative_to(root_path).parts
        if any(p in ("site-packages", "dist-packages", "__pycache__") for p in rel):
            continue
        if path.suffix in suffixes and path.is_file():
            files.append(path)
    return files


def build_corpus(out_dir: str | os.PathLike, *, root: str | None = None,
                 val_fraction: float = 0.02, max_files: int | None = None,
                 max_chars: int = 200_000, array_record: bool = False,
                 by_package: bool = False) -> dict[str, int]:
    """Write the corpus; returns {"train": n_docs, "validation": n_docs, "chars": n}.

    `by_package`: one document per top-level package or module (its files concatenated, each
    after a `# file: <path>` line) instead of one per file: long documents for long-context
    training (asyncio, email, ... run to 100K+ tokens).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(str(root_path))
    if max_files is not None:
        files = files[:max_files]
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    chars = 0
    bucket = int(val_fraction * 10_000)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        text = text[:max_chars]  # a few generated files are huge and would dominate
        rel = path.relative_to(root_path).as_posix()
        key = rel.split("/")[0] if by_package else rel
        split = "validation" if zlib.crc32(key.encode()) % 10_000 < bucket else "train"
        if by_package and splits[split] and splits[split][-1]["path"] == key:
            splits[split][-1]["text"] += f"\n# file: {rel}\n" + text
        else:
            splits[split].append({"text": f"# file: {rel}\n" + text if by_package else text, "path": key})
        chars += len(text)
    for split, docs in splits.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc) + "\n")
        if array_record:
            from array_record.python.array_record_module import ArrayRecordWriter

            writer = ArrayRecordWriter(str(out / f"{split}.array_record"), "group_size:1")
            for doc in docs:
                writer.write(doc["text"].encode("utf-8"))
            writer.close()
    return {"train": len(splits["train"]), "validation": len(splits["validation"]), "chars": chars}
