"""The two-device cases of tests/test_engine_dsa_tpla.py, run in a subprocess on 2 fake CPU
devices (``python -m tests.dsa_tpla_cases CASE``; the device count is fixed when JAX starts).
Prints one ``RESULT`` line of JSON.

  decode: one DSA-TPLA decode step of a one-layer tiny V3.2 model (k = 12; rows of 30, 21
    and 8 cached keys) at g = 1 and at g = 2 (rope replicated; rope split with logit scale g)
    against a float64 reference written from the definitions: the indexer's scores and top-k
    in NumPy, then `tpla_decode_numpy` with the unselected keys masked. With one layer every
    cached entry is a function of its token's embedding, so the reference needs no prefill.
    For the rows above k also the same reference without the mask (dense TPLA) and at g = 1
    (exact DSA), which a g = 2 step must not equal; the 8-key row (every key selected) also
    alone in a cache of k slots, where the step runs dense (`tpla_decode`, no indexer).
  mixed: the g = 2 engine on prompts below and above k = 16 together (packed rows, chunks,
    continuous batching), then each prompt alone through the same engine.
  sharded: the index keys split by page slot over the 2 devices (`index_keys="sharded"`)
    against the replicated pool: one decode step's logits (float32 keys), and the engine's
    tokens with FP8 index keys; the shapes each device holds.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprefill.infer import Engine, EngineConfig
from jaxprefill.mla.dsa_index_shards import make_pools
from jaxprefill.mla.dsa_tpla_steps import DSATPLACache, decode_step, prefill_forward
from jaxprefill.mla.tpla import TPLAConfig, reparameterize
from jaxprefill.mla.tpla_model import folded_w_uv, raw_latent
from jaxprefill.mla.tpla_steps import unpack_latent
from jaxprefill.models.dsa import DSAOptions
from jaxprefill.sharding import make_mesh
from tests.dsa_tiny import tiny_v32
from tests.tpla_numpy import tpla_decode_numpy


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def steps(model, mesh, tcfg, index_keys: str = "replicated"):
    """Jitted (prefill_forward, decode_step) of `model` on `mesh`."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, tokens, cache, start):
        return prefill_forward(nnx.merge(graphdef, state), tokens, cache, start, mesh=mesh,
                               tcfg=tcfg, index_keys=index_keys)

    @jax.jit
    def decode(state, tokens, cache, index):
        return decode_step(nnx.merge(graphdef, state), tokens, cache, index, mesh=mesh,
                           tcfg=tcfg, index_keys=index_keys)

    return (lambda *a: prefill(state, *a)), (lambda *a: decode(state, *a))


@nnx.jit
def attention_inputs(model, tokens: jax.Array) -> dict:
    """A one-layer model's float32 inputs of the decode attention of the last of tokens [1, T]:
    every token's cache entries, the last one's queries, and its residual stream."""
    layer = model.layers[0]
    attn, t = layer.attn, tokens.shape[1]
    cos, sin = model.rope_tables(jnp.arange(t, dtype=jnp.int32)[None])
    x = jnp.take(model.embed[...], tokens, axis=0)
    h = layer.attn_norm(x)
    c_rot, k_pe = raw_latent(attn, h, cos, sin)
    qc, qs, hq = cos[:, -1:], sin[:, -1:], h[:, -1:]
    qr = attn.query_latent(hq)
    q_nope, q_pe = attn.heads(qr, qc, qs)
    iq, iw = attn.indexer.queries(qr, hq, qc, qs)
    return {"c_rot": c_rot, "k_pe": k_pe, "keys": attn.indexer.keys(h, cos, sin)[0],
            "q_lat": attn.absorb_query(q_nope)[:, 0], "q_pe": q_pe[:, 0], "iq": iq[0, 0],
            "iw": iw[0, 0], "x": x[:, -1:], "w_uv": folded_w_uv(attn)}


@nnx.jit
def logits_after_attention(model, x: jax.Array, o: jax.Array) -> jax.Array:
    """The rest of the one-layer model from the residual x [1, 1, E] and the attention output
    o [1, H, d_v]: float32 logits [V]."""
    layer = model.layers[0]
    y = x + layer.attn.out_proj(o[:, None])
    y = y + layer.mlp(layer.mlp_norm(y))
    return model.logits(model.norm(y[:, 0]))[0]


