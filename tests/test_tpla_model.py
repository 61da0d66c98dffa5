"""TPLA driving a whole `DeepSeek` model (jaxprefill.mla.tpla_model: tpla_logits, tpla_prefill,
tpla_decode_step), on 8 fake CPU devices in a subprocess:

  * g = 1: teacher-forced TPLA logits equal the original model's MLA logits (defaults, and
    every switch at its non-default value);
  * g = 2, 4: every query's attention output equals the float64 NumPy TPLA
    (`tpla_decode_numpy` over that query's prefix) and differs from MLA;
  * segment ids keep packed documents apart (a document alone gives the same logits);
  * MLA prefill + one TPLA decode step equals the teacher-forced logits (context="mla"), and
    each device's cache shard holds 1/g of the latent.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jaxprefill.config import MLAConfig, RopeConfig
    from jaxprefill.models.deepseek import DeepSeek
    from jaxprefill.sharding import make_mesh
    from jaxprefill.mla.tpla import TPLAConfig, pack_latent, reparameterize
    from jaxprefill.mla.tpla_model import (TPLACache, raw_latent, tpla_attention,
                                           tpla_decode_step, tpla_logits, tpla_prefill)
    from tests.tpla_numpy import tpla_decode_numpy
    assert len(jax.devices()) == 8
    cfg = MLAConfig(model_type="deepseek_v3", vocab_size=97, hidden_size=32, intermediate_size=48,
                    num_layers=2, num_heads=4, kv_lora_rank=32, qk_nope_head_dim=8,
                    qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=256, q_lora_rank=16,
                    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    first_k_dense_replace=1, n_shared_experts=1,
                    rope=RopeConfig(type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=1.0,
                                    original_max_position_embeddings=64))
    model = DeepSeek(cfg, rngs=nnx.Rngs(0))
    # larger weights than the 0.02 init: peaked attention, so one softmax per shard really
    # differs from MLA; non-trivial kv norm weights, so folding gamma is exercised
    for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if p[...].ndim >= 2 and path[-1] != "embed":
            p[...] = p[...] * 8.0
    for layer in model.layers:
        layer.attn.kv_norm.scale[...] = 1 + 0.3 * jax.random.normal(jax.random.key(9), (32,))
    B, S = 2, 24
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, (B, S)), jnp.int32)
    mla = np.asarray(model(tokens))
    rel = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    meshes = {g: make_mesh(tensor=g, devices=jax.devices()[:g]) for g in (1, 2, 4)}

    def logits_fn(m, g, tcfg, context):
        gd, st = nnx.split(m)
        f = jax.jit(lambda st, t, pos, seg: tpla_logits(nnx.merge(gd, st), t, mesh=meshes[g],
                    tcfg=tcfg, positions=pos, segment_ids=seg, context=context))
        return lambda t, pos=None, seg=None: np.asarray(f(st, t, pos, seg))

    folded = {t: reparameterize(model, t, calib_tokens=tokens) for t in ("none", "hadamard", "pca")}
    # 1. g = 1 is MLA, whatever the switches
    for transform, tcfg, context in (
            ("none", TPLAConfig(), "tpla"),
            ("pca", TPLAConfig(rope="split", norm="per_shard", logit_scale="g"), "mla")):
        err = rel(logits_fn(folded[transform], 1, tcfg, context)(tokens), mla)
        assert err < 1e-5, ("g=1 != MLA", transform, context, err)
    print("g=1 equals MLA")

    # 2. g = 2, 4: each query's layer-0 attention equals the float64 numpy TPLA over its prefix
    m = folded["hadamard"]
    attn = m.layers[0].attn
    pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    cos, sin = m.rope_tables(pos)
    h = m.layers[0].attn_norm(jnp.take(m.embed[...], tokens, axis=0))
    q_nope, q_pe = attn.queries(h, cos, sin)
    q_lat = attn.absorb_query(q_nope)
    c_rot, k_pe = raw_latent(attn, h, cos, sin)
    w_uv = attn.kv_b[...][..., cfg.qk_nope_head_dim:]
    f64 = lambda x: np.asarray(x, np.float64)
    for g, tcfg in ((2, TPLAConfig(rope="split", norm="global", logit_scale="g")),
                    (2, TPLAConfig(rope="replicated", norm="per_shard", logit_scale="1")),
                    (4, TPLAConfig(rope="split", norm="per_shard", logit_scale="1"))):
        packed = pack_latent(c_rot, k_pe, g, tcfg, cfg.rms_norm_eps)
        out = np.asarray(jax.jit(lambda *a: tpla_attention(*a, mesh=meshes[g], tcfg=tcfg,
                         sm_scale=cfg.softmax_scale))(q_lat, q_pe, packed, packed, w_uv))
        ref = np.stack([tpla_decode_numpy(f64(q_lat[:, t]), f64(q_pe[:, t]), f64(c_rot[:, :t + 1]),
                                          f64(k_pe[:, :t + 1]), [t + 1] * B, f64(w_uv), g=g,
                                          tcfg=tcfg, sm_scale=cfg.softmax_scale,
                                          eps=cfg.rms_norm_eps) for t in range(S)], axis=1)
        assert rel(out, ref) < 1e-5, (g, tcfg, rel(out, ref))
        mla_o = np.stack([tpla_decode_numpy(f64(q_lat[:, t]), f64(q_pe[:, t]), f64(c_rot[:, :t + 1]),
                                            f64(k_pe[:, :t + 1]), [t + 1] * B, f64(w_uv), g=1,
                                            tcfg=TPLAConfig(), sm_scale=cfg.softmax_scale,
                                            eps=cfg.rms_norm_eps) for t in range(S)], axis=1)
        assert rel(out, mla_o) > 1e-3, (g, tcfg, "TPLA g>1 should differ from MLA")
    print("g=2,4 attention equals float64 numpy per query")

    # 3. segment ids: the second document of a packed row == that document alone
    tcfg = TPLAConfig(transform="hadamard", rope="split", norm="per_shard")
    f = logits_fn(m, 2, tcfg, "tpla")
    seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 14], B, 0), jnp.int32)
    posn = jnp.asarray(np.repeat([list(range(10)) + list(range(14))], B, 0), jnp.int32)
    packed_row = f(tokens, posn, seg)
    alone = f(tokens[:, 10:])
    assert rel(packed_row[:, 10:], alone) < 1e-5, rel(packed_row[:, 10:], alone)
    print("segments isolate documents")

    # 4. MLA prefill + TPLA decode step == teacher-forced context="mla"; cache shards are 1/g
    for g in (2,):  # (g = 4 numerics: section 2)
        mesh = meshes[g]
        tf = logits_fn(m, g, tcfg, "mla")(tokens)
        assert rel(tf, mla) > 1e-3
        cache = TPLACache.zeros(cfg, B, S, mesh=mesh, tcfg=tcfg)
        gd, st = nnx.split(m)
        pre = jax.jit(lambda st, t, c: tpla_prefill(nnx.merge(gd, st), t, c, mesh=mesh, tcfg=tcfg))
        dec = jax.jit(lambda st, t, c, i: tpla_decode_step(nnx.merge(gd, st), t, c, i, mesh=mesh,
                                                           tcfg=tcfg, impl="reference"))
        last, cache = pre(st, tokens[:, :S - 1], cache)
        assert rel(np.asarray(last), mla[:, S - 2]) < 1e-5  # prefill is MLA
        step, cache = dec(st, tokens[:, S - 1:], cache, jnp.full((B,), S - 1, jnp.int32))
        assert rel(np.asarray(step), tf[:, S - 1]) < 1e-5, rel(np.asarray(step), tf[:, S - 1])
        w = cfg.kv_lora_rank // g + cfg.qk_rope_head_dim // g
        assert {s.data.shape[-1] for s in cache.pages[1].addressable_shards} == {w}
    print("decode step equals teacher-forced; cache shards 1/g")
    print("OK")
""")


def test_tpla_model_on_8_fake_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
