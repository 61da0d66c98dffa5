"""Engine prefill through the context-parallel ring (`Engine(..., mesh=)`) on 4 fake CPU devices,
in a subprocess (the device count is fixed when JAX starts):

  * dense and streaming (16-token blocks): the ring engine's greedy tokens equal the one-device
    engine's for ragged prompts (none a multiple of 2n x block = 128), with steps of single-prompt
    rows on the ring and packed steps and decodes beside them; the paged cache stays replicated;
  * a prompt longer than prefill_tokens (it would be chunked) is refused in one line, and so are
    a mesh with one device on its sequence axis, a policy block that does not divide the ring's
    block and data_parallel replicas.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import jaxprefill as jp
    from jaxprefill.infer import Engine, EngineConfig, Request, steps
    from jaxprefill.parallel import ContextParallel
    from test_engine_sparse import peaked_tiny_llama
    assert len(jax.devices()) == 4
    model = peaked_tiny_llama()
    rng = np.random.default_rng(5)
    # 61, 50, 40, 45, 37: rows of their own (on the ring); 20 and 9 share a row (no ring)
    lengths = [61, 50, 40, 20, 9, 45, 37]
    prompts = [rng.integers(1, 97, n).tolist() for n in lengths]
    ring = ContextParallel(jp.make_mesh(sequence=4), block=16)
    streaming = {"min_length": 32, "policy": "streaming",
                 "params": {"block_size": 16, "sink": 16, "local": 16}}
    kw = dict(max_batch=3, prefill_tokens=64, prefill_rows=2, page_size=16, num_pages=40,
              max_new_tokens=6, bucket=64, chat=False)
    tokens, seen = {}, []
    single = steps.prefill_single  # records the graphdef of each single-prompt step
    steps.prefill_single = lambda graph, *a: (seen.append(graph.graphdef), single(graph, *a))[1]
    for name, sparse in (("dense", None), ("streaming", streaming)):
        config = EngineConfig(**kw, sparse=sparse)
        one = Engine(model, None, config)
        want = [r.tokens for r in one.generate(prompts)]
        eng = Engine(model, None, config, mesh=ring)
        seen.clear()
        got = [r.tokens for r in eng.generate(prompts)]
        assert seen and all(g is eng.ring_graphdef for g in seen), len(seen)
        assert got == want, (name, got, want)
        assert all(len(t) > 0 for t in got), got
        st, ref = eng.stats, one.stats
        assert st["ring_rows"] == st["single_rows"] > 0, st
        assert st["packed_rows"] > st["single_rows"] and st["decode_calls"] > 0, st
        assert ref["ring_rows"] == 0 and {**st, "ring_rows": 0} == ref, (st, ref)
        assert eng.ring.n == 4 and eng.ring_graphdef is not eng.graphdef
        for leaf in jax.tree.leaves(eng.cache):
            assert len(leaf.devices()) == 4 and leaf.sharding.is_fully_replicated, leaf.sharding
        tokens[name] = got
    # the compiled single-prompt step passes K/V shards around the ring; packed rows do not
    r, c = kw["prefill_rows"], kw["prefill_tokens"]
    zeros = jnp.zeros((r, c), jnp.int32)
    sampling, step = eng._sampling([], r)
    args = (eng.state, eng.cache, zeros, jnp.ones(r, jnp.int32), zeros, jnp.zeros(r, jnp.int32),
            sampling, step)
    ring_text = single.lower(eng.ring_graphdef, *args).compile().as_text()
    assert "collective-permute" in ring_text
    packed = steps.prefill_packed.lower(eng.graphdef, eng.state, eng.cache, zeros, zeros, zeros,
                                        zeros, jnp.zeros(r, jnp.int32), sampling, step)
    assert "collective-permute" not in packed.compile().as_text()
    assert tokens["streaming"] != tokens["dense"], tokens  # the policy changes the output

    # refusals, one line each
    errors = []
    eng = Engine(model, None, EngineConfig(**kw), mesh=jp.make_mesh(sequence=4))
    assert eng.ring.block == 128  # a mesh gets the default ContextParallel
    eng.run([Request(id="long", prompt=rng.integers(1, 97, 65).tolist())], lambda r: None,
            on_error=lambda q, e: errors.append(str(e)))
    assert len(errors) == 1 and "prefill_tokens=64" in errors[0], errors
    for mesh, config, match in (
            (jp.make_mesh(data=4), EngineConfig(**kw), "1 device on its sequence axis"),
            (ContextParallel(jp.make_mesh(sequence=4), block=8),
             EngineConfig(**kw, sparse=streaming), "must divide ContextParallel.block"),
            (ring, EngineConfig(**kw, data_parallel=2), "data_parallel > 1")):
        try:
            Engine(model, None, config, mesh=mesh)
        except ValueError as e:
            assert match in str(e) and "\\n" not in str(e), e
        else:
            raise AssertionError(match)
    print("OK")
""")


def test_engine_ring_prefill_on_4_fake_devices():
    flags = ("--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]