def reference_logits(model, seq: list[int], g: int, tcfg: TPLAConfig, select: bool) -> dict:
    """Float64 attention of a one-layer folded model's decode query (the last token of seq)
    over the entries of every token of seq; select: only the indexer's top-k keys."""
    cfg, t, k = model.config, len(seq), model.config.index_topk
    a = {n: np.asarray(v, np.float64) for n, v in
         attention_inputs(model, jnp.asarray([seq], jnp.int32)).items()}
    scores = np.einsum("h,ht->t", a["iw"], np.maximum(a["iq"] @ a["keys"].T, 0.0))  # [t]
    order = np.argsort(-scores, kind="stable")  # ties: the lower key index first
    mask = np.zeros(t, bool)
    mask[order[:k]] = True
    o = tpla_decode_numpy(a["q_lat"], a["q_pe"], a["c_rot"], a["k_pe"], [t], a["w_uv"], g=g,
                          tcfg=tcfg, sm_scale=cfg.softmax_scale, eps=cfg.rms_norm_eps,
                          mask=mask[None] if select else None)
    logits = logits_after_attention(model, jnp.asarray(a["x"], jnp.float32),
                                    jnp.asarray(o, jnp.float32))
    # how far the k-th score is above the next: the float32 step must select the same keys
    gap = (scores[order[k - 1]] - scores[order[k]]) / np.max(np.abs(scores)) if t > k else None
    u = a["c_rot"][0] / np.sqrt(np.mean(a["c_rot"][0] ** 2, -1, keepdims=True) + cfg.rms_norm_eps)
    return {"logits": np.asarray(logits), "selected": int(mask.sum()), "keys": t, "gap": gap,
            "entries": (np.concatenate([u, a["k_pe"][0]], -1), a["keys"])}


