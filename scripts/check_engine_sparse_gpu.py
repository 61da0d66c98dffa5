"""GPU check of the engine's sparse prefill attention (jaxprefill/attention/sparse_chunks.py):
the Pallas GPU kernel against the float32 reference kernel over the same policy layouts, for a
chunk at a q_offset (with padding queries) and for prepacked rows (one document + padding, and
two documents), bf16 inputs at Llama-3-8B head shapes. Prints max relative error per case.

    PYTHONPATH=$PWD python3 scripts/check_engine_sparse_gpu.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxprefill.attention import sparse_chunks  # noqa: E402
from jaxprefill.sparse import SparseConfig  # noqa: E402

POLICIES = {
    "streaming": {"policy": "streaming", "params": {"sink": 256, "local": 1024}},
    "minference": {"policy": "minference", "params": {"vertical": 200, "slash": 600}},
    "flexprefill": {"policy": "flexprefill", "params": {"gamma": 0.9}},
}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main() -> int:
    rng = np.random.default_rng(0)
    gpu = jax.default_backend() == "gpu"
    fast = "pallas_gpu" if gpu else "xla"  # on CPU: a smoke test of the script (xla kernel)
    hq, hkv, d, sk, sq = (32, 8, 128, 8192, 2048) if gpu else (4, 2, 16, 8192, 2048)
    bad = 0
    for name, spec in POLICIES.items():
        cfgs = {k: SparseConfig.parse({**spec, "min_length": 1024, "kernel": k})
                for k in (fast, "reference")}
        r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)  # noqa: E731
        # chunk: 2 rows at offsets 4096 and 2048, the second with 1500 valid queries
        q, k, v = r(2, sq, hq, d), r(2, sk, hkv, d), r(2, sk, hkv, d)
        off, n = jnp.asarray([4096, 2048], jnp.int32), jnp.asarray([sq, 1500], jnp.int32)
        outs = {kn: jax.jit(lambda q, k, v, c=c: sparse_chunks.maybe_attend(
            q, k, v, c, 0, True, off, None, None, n, d ** -0.5))(q, k, v) for kn, c in cfgs.items()}
        e1 = rel(outs[fast][1, :1500], outs["reference"][1, :1500])
        e0 = rel(outs[fast][0], outs["reference"][0])
        # packed rows: one document of 3000 + padding; two documents (dense structured)
        s = 4096
        seg = np.zeros((2, s), np.int32)
        seg[0, :3000] = 1
        seg[1, :1000], seg[1, 1000:3900] = 1, 2
        seg = jnp.asarray(seg)
        q, k, v = r(2, s, hq, d), r(2, s, hkv, d), r(2, s, hkv, d)
        outs = {kn: jax.jit(lambda q, k, v, c=c: sparse_chunks.maybe_attend(
            q, k, v, c, 0, True, None, (seg, seg), None, None, d ** -0.5))(q, k, v)
            for kn, c in cfgs.items()}
        e2 = rel(outs[fast][0, :3000], outs["reference"][0, :3000])
        e3 = rel(outs[fast][1, :3900], outs["reference"][1, :3900])
        errs = [e0, e1, e2, e3]
        ok = all(np.isfinite(e) and e < 2e-2 for e in errs)
        bad += not ok
        print(f"{name:12s} chunk {e0:.2e} / {e1:.2e} (padded)  packed {e2:.2e} (one doc) / "
              f"{e3:.2e} (two docs)  {'OK' if ok else 'FAIL'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
