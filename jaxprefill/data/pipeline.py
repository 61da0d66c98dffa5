"""The grain pipeline: documents -> token ids -> packed rows -> batches, with checkpointable state.

    loader = make_loader(source, tokenizer, seq_len=256, batch_size=8, seed=0)
    batch = next(loader)        # {"tokens", "positions", "segment_ids"}: int32 [8, 256]
    state = loader.get_state()  # JSON-able; `loader.set_state(state)` resumes exactly there

Order of operations (each host runs this over its own slice of the documents):
  source[host::hosts] -> shuffle(seed) (a fresh permutation every epoch) -> repeat -> tokenize
  (+ BOS/EOS) -> pack -> batch.

Packing modes:
  * concat_then_split (grain `ConcatThenSplitIterDataset`): documents are concatenated and cut
    into rows of exactly `seq_len` tokens; no padding. A document cut at a row end continues in
    the next row with positions restarting at 0 (as in T5/MaxText).
  * first_fit (grain `FirstFitPackIterDataset`): documents truncated to `seq_len`, placed whole
    into the first row with room; the rest of a row is padding (segment id 0).
  * none: one document per row, truncated or padded.
Segment ids start at 1 within each row; 0 marks padding. Positions restart at 0 per document.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from jaxprefill.data.tokenize import TextTokenizer

PACKINGS = ("concat_then_split", "first_fit", "none")


def tokenize_fn(tokenizer: TextTokenizer, *, add_bos: bool, add_eos: bool, max_len: int | None):
    """doc str -> {"tokens": int32 [n]} (or None for an empty document, which grain drops)."""
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if add_eos and tokenizer.eos_id is not None else []

    def fn(text: str):
        ids = tokenizer.encode(text)
        if len(ids) == 0:
            return None
        ids = np.concatenate([np.asarray(bos, np.int32), ids, np.asarray(eos, np.int32)])
        if max_len is not None:
            ids = ids[:max_len]
        return {"tokens": ids.astype(np.int32)}

    return fn


def pad_row(seq_len: int):
    """{"tokens": [n]} -> one padded row (packing "none")."""
    def fn(x):
        ids = x["tokens"][:seq_len]
        n = len(ids)
        out = {k: np.zeros((seq_len,), np.int32) for k in ("tokens", "positions", "segment_ids")}
        out["tokens"][:n] = ids
        out["positions"][:n] = np.arange(n)
        out["segment_ids"][:n] = 1
        return out
    return fn


def rename(x: dict) -> dict:
    return {"tokens": x["tokens"].astype(np.int32),
            "positions": x["tokens_positions"].astype(np.int32),
            "segment_ids": x["tokens_segment_ids"].astype(np.int32)}


def make_dataset(source, tokenizer: TextTokenizer, *, seq_len: int, batch_size: int,
                 packing: str = "concat_then_split", seed: int = 0, shuffle: bool = True,
                 repeat: bool = True, shard_index: int = 0, shard_count: int = 1,
                 add_bos: bool = False, add_eos: bool = True, workers: int = 0):
    """A grain IterDataset of batches {"tokens", "positions", "segment_ids"} int32 [batch, seq_len].

    `source` is any random-access sequence of strings (`jaxprefill.data.sources`). `batch_size`
    is this host's share of the global batch.
    """
    import grain

    if packing not in PACKINGS:
        raise ValueError(f"data.packing: {packing!r} is not one of {PACKINGS}")
    ds = grain.MapDataset.source(source)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"no documents for shard {shard_index} of {shard_count}")
    if shuffle:
        ds = ds.shuffle(seed=seed)  # before repeat: every epoch gets its own permutation
    if repeat:
        ds = ds.repeat(None)
    max_len = None if packing == "concat_then_split" else seq_len
    ds = ds.map(tokenize_fn(tokenizer, add_bos=add_bos, add_eos=add_eos, max_len=max_len))
    # One reader thread keeps this cheap and the order trivially deterministic; tokenization is
    # fast next to a training step, and `workers` moves the pipeline to other processes.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=16))
    if packing == "concat_then_split":
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len}).map(rename)
    elif packing == "first_fit":
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct={"tokens": seq_len}, num_packing_bins=max(batch_size, 2)).map(rename)
    else:
        it = it.map(pad_row(seq_len))
    it = it.batch(batch_size, drop_remainder=True)
    if workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it


class Loader:
    """An endless (or, for validation, finite) iterator of numpy batches with get/set_state."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self._it = iter(dataset)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return _jsonable(self._it.get_state())

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(state)


def make_loader(source, tokenizer: TextTokenizer, **kwargs) -> Loader:
    return Loader(make_dataset(source, tokenizer, **kwargs))


def _jsonable(x: Any) -> Any:
    """grain states hold tuples and numpy scalars; JSON (orbax JsonSave) wants lists and ints."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, bytes):
        return x.decode("latin-1")
    return x
