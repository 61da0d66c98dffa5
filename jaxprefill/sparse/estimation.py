"""How a policy's estimation runs: :class:`Estimation`, a field of every policy (static, so
part of the jit key): which implementation runs the estimation kernels, in interpret mode or
not, whether selections use threshold searches or the sort-based references, and over how many
keys a chunk of a chunked prefill estimates."""

from __future__ import annotations

import dataclasses
from typing import Any

from pallas_kernels import estimation

SELECTIONS = ("threshold", "sort")
EXTENTS = ("full", "bucket")


@dataclasses.dataclass(frozen=True)
class Estimation:
    """How a policy's estimation runs (static).

    impl: the estimation kernels' implementation, "auto" (the Triton kernels on GPUs, XLA
      elsewhere), "xla", "triton", "mosaic_tpu" (opt-in) or "reference"; a named one that cannot
      run an estimation raises (``pallas_kernels.estimation.estimation_backend``).
    interpret: run the Pallas kernels in interpret mode (tests on CPUs).
    selection: "threshold" (bit searches, :mod:`jaxprefill.sparse.select`) or "sort" (the
      sort-based references, same result: A/B measurement).
    extent: the keys a prefill call estimates over. "full" (default): the call's whole key
      axis. "bucket": the first power-of-two extent that holds every valid key of the call (a
      chunk: up to its end; a prompt: the longest row), at most half the call's keys, else all
      of them, picked at run time, so an early chunk of a long cache view or a short prompt in
      a wide row pays for its own length; the same layout, for up to four compiled branches
      (worth it where calls are wider than their content, e.g. an engine bucket of the whole
      max_seq_len: one program for every chunk).
    """

    impl: str = "auto"
    interpret: bool = False
    selection: str = "threshold"
    extent: str = "full"

    def __post_init__(self) -> None:
        if self.impl not in estimation.IMPLS:
            raise ValueError(f"estimation impl must be one of {estimation.IMPLS}, got "
                             f"{self.impl!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"estimation selection must be one of {SELECTIONS}, got "
                             f"{self.selection!r}")
        if self.extent not in EXTENTS:
            raise ValueError(f"estimation extent must be one of {EXTENTS}, got {self.extent!r}")

    @classmethod
    def parse(cls, value: Any) -> "Estimation":
        """Estimation | None | impl name | dict (or frozen pairs) of its fields."""
        if isinstance(value, Estimation):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls(impl=value)
        items = dict(value) if isinstance(value, (dict, tuple, list)) else None
        if items is None:
            raise TypeError(f"estimation must be a name or a mapping, got {type(value).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        bad = sorted(set(items) - set(known))
        if bad:
            raise ValueError(f"unknown estimation key(s) {bad}; known: {', '.join(known)}")
        return cls(**items)

    def backend(self, op: str, **sizes: int | bool) -> str:
        """The implementation of estimation op ``op`` for these sizes ("xla": the caller's
        XLA path); ``sizes``: the keywords of ``estimation_backend`` (rows, cell, columns,
        weighted)."""
        return estimation.estimation_backend(op, impl=self.impl, interpret=self.interpret,
                                             **sizes)

    @property
    def sort(self) -> bool:
        return self.selection == "sort"


__all__ = ["EXTENTS", "Estimation", "SELECTIONS"]