def cached_entries(cache: DSATPLACache, b: int, t: int, cfg, g: int, tcfg: TPLAConfig
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Row b's first t cached entries of layer 0: the latent [t, d_c + d_r] (unpacked from the
    sharded pool) and the index keys [t, Di]."""
    table = np.asarray(cache.page_table[b])
    packed = np.asarray(cache.pages[0])[table].reshape(-1, cache.pages[0].shape[-1])[:t]
    keys = np.asarray(cache.index_pages[0])[table].reshape(-1, cfg.index_head_dim)[:t]
    return np.asarray(unpack_latent(jnp.asarray(packed), cfg, g, tcfg)), keys


def decode_case(mesh, tcfg: TPLAConfig, short_alone: bool) -> dict:
    """The decode step of a one-layer model (k = 12) on rows of 30, 21 and 8 cached keys
    against `reference_logits`; short_alone: also the 8-key row alone in a cache of k slots."""
    g = mesh.shape[tcfg.axis]
    folded = reparameterize(tiny_v32(), tcfg.transform)
    k = folded.config.index_topk
    rng = np.random.default_rng(11)
    lengths = [30, 21, 8]  # cached keys before the decode token: two rows > k, one < k
    prompts = [rng.integers(1, 97, n).tolist() for n in lengths]
    nxt = rng.integers(1, 97, len(lengths)).tolist()
    step_fns = steps(folded, mesh, tcfg)
    got, cache = first_decode(folded, prompts, nxt, 64, mesh, tcfg, step_fns)  # 64: sparse
    out = {"vs_reference": 0.0, "cache_vs_reference": 0.0, "vs_dense_tpla": [],
           "vs_exact_dsa": [], "gap": [], "selected": []}
    for b, n in enumerate(lengths):
        seq = prompts[b] + [nxt[b]]
        ref = reference_logits(folded, seq, g, tcfg, select=True)
        out["vs_reference"] = max(out["vs_reference"], rel(got[b], ref["logits"]))
        cached = cached_entries(cache, b, n + 1, folded.config, g, tcfg)
        out["cache_vs_reference"] = max(out["cache_vs_reference"],
                                        *(rel(c, r) for c, r in zip(cached, ref["entries"])))
        out["selected"].append([ref["selected"], ref["keys"]])
        if n > k:  # the selection is a strict subset: dense TPLA and exact DSA differ from it
            dense = reference_logits(folded, seq, g, tcfg, select=False)["logits"]
            exact = reference_logits(folded, seq, 1, tcfg, select=True)["logits"]
            out["vs_dense_tpla"].append(rel(got[b], dense))
            out["vs_exact_dsa"].append(rel(got[b], exact))
            out["gap"].append(ref["gap"])
    if short_alone:  # k slots: dense prefill and `tpla_decode`, no indexer
        alone, _ = first_decode(folded, prompts[2:], nxt[2:], k, mesh, tcfg, step_fns)
        out["short_alone_vs_batch"] = rel(alone[0], got[2])
    return out


def first_decode(folded, prompts: list[list[int]], nxt: list[int], capacity: int, mesh,
                 tcfg, step_fns, index_keys: str = "replicated"
                 ) -> tuple[np.ndarray, DSATPLACache]:
    """Logits [B, V] of one decode step (token nxt[b] at position len(prompts[b])) after
    `prefill_forward` of the right-padded prompts, in a cache of `capacity` slots a row
    (page 4), and the cache after it."""
    prefill, decode = step_fns
    tokens = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    b = len(prompts)
    cache = DSATPLACache.zeros(folded.config, b, capacity, mesh=mesh, tcfg=tcfg, page_size=4,
                               index_keys=index_keys)
    _, cache = prefill(jnp.asarray(tokens), cache, jnp.zeros(b, jnp.int32))
    logits, cache = decode(jnp.asarray(nxt, jnp.int32)[:, None], cache,
                           jnp.asarray([len(p) for p in prompts], jnp.int32))
    return np.asarray(logits), cache


def mixed_case(mesh) -> dict:
    """The g = 2 engine on prompts below and above k = 16 together, then each prompt alone
    through the same engine (the same compiled steps: every page table has 128 slots)."""
    model = tiny_v32(num_layers=2, index_topk=16)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, 97, n).tolist() for n in (5, 40, 9, 23, 70)]
    config = EngineConfig(max_batch=3, prefill_tokens=32, prefill_rows=2, page_size=8,
                          num_pages=64, max_new_tokens=4, bucket=128, chat=False,
                          tpla={"tensor": 2})
    engine = Engine(model, None, config)
    together = [r.tokens for r in engine.generate(prompts)]
    stats, free = dict(engine.stats), engine.allocator.num_free
    alone = [engine.generate([p])[0].tokens for p in prompts]
    shards = lambda pool: sorted({s.data.shape for s in pool.addressable_shards})  # noqa: E731
    return {"together": together, "alone": alone, "stats": stats, "free_pages": free,
            "latent_shards": shards(engine.cache.pages[0]),
            "index_shards": shards(engine.cache.index_pages[0])}


def sharded_case(mesh) -> dict:
    """Index keys split by page slot against replicated ones (module docstring)."""
    tcfg = TPLAConfig()
    folded = reparameterize(tiny_v32(), tcfg.transform)
    rng = np.random.default_rng(12)
    prompts = [rng.integers(1, 97, n).tolist() for n in (30, 21, 8)]
    nxt = rng.integers(1, 97, 3).tolist()
    logits = {}
    for layout in ("replicated", "sharded"):
        fns = steps(folded, mesh, tcfg, layout)
        logits[layout], _ = first_decode(folded, prompts, nxt, 64, mesh, tcfg, fns, layout)
    out = {"step_vs_replicated": rel(logits["sharded"], logits["replicated"])}
    prompts = [rng.integers(1, 97, n).tolist() for n in (5, 40, 23, 70)]
    kw = dict(max_batch=3, prefill_tokens=32, prefill_rows=2, page_size=8, num_pages=64,
              max_new_tokens=4, bucket=128, chat=False)
    model = tiny_v32(num_layers=2, index_topk=16)  # FP8 keys: the packed rows split too
    model.dsa = DSAOptions(fp8=True)
    for layout in ("replicated", "sharded"):
        engine = Engine(model, None, EngineConfig(**kw, tpla={"tensor": 2, "index_keys": layout}))
        out[layout] = [r.tokens for r in engine.generate(prompts)]
        pool = engine.cache.index_pages[0]
        out[layout + "_shards"] = sorted({s.data.shape for s in pool.addressable_shards})
    try:  # 2 devices cannot split pages of 9 slots evenly
        make_pools(model.config, 4, 9, jnp.float32, mesh, "tensor", False)
    except ValueError as err:
        out["odd_page"] = str(err)
    return out


def decode_cases(mesh) -> dict:
    one = make_mesh(tensor=1, devices=jax.devices()[:1])
    return {"g1": decode_case(one, TPLAConfig(), short_alone=False),
            "replicated": decode_case(mesh, TPLAConfig(), short_alone=True),
            "split_g": decode_case(mesh, TPLAConfig(rope="split", logit_scale="g"),
                                   short_alone=False)}


CASES = {"decode": decode_cases, "mixed": mixed_case, "sharded": sharded_case}


def main() -> None:
    assert len(jax.devices()) == 2
    mesh = make_mesh(tensor=2, devices=jax.devices())
    print("RESULT" + json.dumps(CASES[sys.argv[1]](mesh)))


if __name__ == "__main__":
    main()
