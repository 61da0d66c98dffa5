"""TPLA: the orthogonal reparameterization is exact for MLA; on 8 fake CPU devices (subprocess)
g=1 equals MLA absorbed decode, g=2,4 equal a float64 NumPy TPLA for every switch combination,
and each device holds 1/g of the latent."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprefill.config import MLAConfig, RopeConfig
from jaxprefill.models.deepseek import DeepSeek
from jaxprefill.mla.tpla import TPLAConfig, hadamard, pca_rotation, reparameterize

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed=0):
    cfg = MLAConfig(model_type="deepseek_v3", vocab_size=97, hidden_size=32, intermediate_size=48,
                    num_layers=1, num_heads=4, kv_lora_rank=32, qk_nope_head_dim=8,
                    qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=256, q_lora_rank=16,
                    rope=RopeConfig(type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=1.0,
                                    original_max_position_embeddings=64))
    model = DeepSeek(cfg, rngs=nnx.Rngs(seed))
    # non-trivial norm weights, so folding gamma is actually tested
    model.layers[0].attn.kv_norm.scale[...] = 1 + 0.3 * jax.random.normal(jax.random.key(9), (32,))
    return model


def logits(model, tokens):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))


def test_orthogonal_transforms():
    h = hadamard(64)
    assert np.allclose(h @ h.T, np.eye(64)) and np.allclose(np.abs(h), 1 / 8)
    x = np.random.default_rng(0).standard_normal((500, 16)) * np.linspace(3, 0.1, 16)
    r = pca_rotation(x @ np.linalg.qr(np.random.default_rng(1).standard_normal((16, 16)))[0])
    assert np.allclose(r @ r.T, np.eye(16))
    var = np.var(x @ np.linalg.qr(np.random.default_rng(1).standard_normal((16, 16)))[0] @ r.T, 0)
    assert np.all(np.diff(var) < 1e-9)  # components sorted by decreasing variance
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)
    with pytest.raises(ValueError, match="rope"):
        TPLAConfig(rope="halves")


def test_reparameterization_leaves_mla_unchanged():
    model = tiny_model()
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, 24)), jnp.int32)
    ref = logits(model, tokens)
    for transform in ("none", "hadamard", "pca"):
        new = reparameterize(model, transform, calib_tokens=tokens)
        got = logits(new, tokens)
        assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-5, transform
        a0, a1 = model.layers[0].attn, new.layers[0].attn
        assert np.allclose(np.asarray(a1.kv_norm.scale[...]), 1.0)  # gamma folded away
        if transform != "none":  # the weights really changed (and the original is untouched)
            assert not np.allclose(np.asarray(a0.kv_b[...]), np.asarray(a1.kv_b[...]), atol=1e-3)
        assert not np.allclose(np.asarray(a0.kv_norm.scale[...]), 1.0)


SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxprefill.sharding import make_mesh
    from jaxprefill.mla.tpla import TPLAConfig, hadamard, pack_latent, tpla_decode
    from tests.tpla_numpy import tpla_decode_numpy
    from pallas_kernels.mla_reference import mla_decode_reference
    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    B, T, H, DC, DR, DN, DV, PAGE, EPS = 2, 100, 4, 64, 16, 8, 8, 64, 1e-6
    lengths = np.array([100, 37], np.int32)
    c_raw = rng.standard_normal((B, T, DC)) * np.linspace(2, .2, DC)
    k_pe = rng.standard_normal((B, T, DR))
    q_nope = rng.standard_normal((B, H, DN)); q_pe = rng.standard_normal((B, H, DR))
    w_uk = rng.standard_normal((DC, H, DN)) / 4; w_uv = rng.standard_normal((DC, H, DV)) / 4
    gamma = 1 + 0.3 * rng.standard_normal(DC); tau = 0.3
    f32 = lambda x: jnp.asarray(x, jnp.float32)

    def paged(x):  # [B, T, W] -> pages [B*2, PAGE, W] (rows' pages swapped), table
        x = np.pad(np.asarray(x), ((0, 0), (0, 2 * PAGE - T), (0, 0)))
        pages = x.reshape(B * 2, PAGE, -1)[::-1].copy()
        table = (B * 2 - 1 - np.arange(B * 2)).reshape(B, 2).astype(np.int32)
        return pages, table

    # MLA absorbed decode with the original (unfolded) weights
    c_hat = gamma * c_raw / np.sqrt(np.mean(c_raw ** 2, -1, keepdims=True) + EPS)
    pages, table = paged(np.concatenate([c_hat, k_pe], -1))
    q_lat = np.einsum("bhn,chn->bhc", q_nope, w_uk)
    o_lat, _ = mla_decode_reference(f32(q_lat), f32(q_pe), f32(pages), table, lengths, tau)
    mla = np.einsum("bhc,chv->bhv", np.asarray(o_lat, np.float64), w_uv)

    def run(g, tcfg, R, output="replicated"):
        mesh = make_mesh(tensor=g, devices=jax.devices()[:g])
        c_rot = c_raw @ R.T
        w_uk2 = np.einsum("xc,c,chn->xhn", R, gamma, w_uk)
        w_uv2 = np.einsum("xc,c,chv->xhv", R, gamma, w_uv)
        packed = pack_latent(f32(c_rot), f32(k_pe), g, tcfg, EPS)
        pg, tb = paged(packed)
        pg = jax.device_put(f32(pg), NamedSharding(mesh, P(None, None, "tensor")))
        w = DC // g + (DR if tcfg.rope == "replicated" else DR // g)
        shard_shapes = {tuple(s.data.shape) for s in pg.addressable_shards}
        assert shard_shapes == {(B * 2, PAGE, w)}, (shard_shapes, w)
        ql = f32(np.einsum("bhn,chn->bhc", q_nope, w_uk2))
        out = tpla_decode(ql, f32(q_pe), pg, jnp.asarray(tb), jnp.asarray(lengths), f32(w_uv2),
                          mesh=mesh, tcfg=tcfg, sm_scale=tau, impl="reference", output=output)
        ref = tpla_decode_numpy(np.asarray(ql, np.float64), q_pe, c_rot, k_pe, lengths, w_uv2, g=g, tcfg=tcfg, sm_scale=tau, eps=EPS)
        return np.asarray(out, np.float64), ref

    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    Q, _ = np.linalg.qr(rng.standard_normal((DC, DC)))
    for name, R, rope, norm, scale in (("none", np.eye(DC), "replicated", "global", "1"),
                                       ("random_orth", Q, "split", "per_shard", "g")):
        out, ref = run(1, TPLAConfig(rope=rope, norm=norm, logit_scale=scale), R)
        assert rel(out, mla) < 1e-5, ("g=1 != MLA", name, rope, norm, scale, rel(out, mla))
    print("g=1 equals MLA (identity and random orthogonal R, both switch extremes)")
    diffs = {}
    for g in (2, 4):
        # each value of each switch at each g (a Latin square over rope x norm x scale)
        for rope, norm, scale in (("replicated", "global", "1"), ("replicated", "per_shard", "g"),
                                  ("split", "global", "g"), ("split", "per_shard", "1")):
            tcfg = TPLAConfig(rope=rope, norm=norm, logit_scale=scale)
            out, ref = run(g, tcfg, hadamard(DC))
            assert rel(out, ref) < 1e-5, (g, rope, norm, scale, rel(out, ref))
            diffs[(g, rope, norm, scale)] = rel(out, mla)
            if rope == "replicated" and norm == "global":  # reduce-scatter: same values
                heads = run(g, tcfg, hadamard(DC), output="heads")[0]
                assert rel(heads, out) < 1e-6, (g, rel(heads, out))
    assert min(diffs.values()) > 1e-4, "TPLA g>1 should differ from MLA (one softmax per shard)"
    print("g=2,4 equal float64 numpy; rel. diff vs MLA:",
          {k: round(v, 3) for k, v in diffs.items()})
    print("OK")
""")


def test_tpla_on_8_fake_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
