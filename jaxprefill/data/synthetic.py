"""Synthetic batches (no files, no grain): for throughput benchmarks and smoke tests.

Batch `i` is a pure function of (seed, i), so the iterator state is just the next index and
resuming is exact. With `documents=True` rows hold random-length documents (segment ids and
per-document positions), exercising the packed attention path.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class SyntheticLoader:
    def __init__(self, *, vocab_size: int, seq_len: int, batch_size: int, seed: int = 0,
                 documents: bool = False, mean_doc_len: int = 512) -> None:
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.seed, self.documents, self.mean_doc_len = seed, documents, mean_doc_len
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, self.index))
        self.index += 1
        b, s = self.batch_size, self.seq_len
        tokens = rng.integers(0, self.vocab_size, (b, s), dtype=np.int32)
        if not self.documents:
            positions = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()
            return {"tokens": tokens, "positions": positions, "segment_ids": np.ones((b, s), np.int32)}
        segment_ids = np.zeros((b, s), np.int32)
        positions = np.zeros((b, s), np.int32)
        for r in range(b):
            start, seg = 0, 1
            while start < s:
                n = int(min(s - start, max(1, rng.exponential(self.mean_doc_len))))
                segment_ids[r, start:start + n] = seg
                positions[r, start:start + n] = np.arange(n)
                start, seg = start + n, seg + 1
        return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids}

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])
