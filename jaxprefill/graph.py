"""The model as the engine's jitted steps take it: its graph with a hash computed once, its
state as a flat list of arrays.

Why: `jax.jit` hashes its static arguments on every call, and an NNX `GraphDef` hashes by
walking the whole graph (about 2 ms for a 30-layer model on a CPU host), while an NNX `State`
is a pytree that flattens in Python (about 0.5 ms more). A step runs once per prefill call and
once per decode step; at a prompt's first token and between decode steps those milliseconds
are host time the device waits through. The engine's graph never changes between calls: its
hash is computed once, the same object compares equal at once (two engines over equal graphs
still share their compiled steps, by the graphs' own equality), and a list of arrays flattens
in C++.

A step function takes ``(graph, state, ...)`` and rebuilds the model with :func:`merge`, which
also takes a plain ``GraphDef`` and ``State`` (direct calls, tests).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx


@dataclasses.dataclass(frozen=True, eq=False)
class StaticGraph:
    """A jit-static model graph: ``graphdef`` and the treedef of its state's leaves; hashed
    once, equal to itself at once and to another StaticGraph when both parts are equal."""

    graphdef: Any  # nnx.GraphDef
    treedef: Any  # jax PyTreeDef of the state

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.graphdef, self.treedef)))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return (isinstance(other, StaticGraph) and self._hash == other._hash
                and self.graphdef == other.graphdef and self.treedef == other.treedef)


def merge(graph: Any, state: Any) -> nnx.Module:
    """The model of a step's (graph, state): a StaticGraph with its state's leaves, or an NNX
    GraphDef with its State."""
    if isinstance(graph, StaticGraph):
        return nnx.merge(graph.graphdef, jax.tree_util.tree_unflatten(graph.treedef, state))
    return nnx.merge(graph, state)


class FlatModel:
    """An engine's (StaticGraph, leaves) pairs, made once per graphdef and per state.

    The same StaticGraph object comes back for the same graphdef while the state's tree
    structure stays, so the jitted steps keep their compiled programs; a new state object
    (moved to another device, say) is flattened again on its first call.
    """

    def __init__(self) -> None:
        self._state: Any = None
        self._leaves: list = []
        self._treedef: Any = None
        self._graphs: dict[int, tuple[Any, StaticGraph]] = {}

    def args(self, graphdef: Any, state: Any) -> tuple[StaticGraph, list]:
        """(graph, state) to pass to a step for ``graphdef`` and the NNX ``state``."""
        if state is not self._state:
            leaves, treedef = jax.tree_util.tree_flatten(state)
            if self._treedef is None or treedef != self._treedef:
                self._graphs = {}
            self._state, self._leaves, self._treedef = state, leaves, treedef
        entry = self._graphs.get(id(graphdef))
        if entry is None or entry[0] is not graphdef:
            # the graphdef is kept with its StaticGraph, so its id is not reused while cached
            entry = (graphdef, StaticGraph(graphdef, self._treedef))
            self._graphs[id(graphdef)] = entry
        return entry[1], self._leaves
