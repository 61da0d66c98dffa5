"""Kernel backend names on the scripts' command lines, and in the library that is imported.

The library names its kernel backends ``reference``, ``xla``, ``triton`` (Pallas, Triton
lowering), ``mosaic_gpu`` (Pallas Mosaic GPU, Hopper) and ``mosaic_tpu``; its previous API
called three of them ``pallas_gpu``, ``pallas_mosaic`` and ``pallas_tpu``. The scripts also
keep their short flag ``mosaic`` for ``mosaic_gpu``.

    canonical("pallas_mosaic")                          # -> "mosaic_gpu"
    library_name("mosaic", pallas_kernels.IMPLS)        # -> "mosaic_gpu", or "pallas_mosaic"
                                                        #    when the previous library is imported

``library_name`` lets a benchmark pass the name the imported library knows, so one command times
the current library and a checkout of the previous one alike (see the benchmarks' docstrings).
"""

from __future__ import annotations

from typing import Sequence

# current name -> the previous API's name
PREVIOUS = {"triton": "pallas_gpu", "mosaic_gpu": "pallas_mosaic", "mosaic_tpu": "pallas_tpu"}
_CURRENT = {**{old: new for new, old in PREVIOUS.items()}, "mosaic": "mosaic_gpu"}


def canonical(name: str) -> str:
    """The current backend name of ``name`` (a current name, a previous one, or ``mosaic``)."""
    return _CURRENT.get(name, name)


def library_name(name: str, impls: Sequence[str]) -> str:
    """The name under which ``impls`` (the ``IMPLS`` tuple of the imported library) lists
    backend ``name`` (any spelling :func:`canonical` takes). Raises ValueError if it has none."""
    current = canonical(name)
    for candidate in (current, PREVIOUS.get(current)):
        if candidate in impls:
            return candidate
    raise ValueError(f"backend {name!r} is not one of this library's {tuple(impls)}")


def uses_current_names(impls: Sequence[str]) -> bool:
    """True when ``impls`` spells the backends the current way (``mosaic_gpu``, ``triton``)."""
    return "mosaic_gpu" in impls


__all__ = ["PREVIOUS", "canonical", "library_name", "uses_current_names"]
