"""GPU check of the engine's sparse prefill attention (``jaxprefill.attention.attend`` with a
``SparseConfig``, the call the engine's model makes): a block-sparse kernel against the float32
reference kernel over the same policy layouts, for a chunk at a q_offset (with padding queries)
and for prepacked rows (one document + padding, and two documents), bf16 inputs at Llama-3-8B
head shapes. Each call must be classified as a sparse prefill (``jaxprefill.attention.sparse.
sparse_call``: kind "chunk" / "packed"); prints max relative error per case, exit status 1 if
a case fails.

    python -m scripts.checks.check_engine_sparse_gpu [--kernel triton]

``--kernel``: the block-sparse implementation under test (``SparseConfig.kernel``): ``triton``
(default; ``pallas_gpu`` is accepted for it), ``mosaic_gpu`` (it refuses MInference's key
columns: that policy then fails, saying so) or ``auto`` (Mosaic GPU where it takes the layout,
Triton for key columns). On a CPU the script runs ``xla`` at
small head shapes (a smoke run of the script itself).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxprefill.attention import AttentionSpec, attend
from jaxprefill.attention.sparse import sparse_call
from jaxprefill.sparse import SparseConfig
from scripts.common.impl_names import canonical

POLICIES = {
    "streaming": {"policy": "streaming", "params": {"sink": 256, "local": 1024}},
    "minference": {"policy": "minference", "params": {"vertical": 200, "slash": 600}},
    "flexprefill": {"policy": "flexprefill", "params": {"gamma": 0.9}},
}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def sparse_attention(q, k, v, cfg: SparseConfig, *, q_offset=None, segment_ids=None,
                     lengths=None) -> jax.Array:
    """attend() of layer 0 under ``cfg``; raises if the call is not classified as a sparse
    prefill (it would then be dense attention, and the check would not test the policy)."""
    sm_scale = q.shape[-1] ** -0.5
    call = sparse_call(cfg, 0, q, k, causal=True, q_offset=q_offset, segment_ids=segment_ids,
                       window=None, lengths=lengths, sm_scale=sm_scale)
    if call is None:
        raise ValueError("the call stays dense (not a sparse prefill)")
    return attend(q, k, v, causal=True, q_offset=q_offset, segment_ids=segment_ids,
                  sm_scale=sm_scale, spec=AttentionSpec(sparse=cfg), layer=0, lengths=lengths)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", default="triton", type=canonical,
                    choices=["triton", "mosaic_gpu", "auto"],
                    help="block-sparse implementation under test (GPU)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    gpu = jax.default_backend() == "gpu"
    fast = args.kernel if gpu else "xla"  # on CPU: a smoke test of the script (xla kernel)
    hq, hkv, d, sk, sq = (32, 8, 128, 8192, 2048) if gpu else (4, 2, 16, 8192, 2048)
    print(f"device {jax.devices()[0].device_kind}: {fast} against reference", flush=True)
    bad = 0
    for name, spec in POLICIES.items():
        cfgs = {k: SparseConfig.parse({**spec, "min_length": 1024, "kernel": k})
                for k in (fast, "reference")}
        r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)  # noqa: E731
        try:
            # chunk: 2 rows at offsets 4096 and 2048, the second with 1500 valid queries
            q, k, v = r(2, sq, hq, d), r(2, sk, hkv, d), r(2, sk, hkv, d)
            off, n = jnp.asarray([4096, 2048], jnp.int32), jnp.asarray([sq, 1500], jnp.int32)
            outs = {kn: jax.jit(lambda q, k, v, c=c: sparse_attention(
                q, k, v, c, q_offset=off, lengths=n))(q, k, v) for kn, c in cfgs.items()}
            e1 = rel(outs[fast][1, :1500], outs["reference"][1, :1500])
            e0 = rel(outs[fast][0], outs["reference"][0])
            # packed rows: one document of 3000 + padding; two documents (dense structured)
            s = 4096
            seg = np.zeros((2, s), np.int32)
            seg[0, :3000] = 1
            seg[1, :1000], seg[1, 1000:3900] = 1, 2
            seg = jnp.asarray(seg)
            q, k, v = r(2, s, hq, d), r(2, s, hkv, d), r(2, s, hkv, d)
            outs = {kn: jax.jit(lambda q, k, v, c=c: sparse_attention(
                q, k, v, c, segment_ids=(seg, seg)))(q, k, v) for kn, c in cfgs.items()}
            e2 = rel(outs[fast][0, :3000], outs["reference"][0, :3000])
            e3 = rel(outs[fast][1, :3900], outs["reference"][1, :3900])
        except Exception as e:  # noqa: BLE001 - report the policy and go on with the others
            bad += 1
            print(f"{name:12s} FAIL {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        errs = [e0, e1, e2, e3]
        ok = all(np.isfinite(e) and e < 2e-2 for e in errs)
        bad += not ok
        print(f"{name:12s} chunk {e0:.2e} / {e1:.2e} (padded)  packed {e2:.2e} (one doc) / "
              f"{e3:.2e} (two docs)  {'OK' if ok else 'FAIL'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
