"""Sparse config, registry, estimator primitives, and the attend / generate integration."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprefill as jp
from jaxprefill import sparse
from jaxprefill.attention import AttentionSpec, attend
from jaxprefill.sparse import estimators as est
from jaxprefill.sparse.base import make_geometry
from pallas_kernels import block_sparse_attention


def test_registry_errors_name_bad_keys():
    assert {"dense", "streaming", "minference", "flexprefill", "xattention", "proxyattn",
            "trianglemix", "oracle_topk"} <= set(sparse.available())
    with pytest.raises(ValueError, match="unknown sparse policy 'flexprefil'"):
        sparse.get("flexprefil")
    with pytest.raises(ValueError, match=r"\['gama'\].*gamma"):
        sparse.get("flexprefill", gama=0.9)
    with pytest.raises(ValueError, match="multiple of stride"):
        sparse.get("xattention", block_size=64, stride=48)
    p = sparse.get("flexprefill", gamma=0.9)
    assert p.gamma == 0.9 and p.tau == 0.1 and hash(p) == hash(sparse.get("flexprefill", gamma=0.9))


@pytest.mark.parametrize("spec,message", [
    ("xattention:threshold=abc", r"^xattention: threshold must be a number, got str 'abc'$"),
    ("xattention:threshold=true", r"^xattention: threshold must be a number, got bool True$"),
    ("xattention:stride=1.5", r"^xattention: stride must be an integer, got float 1\.5$"),
    ("xattention:max_nnz=abc", r"^xattention: max_nnz must be an integer or null, got str"),
    ("minference:columns=maybe", r"^minference: columns must be true or false, got str"),
    ("xattention:threshold=2", r"^xattention: threshold must be in \(0, 1\]"),
    ("xattention:threshold=0", r"^xattention: threshold must be in \(0, 1\]"),
    ("xattention:stride=0", r"^xattention: stride must be >= 1, got 0$"),
    ("proxyattn:stride=0", r"^proxyattn: stride must be >= 1, got 0$"),
    ("proxyattn:gamma=1.5", r"^proxyattn: gamma must be in \(0, 1\], got 1\.5$"),
    ("flexprefill:gamma=0", r"^flexprefill: gamma must be in \(0, 1\], got 0$"),
    ("flexprefill:tau=-1", r"^flexprefill: tau must be >= 0, got -1$"),
    ("flexprefill:min_budget=-5", r"^flexprefill: min_budget must be >= 0"),
    ("pbs:tau=2", r"^pbs: tau must be in \(0, 1\], got 2$"),
    ("oracle_topk:gamma=-0.5", r"^oracle_topk: gamma must be in \(0, 1\], got -0\.5$"),
    ("streaming:sink=-1", r"^streaming: sink and local must be >= 0"),
    ("trianglemix:n_local=-1", r"^trianglemix: start_layer, n_init and n_local must be >= 0"),
    ("minference:pattern=zz", r"^minference: pattern must be one of"),
    ("xattention:threshold", r"^expected key=value, got 'threshold'$"),
])
def test_policy_parameters_are_type_and_range_checked(spec, message):
    """A spec's (or a YAML file's) bad value fails when the config is built, naming it: before,
    a string threshold reached jit and threshold=2 or stride=0 were accepted."""
    with pytest.raises(ValueError, match=message):
        sparse.SparseConfig.parse(spec)


def test_policy_specs_and_numpy_values():
    cfg = sparse.SparseConfig.parse("xattention:threshold=0.8,stride=8,n_last=0")
    assert cfg.rules[0].policy == sparse.get("xattention", threshold=0.8, stride=8, n_last=0)
    # ints where a float is declared, numpy scalars and None for an optional field are fine
    sparse.get("flexprefill", gamma=1, tau=np.float32(0.2), min_budget=np.int64(512),
               max_budget=None)


def test_sparse_config_yaml_and_layer_rules(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("min_length: 2048\nblock_size: 64\nlayers:\n"
                    "  - {range: [0, 2], policy: dense}\n"
                    "  - {range: [2, 10], policy: flexprefill, params: {gamma: 0.9}}\n"
                    "  - {policy: streaming, params: {local: 512}}\n")
    cfg = sparse.SparseConfig.parse(str(path))
    assert cfg.min_length == 2048
    assert cfg.policy_for(0) is None  # dense
    assert cfg.policy_for(5).name == "flexprefill" and cfg.policy_for(5).gamma == 0.9
    assert cfg.policy_for(5).block_size == 64  # the top-level block size reaches every policy
    assert cfg.policy_for(29).name == "streaming" and cfg.policy_for(29).local == 512
    hash(cfg)  # lives in the static AttentionSpec

    path.write_text("policy: xattention\nparams: {threshold: 0.8}\nblok_size: 64\n")
    with pytest.raises(ValueError, match=r"cfg.yaml.*\['blok_size'\]"):
        sparse.SparseConfig.parse(str(path))
    path.write_text("policy: xattention\nparams: [\n")
    with pytest.raises(ValueError, match=r"cfg.yaml: not valid YAML: .*\(line 3, column 1\)"):
        sparse.SparseConfig.parse(str(path))
    with pytest.raises(ValueError, match=r"layers\[0\].*\['rnage'\]"):
        sparse.SparseConfig.from_dict({"layers": [{"rnage": [0, 1], "policy": "dense"}]})
    shipped = sorted(Path(__file__).parent.parent.glob("configs/sparse/*.yaml"))
    assert len(shipped) >= 10
    for f in shipped:  # every shipped config parses
        sparse.SparseConfig.parse(str(f))


def test_cumulative_keep_matches_bruteforce():
    rng = np.random.default_rng(0)
    scores = rng.random((3, 7)).astype(np.float32) ** 3
    valid = rng.random((3, 7)) > 0.2
    forced = np.zeros((3, 7), bool)
    forced[:, 0] = True
    keep = np.asarray(est.cumulative_keep(jnp.asarray(scores), jnp.asarray(valid), 0.8,
                                          forced=jnp.asarray(forced), how=sparse.Estimation()))
    for r in range(3):
        idx = [i for i in np.argsort(-scores[r], kind="stable") if valid[r, i]]
        idx = [i for i in idx if forced[r, i]] + [i for i in idx if not forced[r, i]]
        total, acc, want = scores[r][valid[r]].sum(), 0.0, set()
        for i in idx:
            if acc >= 0.8 * total:
                break
            want.add(i)
            acc += scores[r, i]
        assert set(np.flatnonzero(keep[r])) == want


def test_skewed_slash_sums_equal_the_gather():
    # Ragged rows, incl. rows shorter than n_last (their missing query rows are zero in p).
    from jaxprefill.sparse.base import Geometry
    for b, h, r, s, lens in [(3, 2, 5, 37, (37, 3, 20)), (2, 3, 16, 200, (200, 1))]:
        geo = Geometry(b, s, h, h, 8, 16, jnp.asarray(lens, jnp.int32))
        p = np.random.default_rng(s).random((b, h, r, s)).astype(np.float32)
        pos = np.asarray(lens)[:, None] - r + np.arange(r)[None]
        ok = (np.arange(s)[None, None] <= pos[:, :, None]) & (pos[:, :, None] >= 0)
        p = jnp.asarray(np.where(ok[:, None], p, 0.0))
        np.testing.assert_allclose(est.slash_sums(p, geo, r), est.slash_sums_gather(p, geo, r),
                                   atol=1e-5)


def test_slash_and_vertical_estimators_match_bruteforce():
    rng = np.random.default_rng(1)
    b, s, h, d, block, n_last = 1, 200, 2, 8, 32, 16
    q = rng.standard_normal((b, s, h, d)).astype(np.float32)
    k = rng.standard_normal((b, s, h, d)).astype(np.float32)
    geo = make_geometry(jnp.asarray(q), jnp.asarray(k), block, jnp.asarray([150]))
    p = np.asarray(est.last_q_probs(jnp.asarray(q), jnp.asarray(k), geo, n_last))
    slash = np.asarray(est.slash_sums(jnp.asarray(p), geo, n_last))
    want_p = np.zeros((b, h, n_last, s))
    want_slash = np.zeros((b, h, s))
    for r, i in enumerate(range(150 - n_last, 150)):
        logit = np.einsum("hd,jhd->hj", q[0, i], k[0, : i + 1]) / np.sqrt(d)
        pr = np.exp(logit - logit.max(-1, keepdims=True))
        want_p[0, :, r, : i + 1] = pr / pr.sum(-1, keepdims=True)
        for j in range(i + 1):
            want_slash[0, :, i - j] += want_p[0, :, r, j]
    np.testing.assert_allclose(p, want_p, atol=1e-5)
    np.testing.assert_allclose(slash, want_slash, atol=1e-5)
    # A token diagonal o = 40 (block 32): key blocks i-1 and i-2 of query block i.
    sel = np.zeros((1, 1, s), bool)
    sel[..., 40] = True
    diag = np.asarray(est.slash_offsets_to_blocks(jnp.asarray(sel), geo))[0, 0]
    assert list(np.flatnonzero(diag)) == [1, 2]


def test_xattention_antidiagonal_scores_match_bruteforce():
    from jaxprefill.sparse.xattention import antidiagonal_block_scores

    rng = np.random.default_rng(2)
    s, h, d, stride, block = 64, 2, 4, 4, 16
    q = rng.standard_normal((1, s, h, d)).astype(np.float32)
    k = rng.standard_normal((1, s, 1, d)).astype(np.float32)
    geo = make_geometry(jnp.asarray(q), jnp.asarray(k), block, None)
    got = np.asarray(antidiagonal_block_scores(jnp.asarray(q), jnp.asarray(k), geo, stride))
    m, r = s // stride, block // stride
    want = np.zeros((1, h, s // block, s // block))
    for hh in range(h):
        sc = np.full((m, m), -np.inf)
        for i in range(m):
            for j in range(i + 1):
                sc[i, j] = sum(q[0, i * stride + stride - 1 - t, hh] @ k[0, j * stride + t, 0]
                               for t in range(stride)) / (np.sqrt(d) * stride)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        want[0, hh] = p.reshape(m // r, r, m // r, r).sum(axis=(1, 3))
    np.testing.assert_allclose(got, want, atol=1e-5)


def _qkv(seed, b, s, hq, hkv, d):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, s, hq, d)), jax.random.normal(ks[1], (b, s, hkv, d)),
            jax.random.normal(ks[2], (b, s, hkv, d)))


def test_attend_routes_prefill_through_the_policy():
    q, k, v = _qkv(0, 2, 256, 6, 2, 16)
    policy = sparse.get("streaming", block_size=64, sink=64, local=64)
    spec = AttentionSpec(impl="xla", sparse=sparse.SparseConfig.parse(
        {"min_length": 128, "layers": [{"range": [1, None], "policy": "streaming",
                                        "params": {"block_size": 64, "sink": 64, "local": 64}}]}))
    lengths = jnp.asarray([256, 200])
    out = attend(q, k, v, spec=spec, layer=3, lengths=lengths)
    want = block_sparse_attention(q, k, v, policy.build(q, k, lengths=lengths, min_length=128),
                                  impl="xla")
    np.testing.assert_allclose(out, want, atol=1e-5)
    dense = attend(q, k, v, spec=AttentionSpec(impl="xla"))
    assert float(jnp.abs(out - dense).max()) > 1e-3  # the streaming mask changed the output
    # Dense: layer outside every rule, no layer, too short, or decode / chunk (q_offset).
    np.testing.assert_allclose(attend(q, k, v, spec=spec, layer=0), dense, atol=1e-5)
    np.testing.assert_allclose(attend(q, k, v, spec=spec), dense, atol=1e-5)
    short = AttentionSpec(impl="xla", sparse=dict(min_length=512, policy="streaming"))
    np.testing.assert_allclose(attend(q, k, v, spec=short, layer=3), dense, atol=1e-5)


def test_generate_sparse_batch_equals_alone_and_dense_policy_equals_dense():
    cfg = jp.ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512)
    from flax import nnx

    model = jp.Llama(cfg, rngs=nnx.Rngs(0), attention=AttentionSpec(impl="xla"))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, n).tolist() for n in (300, 190)]
    stream = {"min_length": 128, "policy": "streaming",
              "params": {"block_size": 64, "sink": 64, "local": 64}}
    both = jp.generate(model, None, prompts, max_new_tokens=4, sparse=stream)
    alone = [jp.generate(model, None, [p], max_new_tokens=4, sparse=stream)[0] for p in prompts]
    assert [r.tokens for r in both] == [r.tokens for r in alone]
    assert model.attention.sparse is None  # generate left the model dense
    dense = jp.generate(model, None, prompts, max_new_tokens=4)
    full = jp.generate(model, None, prompts, max_new_tokens=4,
                       sparse={"min_length": 128, "policy": "xattention",
                               "params": {"block_size": 64, "threshold": 1.0}})
    assert [r.tokens for r in full] == [r.tokens for r in dense]


def test_yaml_head_config_is_relative_to_the_yaml(tmp_path, monkeypatch):
    """A relative head_config in a YAML names the file beside it, whatever the working dir."""
    import json

    (tmp_path / "heads.json").write_text(json.dumps({"dense_heads": {"1": [0]}}))
    (tmp_path / "a.yaml").write_text(
        "policy: streaming\nparams: {n_last: 64, head_config: heads.json}\n")
    (tmp_path / "b.yaml").write_text(
        "layers:\n  - {range: [0, 2], policy: dense}\n"
        "  - {policy: streaming, params: {head_config: heads.json}}\n")
    monkeypatch.chdir("/")
    for name in ("a.yaml", "b.yaml"):
        policy = sparse.SparseConfig.parse(str(tmp_path / name)).policy_for(3)
        assert policy.head_config == str(tmp_path / "heads.json")
        assert policy.dense_heads(1, 2) == (0,)


def test_with_estimation_changes_every_layer_policy():
    cfg = sparse.SparseConfig.from_dict({"min_length": 2048, "estimation": "xla", "layers": [
        {"range": [0, 2], "policy": "dense"},
        {"policy": "xattention", "params": {"threshold": 0.8}}]})
    out = cfg.with_estimation(extent="bucket")
    assert out.min_length == 2048 and out.policy_for(0) is None
    pol = out.policy_for(5)
    assert pol.threshold == 0.8 and pol.estimation == sparse.Estimation("xla", extent="bucket")
    assert cfg.policy_for(5).estimation.extent == "full"  # the original is unchanged
    with pytest.raises(ValueError, match="extent"):
        cfg.with_estimation(extent="half")


def test_spec_values_may_be_paths(tmp_path):
    """name:key=value with a path value is a spec, not a YAML file path."""
    head = tmp_path / "heads.json"
    cfg = sparse.SparseConfig.parse(f"streaming:head_config={head},sink=32")
    policy = cfg.rules[0].policy
    assert policy.name == "streaming" and policy.head_config == str(head) and policy.sink == 32
    with pytest.raises(ValueError, match="unknown sparse policy 'nosuch'"):
        sparse.SparseConfig.parse("nosuch:x=1")
    from jaxprefill.sparse.config import names_file
    assert names_file("configs/sparse/smollm2.yaml") and names_file("cfg.yml")
    assert not names_file("xattention") and not names_file(f"minference:head_config={head}")
    assert not names_file("xattention:head_config=h.yaml")
