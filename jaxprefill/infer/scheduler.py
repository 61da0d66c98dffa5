"""Host-side prefill scheduling: bin-packing whole prompts into fixed-width rows (Prepacking)."""

from __future__ import annotations

from typing import Sequence


def pack_rows(lengths: Sequence[int], width: int, max_rows: int, pack: bool = True,
              alone_from: int | None = None) -> list[list[int]]:
    """Assign prompts (by index) to at most `max_rows` rows of `width` tokens.

    First-fit decreasing: longest first, each into the first row with room. Prompts that do not
    fit this time are left out (they go in a later step). With pack=False each row holds one
    prompt (padded batching, for comparison). Prompts of `alone_from` tokens or more get a row
    of their own (sparse prefill: a row's policy layout covers one document). Every length must
    be <= width.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > width:
            raise ValueError(f"prompt of {n} tokens does not fit a row of {width}")
        alone = alone_from is not None and n >= alone_from
        target = None
        if pack and not alone:
            target = next((r for r in range(len(rows)) if room[r] >= n), None)
        if target is None:
            if len(rows) == max_rows:
                continue
            rows.append([])
            room.append(width)
            target = len(rows) - 1
        rows[target].append(i)
        room[target] = 0 if alone else room[target] - n
    return rows
