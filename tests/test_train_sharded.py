"""Sharded training steps (8 fake CPU devices; fsdp and tensor meshes) agree with one device.

Runs in a subprocess: the device count is fixed when JAX initializes, and the rest of the suite
uses 1 device. Each mesh trains the same 2 steps on the same synthetic packed batches from the
same seed; losses and parameters must agree to float32 rounding.
"""

from __future__ import annotations


import numpy as np

from fake_devices import run_result

SHARDED = r"""
import json, sys
import jax, numpy as np
from jaxprefill.train import TrainConfig, Trainer
from jaxprefill.sharding import describe_sharding
assert jax.device_count() == 8
base = {"steps": 2, "batch_size": 8, "model": {"config": "tiny-llama", "dtype": "float32",
        "overrides": {"num_layers": 1},
        "attention": "xla"}, "data": {"format": "synthetic", "seq_len": 32, "synthetic_docs": True},
        # large eps: Adam's update is then smooth in the gradient, so float reordering across
        # meshes stays at rounding level instead of flipping signs of ~0 gradients
        "optim": {"lr": 1e-2, "warmup_steps": 0, "grad_accum": 2, "eps": 1e-3},
        "log": {"progress": False, "every": 1, "tensorboard": False}}
out = {}
for name, mesh in [("single", {"data": 1}), ("fsdp", {"fsdp": 8}),
                   ("tensor", {"data": 2, "tensor": 2, "fsdp": 2})]:
    cfg = TrainConfig.from_dict({**base, "mesh": mesh, "output_dir": sys.argv[1] + "/" + name})
    t = Trainer(cfg, log_fn=lambda m: None)
    r = t.fit()
    q = t.state["params"]["layers"][0]["attn"]["q"]
    emb = t.state["params"]["embed"]
    mu = t.state["opt_state"][1][0].mu["layers"][0]["attn"]["q"]
    out[name] = {"loss": r.last["loss"],
                 "params": [np.asarray(x).tolist() for x in jax.tree.leaves(jax.device_get(t.state["params"]))],
                 "q_spec": [str(s) for s in q.sharding.spec], "embed_spec": [str(s) for s in emb.sharding.spec],
                 "mu_spec": [str(s) for s in mu.sharding.spec], "n_devices": len(q.sharding.device_set)}
    t.close()
print("RESULT" + json.dumps(out))
"""


def test_sharded_steps_match_single_device(tmp_path):
    res = run_result(["-c", SHARDED, str(tmp_path)], devices=8)
    single = res["single"]
    assert single["n_devices"] == 1
    assert res["fsdp"]["embed_spec"] == ["None", "fsdp"]          # [V, E]: E over fsdp
    assert res["fsdp"]["q_spec"][0] == "fsdp"
    assert res["tensor"]["q_spec"] == ["fsdp", "tensor", "None"]  # heads over tensor
    assert res["tensor"]["mu_spec"] == res["tensor"]["q_spec"]    # Adam moments follow the param
    for name in ("fsdp", "tensor"):
        assert res[name]["n_devices"] == 8
        assert abs(res[name]["loss"] - single["loss"]) < 1e-5 * abs(single["loss"])
        for a, b in zip(res[name]["params"], single["params"]):
            a, b = np.asarray(a), np.asarray(b)
            assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, np.max(np.abs(b))), name
