"""The training step's pieces: packing isolation, loss masking, accumulation, remat, optimizers,
MFU accounting, export round trip. Small models (1-2 layers, <= 16 tokens) keep compiles short."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprefill as jp
from jaxprefill.config import ModelConfig
from jaxprefill.train import mfu
from jaxprefill.train.config import OptimSection
from jaxprefill.train.export import export_hf, hf_config_dict
from jaxprefill.train.metrics import crc32c
from jaxprefill.train.optimizer import decay_mask, make_optimizer
from jaxprefill.train.step import StepOptions, init_state, make_train_step, merge, token_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=64, tie_word_embeddings=False)


def split(cfg=CFG, seed=0):
    model = jp.Llama(cfg, rngs=nnx.Rngs(seed), attention=jp.AttentionSpec("xla"))
    graphdef, state = nnx.split(model, nnx.Param)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return graphdef, template, nnx.to_pure_dict(state)


def row(*docs, length=16):
    """One packed row [1, length] from documents (lists of ids); the tail is padding (segment 0)."""
    tokens, pos, seg = np.zeros(length, np.int32), np.zeros(length, np.int32), np.zeros(length, np.int32)
    start = 0
    for i, doc in enumerate(docs):
        n = len(doc)
        tokens[start:start + n], pos[start:start + n], seg[start:start + n] = doc, np.arange(n), i + 1
        start += n
    return {"tokens": tokens[None], "positions": pos[None], "segment_ids": seg[None]}


rng = np.random.default_rng(0)
DOC_B = rng.integers(32, 64, 7).tolist()  # ids 32..63 appear only in B
DOC_A = rng.integers(0, 32, 9).tolist()   # ids 0..31 appear only in A


def test_packed_documents_do_not_attend_to_each_other():
    """The loss of document A has exactly zero gradient w.r.t. the embeddings of document B's
    tokens when B precedes A in the same row; without segment ids it is non-zero (control)."""
    graphdef, template, params = split()
    batch = row(DOC_B, DOC_A)
    a_targets = np.zeros((1, 16), bool)
    a_targets[0, 7:15] = True  # positions of A that predict the next A token

    @jax.jit
    def loss_a(params, segment_ids):
        model = merge(graphdef, template, params)
        hidden = model.forward(batch["tokens"], batch["positions"], segment_ids)[0]
        logits = model.logits(hidden)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, jnp.roll(batch["tokens"], -1, 1)[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(a_targets, nll, 0.0))

    g_packed = np.asarray(jax.grad(loss_a)(params, batch["segment_ids"])["embed"])
    g_mixed = np.asarray(jax.grad(loss_a)(params, np.ones((1, 16), np.int32))["embed"])
    # A's last token is only ever a target, never an input, so it gets no embedding gradient
    b_rows, a_rows = sorted(set(DOC_B)), sorted(set(DOC_A[:-1]))
    assert np.all(g_packed[b_rows] == 0.0)
    assert np.all(np.abs(g_packed[a_rows]).sum(-1) > 0)
    assert np.all(np.abs(g_mixed[b_rows]).sum(-1) > 0)  # control: the mask is what isolates


def test_packed_loss_is_sum_of_document_losses():
    """token_losses on [B | A] = loss(B alone) + loss(A alone): positions restart per document and
    no target crosses a document boundary or touches padding."""
    graphdef, template, params = split()
    fn = jax.jit(lambda p, b: token_losses(merge(graphdef, template, p), b, StepOptions()))
    packed, count = fn(params, row(DOC_B, DOC_A))
    loss_b, count_b = fn(params, row(DOC_B))
    loss_a, count_a = fn(params, row(DOC_A))
    assert (float(count), float(count_b), float(count_a)) == (14.0, 6.0, 8.0)
    np.testing.assert_allclose(float(packed), float(loss_b) + float(loss_a), rtol=1e-5)
    assert float(packed) > 0


def test_grad_accumulation_and_remat_match_plain_step():
    graphdef, template, params = split(CFG.replace(num_layers=1))
    opt = OptimSection(lr=1e-3, warmup_steps=0, clip_norm=None)
    tx, lr = make_optimizer(opt, params, 10)
    rows = [row(DOC_B, DOC_A), row(DOC_A, DOC_B), row(DOC_A[:5], DOC_B, DOC_A[5:]), row(DOC_B[::-1], DOC_A)]
    full = {k: np.concatenate([r[k] for r in rows])[None] for k in rows[0]}       # [1, 4, 16]
    accum = {k: v.reshape(2, 2, 16) for k, v in full.items()}                       # [2, 2, 16]
    results = {}
    for name, batch, remat in (("plain", full, "none"), ("accum", accum, "none"), ("remat", full, "full")):
        step = jax.jit(make_train_step(graphdef, template, tx, lr, StepOptions(remat=remat)))
        state, metrics = step(init_state(params, tx, 0), batch)
        results[name] = (jax.device_get(state["params"]), jax.device_get(metrics))
    p0, m0 = results["plain"]
    for name in ("accum", "remat"):
        p, m = results[name]
        np.testing.assert_allclose(m["loss"], m0["loss"], rtol=1e-6)
        np.testing.assert_allclose(m["grad_norm"], m0["grad_norm"], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p0)):
            np.testing.assert_allclose(a, b, atol=1e-6)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(params)))
    assert moved > 1e-4  # the step did update the parameters


def test_weight_decay_mask_skips_norms_biases_embeddings():
    cfg = CFG.replace(qkv_bias=True, o_bias=True, mlp_bias=True, qk_norm=True)
    _, _, params = split(cfg)
    mask = decay_mask(params)
    layer = mask["layers"][0]
    assert mask["embed"] is False and mask["lm_head"] is True and mask["norm"]["scale"] is False
    assert all(layer["attn"][k] is True for k in ("q", "k", "v", "o"))
    assert all(layer["attn"][k] is False for k in ("q_bias", "k_bias", "v_bias", "o_bias"))
    assert layer["attn"]["q_norm"]["scale"] is False and layer["attn_norm"]["scale"] is False
    assert all(layer["mlp"][k] is True for k in ("gate", "up", "down"))
    assert all(layer["mlp"][k] is False for k in ("gate_bias", "up_bias", "down_bias"))
    assert decay_mask(params, decay_embeddings=True)["embed"] is True


def test_muon_step_lowers_loss():
    graphdef, template, params = split(CFG.replace(num_layers=1))
    opt = OptimSection(name="muon", lr=2e-2, warmup_steps=0)
    tx, lr = make_optimizer(opt, params, 10)
    step = jax.jit(make_train_step(graphdef, template, tx, lr, StepOptions()))
    batch = {k: v[None] for k, v in row(DOC_B, DOC_A).items()}
    state = init_state(params, tx, 0)
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses


def test_flops_per_token_counts_the_model():
    _, _, params = split()
    n = sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(params)
            if getattr(path[-1], "key", None) not in ("scale", "embed"))  # untied: lm_head counted
    assert mfu.matmul_params(CFG) == n
    s = 16
    attn = CFG.num_layers * 2 * (s + 1) * CFG.num_heads * CFG.head_dim
    assert mfu.flops_per_token(CFG, s) == 3 * (2 * n + attn)
    tied = CFG.replace(tie_word_embeddings=True)  # the embedding doubles as the output layer
    assert mfu.matmul_params(tied) == n

    class Dev:
        def __init__(self, kind):
            self.device_kind = kind

    assert mfu.peak_flops(Dev("NVIDIA H100 80GB HBM3")) == 989e12
    assert mfu.peak_flops(Dev("NVIDIA H100 PCIe")) == 756e12
    assert mfu.peak_flops(Dev("TPU v5 lite")) == 197e12
    assert mfu.peak_flops(Dev("cpu")) is None
    assert mfu.mfu(1000.0, CFG, s, 2, 1e12) == pytest.approx(1000.0 * mfu.flops_per_token(CFG, s) / 2e12)


def test_export_round_trips_through_load(tmp_path):
    cfg = CFG.replace(model_type="qwen2", qkv_bias=True, rope=jp.RopeConfig(theta=5e4, original_max_position_embeddings=64),
                      eos_token_ids=(3,), bos_token_id=1)
    model = jp.Llama(cfg, rngs=nnx.Rngs(1))
    out = export_hf(model, str(tmp_path / "export"))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    loaded, tokenizer = jp.load(out)
    assert tokenizer is None and loaded.config == cfg
    tokens = np.random.default_rng(1).integers(0, 64, (2, 12)).astype(np.int32)
    forward = nnx.jit(lambda m, t: m(t))  # one compile for both (same graph), not op by op
    ref, got = np.asarray(forward(model, tokens)), np.asarray(forward(loaded, tokens))
    assert np.max(np.abs(ref)) > 1e-3
    np.testing.assert_array_equal(got, ref)  # float32 export: the same weights, bit for bit


def test_export_writes_the_tokenizer(tmp_path):
    from jaxprefill.loading.gguf_reader import bundled_gguf_path
    from jaxprefill.loading.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_gguf(bundled_gguf_path())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = export_hf(jp.Llama(CFG, rngs=nnx.Rngs(0)), str(tmp_path / "x"), tokenizer=tok)
    back = Tokenizer.from_hf_dir(out)
    text = "def f(x):\n    return x ** 2  # héllo"
    assert back.encode(text) == tok.encode(text) and len(tok.encode(text)) > 5
    assert (back.bos_token_id, back.eos_token_ids) == (tok.bos_token_id, tok.eos_token_ids)


@pytest.mark.parametrize("name", ["tiny-llama", "smollm2-135m", "llama-3.1-8b", "qwen2.5-7b"])
def test_hf_config_round_trip(name):
    cfg = ModelConfig.from_yaml(os.path.join(ROOT, "configs", "models", f"{name}.yaml"))
    assert ModelConfig.from_hf_dict(hf_config_dict(cfg)) == cfg


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_remat_applies_a_sparse_policy_per_layer():
    """The remat path calls every layer with the arguments `forward` gives it: a policy on
    layer 1 only changes the hidden states the same way with and without remat."""
    from jaxprefill import sparse
    from jaxprefill.train.step import hidden_states

    cfg = CFG.replace(max_position_embeddings=512)
    policy = sparse.SparseConfig.parse(
        {"min_length": 64, "layers": [{"range": [1, None], "policy": "streaming",
                                       "params": {"block_size": 32, "sink": 32, "local": 32}}]})
    tokens = jax.random.randint(jax.random.key(1), (2, 256), 0, cfg.vocab_size)
    out = {}
    for name, spec in (("dense", jp.AttentionSpec("xla")),
                       ("sparse", jp.AttentionSpec("xla", sparse=policy))):
        model = jp.Llama(cfg, rngs=nnx.Rngs(0), attention=spec)
        for remat in ("none", "full"):
            out[name, remat] = np.asarray(hidden_states(model, tokens, None, None, remat))
    np.testing.assert_allclose(out["sparse", "full"], out["sparse", "none"], atol=1e-5)
    np.testing.assert_allclose(out["dense", "full"], out["dense", "none"], atol=1e-5)
    assert np.abs(out["sparse", "none"] - out["dense", "none"]).max() > 1e-3
