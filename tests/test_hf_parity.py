"""Logits of `jp.load(hf_dir)` equal transformers' for tiny random models of each family."""

import numpy as np
import pytest
import torch
import transformers

import jaxprefill as jp

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, tie_word_embeddings=False)

CASES = {
    "llama3_rope": (transformers.LlamaConfig, dict(
        rope_theta=50000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0,
                                              original_max_position_embeddings=32))),
    "llama_linear_tied": (transformers.LlamaConfig, dict(
        tie_word_embeddings=True, rope_scaling=dict(rope_type="linear", factor=2.0))),
    "llama_yarn_bias": (transformers.LlamaConfig, dict(
        attention_bias=True, rope_scaling=dict(rope_type="yarn", factor=4.0,
                                               original_max_position_embeddings=64))),
    "qwen2_bias": (transformers.Qwen2Config, dict(rope_theta=1e6)),
    "qwen3_qk_norm": (transformers.Qwen3Config, dict(head_dim=16, num_key_value_heads=4)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=None)),
    "mistral_window": (transformers.MistralConfig, dict(sliding_window=24)),
}


def make_hf_model(tmp_path, case, seed=0, **save_kwargs):
    cls, extra = CASES[case]
    cfg = cls(**{**BASE, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # default init leaves biases/norms trivial; randomize all of them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path, **save_kwargs)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def max_rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    hf = make_hf_model(tmp_path, case)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, BASE["vocab_size"], size=(2, 50)).astype(np.int32)
    model, tokenizer = jp.load(tmp_path)
    assert tokenizer is None  # no tokenizer files saved
    ours = np.asarray(model(tokens))
    ref = hf_logits(hf, tokens)
    assert ours.shape == ref.shape == (2, 50, BASE["vocab_size"])
    assert max_rel_err(ours, ref) < 1e-4


def test_sharded_checkpoint_and_reference_attention(tmp_path):
    """A checkpoint split over several files (with index.json) loads; both attention backends
    give the same logits."""
    hf = make_hf_model(tmp_path, "qwen2_bias", max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    tokens = np.random.default_rng(2).integers(0, BASE["vocab_size"], size=(1, 37)).astype(np.int32)
    ref = hf_logits(hf, tokens)
    for impl in ("auto", "reference"):
        model, _ = jp.load(tmp_path, attention=impl)
        assert max_rel_err(np.asarray(model(tokens)), ref) < 1e-4, impl


def test_bf16_params_close(tmp_path):
    hf = make_hf_model(tmp_path, "llama3_rope")
    tokens = np.random.default_rng(3).integers(0, BASE["vocab_size"], size=(1, 20)).astype(np.int32)
    model, _ = jp.load(tmp_path, dtype="bfloat16")
    assert model.embed[...].dtype == jnp_bf16()
    assert max_rel_err(np.asarray(model(tokens)), hf_logits(hf, tokens)) < 5e-2


def jnp_bf16():
    import jax.numpy as jnp
    return jnp.bfloat16
