"""Engine sparse prefill: per-chunk policy layouts (q_offset) and prepacked rows (segment ids)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprefill as jp
from jaxprefill.attention import AttentionSpec, dispatch
from jaxprefill.sparse import prefill as sparse_rows
from jaxprefill.config import ConfigError
from jaxprefill.infer import Engine, EngineConfig
from jaxprefill.infer.config import InferConfig
from jaxprefill.infer.scheduler import pack_rows
from jaxprefill.sparse import SparseConfig
from pallas_kernels import BlockSparseLayout

LENGTHS = [150, 40, 70, 9, 20, 33]  # 150, 70: chunked (64-token chunks); 40, 33: alone; 9 + 20 packed


def streaming(local: int) -> dict:
    return {"min_length": 32, "policy": "streaming",
            "params": {"block_size": 16, "sink": 16, "local": local}}


def peaked_tiny_llama():
    """A tiny Llama whose attention is peaked (weights x6 over the 0.02 init), so a sparse
    mask changes its output."""
    cfg = jp.ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         max_position_embeddings=512, eos_token_ids=(0,))
    m = jp.Llama(cfg, rngs=nnx.Rngs(0), attention=AttentionSpec(impl="xla"))
    for _, p in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        if p[...].ndim >= 2:
            p[...] = p[...] * 6.0
    return m


@pytest.fixture(scope="module")
def model():
    return peaked_tiny_llama()


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(1, 97, n).tolist() for n in LENGTHS]


def run(model, prompts, sparse, max_new=5):
    config = EngineConfig(max_batch=3, prefill_tokens=64, prefill_rows=2, page_size=16,
                          num_pages=64, max_new_tokens=max_new, bucket=256, chat=False,
                          sparse=sparse)
    engine = Engine(model, None, config)
    return [r.tokens for r in engine.generate(prompts)], engine


def count_layout_calls(monkeypatch) -> dict:
    """Counts (at trace time) the chunk / packed sparse layouts the engine builds, and the
    whole-prompt ("prompt") calls of rows holding one prompt each (steps.prefill_single)."""
    calls = {"chunk": 0, "packed": 0, "prompt": 0}
    chunk, packed = sparse_rows.chunk_layout, sparse_rows.packed_layout
    classify = dispatch.sparse_call

    def sparse_call(*a, **kw):
        call = classify(*a, **kw)
        calls["prompt"] += call is not None and call.kind == "prompt"
        return call
    monkeypatch.setattr(dispatch, "sparse_call", sparse_call)

    def count(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped
    monkeypatch.setattr(sparse_rows, "chunk_layout", count("chunk", chunk))
    monkeypatch.setattr(sparse_rows, "packed_layout", count("packed", packed))
    return calls


def test_sparse_engine_paths(model, prompts, monkeypatch):
    """(a) a streaming window covering every prompt is dense: engine output == dense engine;
    (b) a narrow window: chunks start on block boundaries, so each chunk's rows are the
    whole-prompt layout's rows and the engine's greedy tokens equal jp.generate with the same
    policy (prepacked rows: prompts >= min_length alone in a row get the policy too)."""
    calls = count_layout_calls(monkeypatch)
    wide, _ = run(model, prompts, streaming(local=1024))
    assert calls["chunk"] > 0 and calls["packed"] + calls["prompt"] > 0  # sparse really ran
    dense, _ = run(model, prompts, None)
    assert wide == dense
    narrow, engine = run(model, prompts, streaming(local=32))
    assert engine.stats["chunk_rows"] >= 4
    want = jp.generate(model, None, prompts, max_new_tokens=5, sparse=streaming(local=32))
    assert narrow == [r.tokens for r in want]
    assert narrow != dense  # the narrow window changed some completion


def layer0_qk(model, ids):
    """Post-RoPE q [1, S, Hq, D], k [1, S, Hkv, D] of layer 0 for one prompt."""
    from jaxprefill.models.layers import rope_cos_sin

    tokens = jnp.asarray([ids], jnp.int32)
    pos = jnp.arange(len(ids), dtype=jnp.int32)[None]
    inv_freq, scale = model.rope
    cos, sin = rope_cos_sin(pos, jnp.asarray(inv_freq), scale)
    x = jnp.take(model.embed[...], tokens, axis=0)
    layer = model.layers[0]
    q, k, _ = layer.attn.project(layer.attn_norm(x), cos, sin)
    return q, k


def test_chunk_layout_is_what_the_policy_builds(model, monkeypatch):
    """The layout the engine uses for a chunk (layer 0) equals building the policy directly for
    the prompt truncated at the chunk's end (queries of earlier chunks: zeros, not cached)."""
    seen = []
    original = sparse_rows.chunk_layout

    def record(policy, q, k, q_offset, q_lengths, min_length, layer=0):
        layout = original(policy, q, k, q_offset, q_lengths, min_length, layer)
        if layer == 0:
            jax.debug.callback(lambda *a: seen.append([np.asarray(x) for x in a]),
                               q_offset, q_lengths, layout.kv_idx, layout.kv_cnt)
        return layout
    monkeypatch.setattr(sparse_rows, "chunk_layout", record)
    ids = np.random.default_rng(5).integers(1, 97, 181).tolist()
    sparse = {"min_length": 32, "policy": "xattention",
              "params": {"block_size": 16, "threshold": 0.6, "stride": 4, "n_last": 0}}
    run(model, [ids], sparse, max_new=2)
    jax.effects_barrier()
    assert [int(s[0][0]) for s in seen] == [0, 64, 128]  # three chunks of 64, 64, 53 queries
    q, k = layer0_qk(model, ids)
    policy = SparseConfig.parse(sparse).policy_for(0)
    offset, n_valid, kv_idx, kv_cnt = seen[-1]  # the last chunk: 53 queries after 128
    start, end = int(offset[0]), int(offset[0]) + int(n_valid[0])
    q_ext = jnp.zeros_like(q[:, :end]).at[:, start:end].set(q[:, start:end])
    direct = jax.jit(lambda q, k: policy.build(q, k, layer=0, min_length=32).to_block_mask())(
        q_ext, k[:, :end])
    got = BlockSparseLayout(kv_idx, kv_cnt, 16, 16, kv_idx.shape[-1])
    got = np.asarray(got.to_block_mask())[0, :, : -(-(end - start) // 16)]
    rows = np.asarray(direct)[0, :, start // 16:]
    np.testing.assert_array_equal(got[..., : rows.shape[-1]], rows)
    assert not got[..., rows.shape[-1]:].any()  # nothing past the chunk's end
    causal = sum(r + 1 for r in range(start // 16, rows.shape[-1])) * rows.shape[0]
    assert rows.sum() / causal < 0.9  # a real sparse layout, not dense in disguise


def test_packed_layout_single_document_rows_only():
    """Rows holding one document (from token 0) get the policy; packed rows stay structured."""
    policy = SparseConfig.parse(streaming(local=16)).policy_for(0)
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((3, 96, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 96, 2, 8)), jnp.float32)
    seg = np.zeros((3, 96), np.int32)
    seg[0, :90] = 1                          # one document of 90 tokens + padding
    seg[1, :40], seg[1, 40:80] = 1, 2        # two documents
    seg[2, :] = 1                            # one document filling the row
    mask = np.asarray(jax.jit(lambda q, k, seg: sparse_rows.packed_layout(
        policy, q, k, seg, min_length=32).to_block_mask())(q, k, jnp.asarray(seg)))
    want = np.asarray(jax.jit(lambda q, k: policy.build(
        q, k, lengths=jnp.asarray([90, 96, 96])).to_block_mask())(q, k))
    np.testing.assert_array_equal(mask[[0, 2]], want[[0, 2]])
    i, j = np.arange(6)[:, None], np.arange(6)[None]
    # row 1: blocks of doc 1 (0..2) and doc 2 (2..4), block 5 is padding (segment 0 only)
    expect = (j <= i) & (((i <= 2) & (j <= 2)) | ((i >= 2) & (i <= 4) & (j >= 2)) | (i == 5) & (j == 5))
    np.testing.assert_array_equal(mask[1, 0], expect)


def test_pack_rows_alone_from():
    rows = pack_rows([40, 9, 20, 33], width=64, max_rows=4, alone_from=32)
    assert rows == [[0], [3], [2, 1]]


def test_engine_config_sparse_from_yaml_and_errors(tmp_path):
    path = tmp_path / "infer.yaml"
    path.write_text("model: x\nengine:\n  prefill_tokens: 256\n  sparse:\n    policy: streaming\n"
                    "    min_length: 1024\n    params: {block_size: 64, local: 512}\n")
    cfg = InferConfig.from_yaml(path)
    assert isinstance(cfg.engine.sparse, SparseConfig)
    assert cfg.engine.sparse.min_length == 1024
    assert cfg.engine.sparse.policy_for(0).local == 512
    with pytest.raises(ConfigError, match="multiples of the sparse policy's block_size"):
        EngineConfig(prefill_tokens=96, sparse={"policy": "streaming"})
    with pytest.raises(ConfigError, match="sparse"):
        EngineConfig(sparse={"policy": "no-such-policy"})


def test_chunk_attention_with_columns_equals_whole_prompt_rows():
    """A chunk at a q_offset, with a policy that lists key columns (minference's vertical lines),
    computes exactly the rows of sparse attention over the prompt truncated at the chunk's end
    (the layout the policy builds there, earlier queries zero), columns included."""
    from pallas_kernels import block_sparse_attention

    params = {"block_size": 16, "vertical": 40, "slash": 4, "last_q": 16, "force_vertical": 1,
              "force_slash": 2, "n_last": 0}
    cfg = SparseConfig.parse({"policy": "minference", "min_length": 64, "kernel": "xla",
                              "params": params})
    policy = cfg.policy_for(0)
    rng = np.random.default_rng(0)
    s, c, start = 512, 64, 384
    q, k, v = (jnp.asarray(rng.standard_normal((1, s, h, 16)), jnp.float32) for h in (4, 2, 2))
    end, qc, offset = start + c - 9, q[:, start:start + c], jnp.asarray([start])  # 9 padding queries
    layout = jax.jit(lambda q, k: sparse_rows.chunk_layout(
        policy, q, k, offset, jnp.asarray([c - 9]), 64, 0))(qc, k)
    q_ext = jnp.zeros_like(q[:, :end]).at[:, start:end].set(q[:, start:end])
    direct = jax.jit(lambda q, k: policy.build(q, k, layer=0, min_length=64))(q_ext, k[:, :end])
    assert direct.col_idx is not None and layout.col_idx is not None
    cols = np.asarray(direct.column_mask(end))[0, :, start // 16:]
    assert cols.sum() > 0  # some query blocks really use single columns
    np.testing.assert_array_equal(np.asarray(layout.column_mask(s))[0, :, :, :end], cols)
    want = block_sparse_attention(q_ext, k[:, :end], v[:, :end], direct, causal=True,
                                  sm_scale=0.25, impl="reference")[:, start:end]
    got = jax.jit(lambda q, k, v: dispatch.attend(
        q, k, v, q_offset=offset, sm_scale=0.25, spec=AttentionSpec("reference", cfg), layer=0,
        lengths=jnp.asarray([c - 9])))(qc, k, v)
    got = got[:, : end - start]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_engine_rows_with_key_columns_equal_generate(model, prompts, monkeypatch):
    """Prompts alone in a row (no chunks) under a block policy with key columns: the engine's
    greedy tokens equal jp.generate's with the same policy, and the columns were attached."""
    from jaxprefill.sparse import base

    attached = []
    attach = base.attach_columns
    monkeypatch.setattr(base, "attach_columns",
                        lambda *a, **kw: attached.append(1) or attach(*a, **kw))
    cfg = {"min_length": 32, "policy": "xattention",
           "params": {"block_size": 16, "threshold": 0.3, "stride": 4, "n_last": 0,
                      "key_columns": 4}}
    short = [p for p in prompts if 32 <= len(p) <= 64]  # 40 and 33 tokens: one row each
    got, engine = run(model, short, cfg)
    assert engine.stats["chunk_rows"] == 0 and attached
    want = jp.generate(model, None, short, max_new_tokens=5, sparse=cfg)
    assert got == [r.tokens for r in want]
