"""Training through context parallelism: 3 steps on 4 fake CPU devices with mesh.sequence = 4
(ring attention on the XLA kernel, tokens sharded over `sequence`) give one device's losses
and parameters, for packed rows (segment ids) and with remat; 40-token rows are padded by the
ring to 64 (not a multiple of its 2 x 4 x 8-token granule).

Runs in a subprocess: the device count is fixed when JAX initializes.
"""

from __future__ import annotations


import numpy as np

from fake_devices import run_result

SCRIPT = r"""
import json, sys
import jax, numpy as np
from flax import nnx
from jaxprefill.train import TrainConfig, Trainer
assert jax.device_count() == 4
base = {"steps": 3, "batch_size": 4, "model": {"config": "tiny-llama", "dtype": "float32",
        "overrides": {"num_layers": 1}, "attention": "xla"},
        "data": {"format": "synthetic", "seq_len": 40, "synthetic_docs": True},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "eps": 1e-3},
        "checkpoint": {"enabled": False},
        "log": {"progress": False, "every": 1, "tensorboard": False}}
out = {}
for name, mesh, remat in [("single", {"data": 1}, "none"), ("ring", {"data": 1, "sequence": 4}, "none"),
                          ("ring_remat", {"data": 1, "sequence": 4}, "full")]:
    d = sys.argv[1] + "/" + name
    cfg = TrainConfig.from_dict({**base, "mesh": mesh, "output_dir": d,
                                 "model": {**base["model"], "remat": remat}})
    t = Trainer(cfg, log_fn=lambda m: None)
    t.fit()
    ctx = nnx.merge(t.model.graphdef, t.model.template).attention.context
    spec = t.batch_sharding.spec
    records = [json.loads(l) for l in open(d + "/metrics.jsonl")]
    out[name] = {"losses": [r["loss"] for r in records if "loss" in r and r.get("event") is None],
                 "params": [np.asarray(x).tolist() for x in jax.tree.leaves(jax.device_get(t.state["params"]))],
                 "batch_spec": [str(s) for s in spec],
                 "ring": None if ctx is None else [ctx.n, ctx.block, ctx.kernel]}
    t.close()
print("RESULT" + json.dumps(out))
"""


def test_ring_training_matches_single_device(tmp_path):
    res = run_result(["-c", SCRIPT, str(tmp_path)], devices=4)
    single = res["single"]
    assert len(single["losses"]) == 3 and single["ring"] is None, single["losses"]
    for name in ("ring", "ring_remat"):
        assert res[name]["ring"] == [4, 8, "xla"], res[name]["ring"]  # 40 tokens -> 64
        assert res[name]["batch_spec"] == ["None", "None", "sequence"], res[name]["batch_spec"]
        np.testing.assert_allclose(res[name]["losses"], single["losses"], rtol=1e-5)
        for a, b in zip(res[name]["params"], single["params"]):
            a, b = np.asarray(a), np.asarray(b)
            assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, np.max(np.abs(b))), name
