"""Sharded forward passes on 8 fake CPU devices equal the 1-device logits.

Runs in a subprocess: the device count is fixed when JAX initializes, and the rest of the suite
uses 1 device.
"""

import textwrap

from fake_devices import run_result

SCRIPT = textwrap.dedent(r"""
    import json, sys
    import numpy as np, jax, jax.numpy as jnp
    from flax import nnx
    import jaxprefill as jp
    from jaxprefill.functional import make_forward
    from jaxprefill.sharding import describe_sharding
    from jaxprefill.loading.weights import build_model, to_hf_tensors

    assert jax.device_count() == 8, jax.devices()
    cfg = jp.ModelConfig(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                         max_position_embeddings=128, qkv_bias=True)
    ref_model = jp.Llama(cfg, rngs=nnx.Rngs(0))
    # HF-named host tensors of the reference model, so loading goes through the real path.
    tensors = to_hf_tensors(ref_model)
    tokens = np.random.default_rng(0).integers(0, 256, size=(8, 24)).astype(np.int32)
    ref = np.asarray(ref_model(tokens))
    out = {}
    for mesh_kw in ({"data": 2, "tensor": 4}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = jp.make_mesh(**mesh_kw)
        model = build_model(cfg, tensors, mesh=mesh)
        logits = make_forward(model, mesh)(jnp.asarray(tokens))
        specs = describe_sharding(nnx.state(model))
        out[json.dumps(mesh_kw)] = dict(
            err=float(np.max(np.abs(np.asarray(logits) - ref)) / np.max(np.abs(ref))),
            q=specs["layers/0/attn/q"], down=specs["layers/0/mlp/down"], embed=specs["embed"],
            n_shards=len(model.layers[0].attn.q[...].addressable_shards),
            shard_shape=list(model.layers[0].attn.q[...].addressable_shards[0].data.shape),
            logits_spec=list(logits.sharding.spec))
    print("RESULT" + json.dumps(out))
""")


def test_meshes_match_single_device():
    res = run_result(["-c", SCRIPT], devices=8, fast_compile=False)

    dt = res['{"data": 2, "tensor": 4}']
    assert dt["err"] < 1e-5
    assert dt["q"] == [None, "tensor", None]  # heads over tensor
    assert dt["down"] == ["tensor", None]
    assert dt["shard_shape"] == [64, 2, 8]  # 8 heads / 4
    assert dt["logits_spec"][0] == "data" and dt["logits_spec"][2] == "tensor"

    f = res['{"fsdp": 8}']
    assert f["err"] < 1e-5
    assert f["q"] == ["fsdp", None, None]  # embed over fsdp
    assert f["shard_shape"] == [8, 8, 8]
    assert f["embed"] == [None, "fsdp"]

    mixed = res['{"data": 2, "fsdp": 2, "tensor": 2}']
    assert mixed["err"] < 1e-5
    assert mixed["q"] == ["fsdp", "tensor", None]
