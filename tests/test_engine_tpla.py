"""Engine TPLA decode (EngineConfig.tpla) on 4 fake CPU devices, in a subprocess:

  * g = 1 is MLA: the TPLA engine's greedy tokens equal the MLA engine's (packed rows, chunked
    prompts, page boundaries, continuous refill), with the Hadamard rotation folded in;
  * g = 2: each device holds 1/2 of every token's latent, and a prompt's greedy tokens equal
    `tpla_prefill` + `tpla_decode_step` driven by hand (the engine adds paging and batching only).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxprefill.config import ConfigError
from jaxprefill.infer import Engine, EngineConfig

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from tests.test_engine_mla import LENGTHS, tiny_deepseek_v3
    from jaxprefill.infer import Engine, EngineConfig
    from jaxprefill.sharding import make_mesh
    from jaxprefill.mla.tpla import TPLAConfig, reparameterize
    from jaxprefill.mla.tpla_model import TPLACache, tpla_decode_step, tpla_prefill
    assert len(jax.devices()) == 4
    model = tiny_deepseek_v3()
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, 97, n).tolist() for n in LENGTHS]
    kw = dict(max_batch=3, prefill_tokens=64, prefill_rows=2, page_size=16, num_pages=40,
              max_new_tokens=7, bucket=64, chat=False)
    mla = [r.tokens for r in Engine(model, None, EngineConfig(**kw)).generate(prompts)]
    # hadamard: the rotation and the kv norm weight folded into the weights (exact for MLA)
    eng = Engine(model, None, EngineConfig(**kw, tpla={"tensor": 1, "transform": "hadamard"}))
    got = [r.tokens for r in eng.generate(prompts)]
    assert got == mla, (got, mla)
    # g = 2: sharded pool, and the engine equals TPLA driven by hand for one short prompt
    eng = Engine(model, None, EngineConfig(**kw, tpla={"tensor": 2, "transform": "hadamard"}))
    pages = eng.cache.pages[0]
    shard_widths = {s.data.shape[-1] for s in pages.addressable_shards}
    assert shard_widths == {(32 + 8 * 2) // 2} and pages.shape[-1] == 2 * 24, shard_widths
    p = prompts[2]
    got = eng.generate([p])[0].tokens
    mesh, tcfg = make_mesh(tensor=2, devices=jax.devices()[:2]), TPLAConfig(transform="hadamard")
    folded = reparameterize(model, "hadamard")
    cache = TPLACache.zeros(folded.config, 1, 64, mesh=mesh, tcfg=tcfg, page_size=16)
    logits, cache = jax.jit(lambda t, c: tpla_prefill(folded, t, c, mesh=mesh, tcfg=tcfg))(
        jnp.asarray([p], jnp.int32), cache)
    step = jax.jit(lambda t, c, i: tpla_decode_step(folded, t, c, i, mesh=mesh, tcfg=tcfg))
    want = [int(jnp.argmax(logits[0]))]
    for i in range(6):
        if want[-1] == 0:
            break
        logits, cache = step(jnp.asarray([[want[-1]]], jnp.int32), cache,
                             jnp.asarray([len(p) + i], jnp.int32))
        want.append(int(jnp.argmax(logits[0])))
    want = [t for t in want if t != 0][:7] if 0 not in want else want[:want.index(0)]
    assert got == want, (got, want)
    print("OK")
""")


def test_engine_tpla_on_4_fake_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]


def test_engine_config_tpla_errors():
    with pytest.raises(ConfigError, match="tpla"):
        EngineConfig(tpla={"tensor": 0})
    with pytest.raises(ConfigError, match="tpla"):
        EngineConfig(tpla={"shards": 2})
    with pytest.raises(ConfigError, match="data_parallel"):
        EngineConfig(tpla={"tensor": 2}, data_parallel=2)
    with pytest.raises(ConfigError, match="index_keys must be 'replicated' or 'sharded'"):
        EngineConfig(tpla={"tensor": 1, "index_keys": "split"})


def test_index_keys_on_a_model_without_an_indexer_is_refused_in_one_line():
    from tests.test_engine_mla import tiny_deepseek_v3

    with pytest.raises(ValueError, match="DeepSeek-V3.2") as err:
        Engine(tiny_deepseek_v3(), None, EngineConfig(tpla={"tensor": 1,
                                                            "index_keys": "sharded"}))
    assert "\n" not in str(err.value)
