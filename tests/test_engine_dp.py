"""Data-parallel engine (EngineConfig.data_parallel) on 2 fake CPU devices, in a subprocess:
outputs equal the one-device engine's, every replica works on its own device, and requests
that fail validation are reported once."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    import jaxprefill as jp
    from jaxprefill.infer import DataParallelEngine, Engine, EngineConfig, Request, make_engine
    assert len(jax.devices()) == 2
    cfg = jp.ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         max_position_embeddings=512, eos_token_ids=(0,))
    model = jp.Llama(cfg, rngs=nnx.Rngs(0))
    for _, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if p[...].ndim >= 2:
            p[...] = p[...] * 6.0
    rng = np.random.default_rng(2)
    lengths = [5, 70, 33, 64, 100, 17, 9, 130, 40]
    reqs = [Request(id=f"r{i}", prompt=rng.integers(1, 97, n).tolist(), seed=i,
                    temperature=0.8 if i == 3 else None) for i, n in enumerate(lengths)]
    reqs.append(Request(id="bad", prompt=[]))  # rejected by validation
    kw = dict(max_batch=2, prefill_tokens=64, prefill_rows=2, page_size=16, num_pages=48,
              max_new_tokens=6, bucket=64, chat=False)
    errors = []
    one = {}
    Engine(model, None, EngineConfig(**kw)).run(reqs, lambda r: one.__setitem__(r.id, r.tokens),
                                                on_error=lambda q, e: errors.append(q.id))
    dp = make_engine(model, None, EngineConfig(**kw, data_parallel=2))
    assert isinstance(dp, DataParallelEngine)
    two = {}
    dp.run(reqs, lambda r: two.__setitem__(r.id, r.tokens), on_error=lambda q, e: errors.append(q.id))
    assert errors == ["bad", "bad"], errors
    assert two == one and len(one) == len(lengths), (one, two)
    devs = [{d for a in jax.tree.leaves(e.cache) for d in a.devices()} for e in dp.replicas]
    assert devs == [{jax.devices()[0]}, {jax.devices()[1]}], devs
    assert all(e.stats["decode_calls"] > 0 for e in dp.replicas)
    print("OK")
""")


def test_data_parallel_engine_on_2_fake_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]
