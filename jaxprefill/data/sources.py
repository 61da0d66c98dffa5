"""Random-access document sources over local files (grain `RandomAccessDataSource` protocol:
`len(src)` and `src[i] -> str`).

Formats:
  * text: every file is one document.
  * jsonl: every line is a JSON object; the document is its `text_key` field. Lines are indexed
    once (byte offsets), then read lazily, so a large corpus costs 8 bytes a line in memory.
    With `spans_key`, `src[i]` is `(text, spans)`: the record's `[[start, end], ...]` character
    ranges of the text (sorted, disjoint; none when the field is absent), for weighted losses.
  * array_record: every record is one UTF-8 document (what `scripts/tools/build_corpus.py` writes).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

import numpy as np


class DataError(ValueError):
    """A document that cannot be used (a JSONL line without its text field, bad loss spans):
    the message names the file, the line's byte offset and the field."""


def expand(patterns: Sequence[str], key: str) -> list[str]:
    """Sorted files matching the glob `patterns`; an error naming `key` if one matches nothing."""
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matched = [m for m in matched if os.path.isfile(m)]
        if not matched:
            raise FileNotFoundError(f"{key}: no file matches {pattern!r} (build a corpus with "
                                    f"`python -m scripts.tools.build_corpus`)")
        files.extend(matched)
    return files


class TextFiles:
    def __init__(self, files: Sequence[str]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> str:
        with open(self.files[i], encoding="utf-8", errors="replace") as f:
            return f.read()


class JsonlFiles:
    def __init__(self, files: Sequence[str], text_key: str = "text", spans_key: str | None = None):
        self.files = list(files)
        self.text_key = text_key
        self.spans_key = spans_key
        file_ids, offsets = [], []
        for fid, path in enumerate(self.files):
            pos = 0
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        file_ids.append(fid)
                        offsets.append(pos)
                    pos += len(line)
        self._file = np.asarray(file_ids, np.int32)
        self._offset = np.asarray(offsets, np.int64)

    def __len__(self) -> int:
        return len(self._offset)

    def __getitem__(self, i: int) -> str | tuple[str, list[tuple[int, int]]]:
        path = self.files[int(self._file[i])]
        with open(path, "rb") as f:
            f.seek(int(self._offset[i]))
            line = f.readline()
        where = f"{path}: line at byte {int(self._offset[i])}"
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise DataError(f"{where} is not a JSON object ({e})") from None
        if not isinstance(record, dict) or self.text_key not in record:
            raise DataError(f"{where} has no {self.text_key!r} field (set data.text_key)")
        text = str(record[self.text_key])
        if self.spans_key is None:
            return text
        return text, _spans(record.get(self.spans_key, []), len(text), f"{where}: {self.spans_key}")


def _spans(raw, n: int, where: str) -> list[tuple[int, int]]:
    """[[start, end], ...] -> sorted disjoint (start, end) character ranges within [0, n]."""
    try:
        spans = [(int(a), int(b)) for a, b in raw]
    except (TypeError, ValueError):
        raise DataError(f"{where} must be a list of [start, end] pairs of integers") from None
    last = 0
    for a, b in spans:
        if not last <= a < b <= n:
            raise DataError(f"{where}: span [{a}, {b}] is not sorted, disjoint and inside the "
                             f"text's {n} characters")
        last = b
    return spans


class ArrayRecordFiles:
    def __init__(self, files: Sequence[str]):
        import grain

        self.source = grain.sources.ArrayRecordDataSource(list(files))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> str:
        record = self.source[i]
        return record.decode("utf-8", errors="replace") if isinstance(record, bytes) else str(record)


def open_source(fmt: str, patterns: Sequence[str], text_key: str = "text", key: str = "data.train",
                spans_key: str | None = None):
    """A document source of `fmt` ("text", "jsonl", "array_record") over the files of `patterns`;
    `spans_key` (jsonl only): documents come as (text, spans) (see JsonlFiles)."""
    files = expand(patterns, key)
    if spans_key is not None and fmt != "jsonl":
        raise ValueError(f"{key}: loss spans need data.format=jsonl, got {fmt!r}")
    if fmt == "text":
        return TextFiles(files)
    if fmt == "jsonl":
        return JsonlFiles(files, text_key, spans_key)
    if fmt == "array_record":
        return ArrayRecordFiles(files)
    raise ValueError(f"data.format: unknown format {fmt!r}")
