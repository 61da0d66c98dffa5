"""jaxprefill.graph: the engine passes its model to jitted steps as a once-hashed graph and
a list of arrays; the model rebuilt from them equals the model, and a step compiles once."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprefill.graph import FlatModel, StaticGraph, merge
from jaxprefill.infer import Engine, EngineConfig, Request
from test_engine_sparse import peaked_tiny_llama


def test_merge_rebuilds_the_model_from_either_form():
    model = peaked_tiny_llama()
    graphdef, state = nnx.split(model)
    graph, leaves = FlatModel().args(graphdef, state)
    assert isinstance(graph, StaticGraph) and isinstance(leaves, list)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 97, (1, 12)), jnp.int32)
    want = model(tokens)
    for g, s in ((graph, leaves), (graphdef, state)):
        np.testing.assert_array_equal(np.asarray(merge(g, s)(tokens)), np.asarray(want))


def test_flat_model_keeps_one_graph_per_graphdef():
    model = peaked_tiny_llama()
    graphdef, state = nnx.split(model)
    flat = FlatModel()
    g1, l1 = flat.args(graphdef, state)
    g2, l2 = flat.args(graphdef, state)
    assert g1 is g2 and l1 is l2  # the same static argument: jit finds its compiled program
    moved = jax.device_put(state, jax.devices()[0])  # a new state object, same structure
    g3, l3 = flat.args(graphdef, moved)
    assert g3 is g1 and l3 is not l1
    other = nnx.graphdef(peaked_tiny_llama())
    assert flat.args(other, moved)[0] is not g1
    # another StaticGraph of an equal graph is an equal static argument (shared compiles)
    twin = StaticGraph(nnx.graphdef(model), g1.treedef)
    assert twin is not g1 and twin == g1 and hash(twin) == hash(g1)


def test_engine_steps_compile_once_across_calls():
    calls = []

    @functools.partial(jax.jit, static_argnums=0)
    def probe(graph, state, x):
        calls.append(1)  # runs only while tracing
        leaves = jax.tree_util.tree_leaves(nnx.state(merge(graph, state)))
        return leaves[0].reshape(-1)[0] + x

    model = peaked_tiny_llama()
    engine = Engine(model, None, EngineConfig(max_batch=2, prefill_tokens=32, page_size=16,
                                              num_pages=12, max_new_tokens=3, chat=False))
    for _ in range(3):
        probe(*engine._model(engine.graphdef), jnp.float32(1.0))
    assert len(calls) == 1
    before = engine.steps.decode._cache_size()
    prompts = [Request(id=str(i), prompt=list(range(1, 9 + i))) for i in range(2)]
    engine.generate(prompts)
    engine.generate(prompts)
    # a second engine over the same model reuses the first one's programs
    again = Engine(model, None, engine.config)
    assert again.generate(prompts)[0].tokens == engine.generate(prompts)[0].tokens
    assert engine.steps.decode._cache_size() - before <= 1  # one decode program, reused
