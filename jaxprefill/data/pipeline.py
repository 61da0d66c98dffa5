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
  * document: one document per row, long ones split over several rows: a document of n >=
    seq_len tokens gives floor(n / seq_len) rows of consecutive pieces, plus, when the rest is
    at least half a row, one row of its last seq_len tokens (overlapping the piece before); a
    shorter rest is dropped. So no row of a long document is padded, and at most
    seq_len / 2 - 1 tokens of a document are lost. A shorter document is one padded row.
    Positions restart at 0 in each row.
  With none and document a row holds one document followed by padding, so the model needs no
  segment mask (plain causal attention; the trainer passes no segment ids to the model).
Segment ids start at 1 within each row; 0 marks padding. Positions restart at 0 per document.

Loss weights (`span_weight`, packings none and document): documents come as (text, spans) and
rows get "loss_weights" float32 [seq_len]: `span_weight` for the tokens of the spans, 1 for
the others (0 on padding). The text is tokenized piece by piece, cut at the span ends, so a
span should start and end where the tokenizer splits words anyway (before a space, at a line
break) to get the tokens the whole text would give.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from jaxprefill.data.tokenize import TextTokenizer

PACKINGS = ("concat_then_split", "first_fit", "none", "document")


def encode_spans(tokenizer: TextTokenizer, text: str, spans, weight: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [n] of `text` and their loss weights float32 [n]: `weight` inside the character
    `spans` (sorted, disjoint), 1 elsewhere; the pieces between span ends are encoded apart."""
    ids, weights, at = [], [], 0
    for a, b in list(spans) + [(len(text), len(text))]:
        for piece, w in ((text[at:a], 1.0), (text[a:b], weight)):
            if piece:
                t = np.asarray(tokenizer.encode(piece), np.int32)
                ids.append(t)
                weights.append(np.full((len(t),), w, np.float32))
        at = b
    if not ids:
        return np.zeros((0,), np.int32), np.zeros((0,), np.float32)
    return np.concatenate(ids), np.concatenate(weights)


def tokenize_fn(tokenizer: TextTokenizer, *, add_bos: bool, add_eos: bool, max_len: int | None,
                span_weight: float | None = None):
    """doc -> {"tokens": int32 [n]} (or None for an empty document, which grain drops). With
    `span_weight` a doc is (text, spans) and the output also has "loss_weights" float32 [n]."""
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if add_eos and tokenizer.eos_id is not None else []

    def fn(doc):
        if span_weight is None:
            ids, weights = tokenizer.encode(doc), None
        else:
            text, spans = doc if isinstance(doc, tuple) else (doc, [])
            ids, weights = encode_spans(tokenizer, text, spans, span_weight)
        if len(ids) == 0:
            return None
        ids = np.concatenate([np.asarray(bos, np.int32), ids, np.asarray(eos, np.int32)])
        out = {"tokens": ids[:max_len].astype(np.int32)}
        if weights is not None:  # BOS and EOS weigh 1
            out["loss_weights"] = np.concatenate([np.ones(len(bos), np.float32), weights,
                                                  np.ones(len(eos), np.float32)])[:max_len]
        return out

    return fn


def pad_row(seq_len: int):
    """{"tokens": [n]} -> one padded row (packing "none"); "loss_weights" (if any) follow."""
    def fn(x):
        ids = x["tokens"][:seq_len]
        n = len(ids)
        out = {k: np.zeros((seq_len,), np.int32) for k in ("tokens", "positions", "segment_ids")}
        out["tokens"][:n] = ids
        out["positions"][:n] = np.arange(n)
        out["segment_ids"][:n] = 1
        if "loss_weights" in x:
            out["loss_weights"] = np.zeros((seq_len,), np.float32)
            out["loss_weights"][:n] = x["loss_weights"][:seq_len]
        return out
    return fn


class DocumentRows:
    """grain flat-map transform of packing "document": {"tokens": [n]} -> rows (module docstring)."""

    max_fan_out = 1 << 20  # rows per document; grain's iterator flat-map does not enforce it

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.pad = pad_row(seq_len)

    def flat_map(self, x: dict) -> list[dict]:
        ids, s = x["tokens"], self.seq_len
        full, rest = divmod(len(ids), s)
        if full == 0:
            return [self.pad(x)]
        starts = [i * s for i in range(full)]
        if 2 * rest >= s:  # half a row or more of new tokens: one more row, ending at the end
            starts.append(len(ids) - s)
        ones, pos = np.ones((s,), np.int32), np.arange(s, dtype=np.int32)
        rows = [{"tokens": ids[i:i + s].astype(np.int32), "positions": pos, "segment_ids": ones}
                for i in starts]
        if "loss_weights" in x:
            for row, i in zip(rows, starts):
                row["loss_weights"] = x["loss_weights"][i:i + s]
        return rows


def rename(x: dict) -> dict:
    return {"tokens": x["tokens"].astype(np.int32),
            "positions": x["tokens_positions"].astype(np.int32),
            "segment_ids": x["tokens_segment_ids"].astype(np.int32)}


def make_dataset(source, tokenizer: TextTokenizer, *, seq_len: int, batch_size: int,
                 packing: str = "concat_then_split", seed: int = 0, shuffle: bool = True,
                 repeat: bool = True, shard_index: int = 0, shard_count: int = 1,
                 add_bos: bool = False, add_eos: bool = True, workers: int = 0,
                 span_weight: float | None = None):
    """A grain IterDataset of batches {"tokens", "positions", "segment_ids"} int32 [batch, seq_len]
    (+ "loss_weights" float32 with `span_weight`: module docstring).

    `source` is any random-access sequence of strings (`jaxprefill.data.sources`), or of (text,
    spans) with `span_weight`. `batch_size` is this host's share of the global batch.
    """
    import grain

    if packing not in PACKINGS:
        raise ValueError(f"data.packing: {packing!r} is not one of {PACKINGS}")
    if span_weight is not None and packing not in ("none", "document"):
        raise ValueError(f"loss weights need data.packing none or document, got {packing!r}")
    ds = grain.MapDataset.source(source)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"no documents for shard {shard_index} of {shard_count}")
    if shuffle:
        ds = ds.shuffle(seed=seed)  # before repeat: every epoch gets its own permutation
    if repeat:
        ds = ds.repeat(None)
    max_len = None if packing in ("concat_then_split", "document") else seq_len
    ds = ds.map(tokenize_fn(tokenizer, add_bos=add_bos, add_eos=add_eos, max_len=max_len,
                            span_weight=span_weight))
    # One reader thread keeps this cheap and the order trivially deterministic; tokenization is
    # fast next to a training step, and `workers` moves the pipeline to other processes.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=16))
    if packing == "concat_then_split":
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len}).map(rename)
    elif packing == "first_fit":
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct={"tokens": seq_len}, num_packing_bins=max(batch_size, 2)).map(rename)
    elif packing == "document":
        it = grain.experimental.FlatMapIterDataset(it, DocumentRows(seq_len))
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
