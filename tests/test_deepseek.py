"""DeepSeek-V2/V3/Kimi-K2 (MLA + MoE): logits equal transformers', latent cache + absorbed decode.

Tiny random configs covering: q_lora and plain q_proj (V2-Lite), YaRN with mscale (the m^2
softmax-scale correction), interleaved and rotate-half RoPE, softmax greedy / group-limited and
sigmoid + bias grouped routing, shared experts, a dense first layer, hub and fused expert layouts.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

import jaxprefill as jp
from flax import nnx
from jaxprefill.config import ConfigError, MLAConfig, config_from_hf_dict
from jaxprefill.models.deepseek import DeepSeek, MLACache
from tests.model_steps import cached_step

VOCAB = 131
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
            num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=512, rms_norm_eps=1e-6,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1,
            tie_word_embeddings=False)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=64,
            beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
YARN_V2 = dict(YARN, mscale=0.707, mscale_all_dim=0.707, factor=40.0)

CASES = {
    "v3_qlora_yarn_groups": (transformers.DeepseekV3Config, dict(
        q_lora_rank=24, n_group=4, topk_group=2, rope_parameters=YARN, routed_scaling_factor=2.5)),
    "v3_rotate_half_no_groups": (transformers.DeepseekV3Config, dict(
        q_lora_rank=24, n_group=1, topk_group=1, rope_interleave=False,
        rope_parameters=dict(rope_type="default", rope_theta=50000.0))),
    "v2_lite_qproj_yarn": (transformers.DeepseekV2Config, dict(
        q_lora_rank=None, topk_method="greedy", rope_parameters=YARN_V2, routed_scaling_factor=1.0)),
    "v2_group_limited": (transformers.DeepseekV2Config, dict(
        q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        rope_parameters=YARN, routed_scaling_factor=16.0, first_k_dense_replace=0)),
}


def make_hf(case, seed=0, **overrides):
    cls, extra = CASES[case]
    cfg = cls(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # routers start at zero: make routing decisive so float rounding cannot flip choices
            p.add_((0.5 if name.endswith("mlp.gate.weight") else 0.05) * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def jit_logits(model, tokens):
    """model(tokens) under one jit (op-by-op eager compiles are slow on CPU)."""
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, jnp.asarray(tokens)))


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


TOKENS = np.random.default_rng(1).integers(0, VOCAB, size=(2, 37)).astype(np.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    hf = make_hf(case)
    hf.save_pretrained(tmp_path)
    model, tok = jp.load(tmp_path)
    assert isinstance(model, DeepSeek) and tok is None
    ref = hf_logits(hf, TOKENS)
    assert rel(jit_logits(model, TOKENS), ref) < 1e-4
    if case == "v2_lite_qproj_yarn":  # the reference backend of the same dispatch point agrees
        model_ref, _ = jp.load(tmp_path, attention="reference")
        assert rel(jit_logits(model_ref, TOKENS), ref) < 1e-4


def test_softmax_scale_uses_mscale_squared():
    cfg = config_from_hf_dict({**BASE, **CASES["v2_lite_qproj_yarn"][1], "model_type": "deepseek_v2"})
    m = 0.1 * 0.707 * np.log(40.0) + 1
    assert cfg.softmax_scale == pytest.approx(24 ** -0.5 * m * m)
    # DeepSeek-V3's published numbers: tau = m^2 / sqrt(192) = 0.13523 for factor 40, mscale 1
    v3 = MLAConfig(model_type="deepseek_v3", vocab_size=8, hidden_size=8, intermediate_size=8,
                   num_layers=1, num_heads=1, kv_lora_rank=512, qk_nope_head_dim=128,
                   qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
                   rope=jp.RopeConfig(type="yarn", factor=40.0, mscale=1.0, mscale_all_dim=1.0,
                                      original_max_position_embeddings=4096))
    assert v3.softmax_scale == pytest.approx(0.13523, abs=1e-5)


def test_kimi_k2_type_and_fused_expert_layout(tmp_path):
    """model_type kimi_k2 loads as the V3 architecture; transformers 5's fused expert tensors
    (gate_up_proj [N, 2F, E], down_proj [N, E, F]) load like the hub layout."""
    hf = make_hf("v3_qlora_yarn_groups", seed=3)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "kimi_k2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    model, _ = jp.load(tmp_path)
    assert model.config.model_type == "kimi_k2" and model.config.scoring_func == "sigmoid"
    assert rel(jit_logits(model, TOKENS), hf_logits(hf, TOKENS)) < 1e-4


def test_missing_expert_tensor_is_named(tmp_path):
    from jaxprefill.loading.deepseek_weights import deepseek_to_hf_tensors
    hf = make_hf("v2_group_limited")
    hf.save_pretrained(tmp_path)
    model, _ = jp.load(tmp_path)
    tensors = deepseek_to_hf_tensors(model)  # our export, hub layout, minus one expert
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    save_file({k: torch.from_numpy(v.copy()) for k, v in tensors.items()},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(jp.WeightError, match="experts.5.up_proj"):
        jp.load(tmp_path)


def test_bad_mla_config_is_a_clear_error():
    d = {**BASE, **CASES["v3_qlora_yarn_groups"][1], "model_type": "deepseek_v3", "n_group": 3}
    with pytest.raises(ConfigError, match="n_group"):
        config_from_hf_dict(d)
    with pytest.raises(ConfigError, match="MLA"):
        jp.ModelConfig.from_hf_dict({**d, "n_group": 4})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dsv3")
    make_hf("v3_qlora_yarn_groups", seed=7, num_hidden_layers=2).save_pretrained(path)
    return path


def test_latent_cache_prefill_then_absorbed_decode_matches_full_forward(tiny_dir):
    """Prefill writes only the latent (576-style) cache; absorbed decode steps and chunked
    continuation reproduce the logits of one full forward."""
    model, _ = jp.load(tiny_dir)
    model.decode_impl = "reference"
    cfg = model.config
    step = cached_step(model)

    b, s0, total = 2, 61, 69  # the prompt crosses no page; decode crosses into page 2
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, VOCAB, (b, total)), jnp.int32)
    full = jit_logits(model, tokens)
    cache = MLACache.zeros(cfg, b, 64 * 2)
    assert cache.pages[0].shape == (b * 2, 64, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    logits, cache = step(tokens[:, :s0], cache, None)
    got = [np.asarray(logits)]
    for t in range(s0, total - 3):  # single-token absorbed decode
        logits, cache = step(tokens[:, t:t + 1], cache, jnp.full((b,), t, jnp.int32))
        got.append(np.asarray(logits))
    # a 3-token chunk continues through the decompressed path
    logits, cache = step(tokens[:, total - 3:], cache, jnp.full((b,), total - 3, jnp.int32))
    got.append(np.asarray(logits))
    assert rel(np.concatenate(got, axis=1), full) < 1e-4
    # the cache holds exactly the latent of every token (written, never decompressed K/V)
    lat = model.layers[0].attn.latent(
        model.layers[0].attn_norm(jnp.take(model.embed[...], tokens, axis=0)),
        *model.rope_tables(jnp.broadcast_to(jnp.arange(total), (b, total))))
    cached = np.asarray(cache.pages[0][cache.page_table]).reshape(b, -1, cache.pages[0].shape[-1])
    assert rel(cached[:, :total], np.asarray(lat)) < 1e-5


def test_generate_absorbed_equals_decompressed_greedy(tiny_dir):
    absorbed, _ = jp.load(tiny_dir)
    absorbed.decode_impl = "reference"
    decompressed, _ = jp.load(tiny_dir)
    decompressed.absorb = False
    prompts = [[5, 9, 17, 3, 8, 21, 2], [7, 1, 100, 44]]
    a = jp.generate(absorbed, None, prompts, max_new_tokens=12, eos_token_ids=[])
    d = jp.generate(decompressed, None, prompts, max_new_tokens=12, eos_token_ids=[])
    assert [r.tokens for r in a] == [r.tokens for r in d]
    assert all(len(r.tokens) == 12 for r in a)
