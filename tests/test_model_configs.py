"""The DeepSeek-family model YAMLs in configs/models: each loads and validates, agrees with the
published `config.json` (written here in Hugging Face's spelling and read by
`MLAConfig.from_hf_dict`), and gives the published parameter counts when the real `DeepSeek`
module is built abstractly; the tiny one builds a model and runs a forward pass."""

from __future__ import annotations

import math
import os

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxprefill.config import ConfigError, MLAConfig, check_keys
from jaxprefill.models import DeepSeek
from jaxprefill.train import mfu
from jaxprefill.train.config import ModelSection
from jaxprefill.train.model import model_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "models")

# The published config.json fields (Hugging Face spelling) of each checkpoint.
_COMMON = {"kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
           "v_head_dim": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "attention_bias": False, "moe_layer_freq": 1}
HF_CONFIGS = {
    "deepseek-v2-lite": {
        **_COMMON, "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"],
        "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
        "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
        "q_lora_rank": None, "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                         "mscale_all_dim": 0.707},
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "moe_intermediate_size": 1408, "first_k_dense_replace": 1, "routed_scaling_factor": 1.0,
        "scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "norm_topk_prob": False, "bos_token_id": 100000, "eos_token_id": 100001},
    "deepseek-v3": {
        **_COMMON, "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
        "q_lora_rank": 1536, "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "moe_intermediate_size": 2048, "first_k_dense_replace": 3, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "norm_topk_prob": True, "bos_token_id": 0, "eos_token_id": 1,
        "num_nextn_predict_layers": 1},
    "kimi-k2": {
        **_COMMON, "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
        "num_hidden_layers": 61, "num_attention_heads": 64, "num_key_value_heads": 64,
        "q_lora_rank": 1536, "max_position_embeddings": 131072, "rope_theta": 50000.0,
        "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        "n_routed_experts": 384, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "moe_intermediate_size": 2048, "first_k_dense_replace": 1, "routed_scaling_factor": 2.827,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
        "norm_topk_prob": True, "bos_token_id": 163584, "eos_token_id": 163585},
}
# Published sizes (model cards / papers): total and activated parameters. DeepSeek-V3's 671B
# leave out its multi-token-prediction module, as our model does.
PUBLISHED = {"deepseek-v2-lite": (15.7e9, 2.4e9), "deepseek-v3": (671e9, 37e9),
             "kimi-k2": (1.04e12, 32e9)}


def load(name: str) -> MLAConfig:
    return MLAConfig.from_yaml(os.path.join(CONFIG_DIR, f"{name}.yaml"))


def param_count(cfg: MLAConfig) -> int:
    """Parameters of `DeepSeek(cfg)` from abstractly built 1- and 2-layer models (building all 61
    layers of V3 abstractly takes ~20 s): total = base + k dense layers + (L - k) MoE layers."""
    def count(num_layers: int, first_dense: int) -> int:
        c = cfg.replace(num_layers=num_layers, first_k_dense_replace=first_dense)
        st = nnx.state(nnx.eval_shape(lambda: DeepSeek(c, rngs=nnx.Rngs(0))), nnx.Param)
        return sum(x.size for x in jax.tree.leaves(st))

    assert cfg.moe_layer_freq == 1
    one_dense = count(1, 1)
    dense = count(2, 2) - one_dense
    moe = count(2, 1) - one_dense
    k = cfg.first_k_dense_replace
    return one_dense - dense + k * dense + (cfg.num_layers - k) * moe


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_published_config_loads_and_matches_config_json(name):
    cfg = load(name)
    assert cfg == MLAConfig.from_hf_dict(HF_CONFIGS[name])
    assert cfg.latent_dim == 576 and cfg.qk_head_dim == 192
    assert MLAConfig.from_dict(cfg.to_dict()) == cfg
    # the training config resolves the same file by name
    assert model_config(ModelSection(config=name)) == cfg
    # every key in the file is a field (no silently ignored typos)
    with open(os.path.join(CONFIG_DIR, f"{name}.yaml")) as f:
        d = yaml.safe_load(f)
    check_keys({k: v for k, v in d.items() if k != "rope"}, MLAConfig, name)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    cfg = load(name)
    total, active = PUBLISHED[name]
    n = param_count(cfg)
    assert abs(n - total) < 0.015 * total, (name, n / 1e9)
    assert abs(mfu.matmul_params(cfg) - active) < 0.05 * active, (name, mfu.matmul_params(cfg))


def test_softmax_scale_yarn_correction():
    # tau = 192^-0.5 * (0.1 * mscale_all_dim * ln(factor) + 1)^2, from DeepSeek's own code
    assert math.isclose(load("deepseek-v3").softmax_scale,
                        192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel_tol=1e-12)
    assert math.isclose(load("deepseek-v2-lite").softmax_scale,
                        192 ** -0.5 * (0.0707 * math.log(40) + 1) ** 2, rel_tol=1e-12)
    assert math.isclose(load("kimi-k2").softmax_scale,
                        192 ** -0.5 * (0.1 * math.log(32) + 1) ** 2, rel_tol=1e-12)


def test_tiny_config_builds_and_runs_forward():
    cfg = load("deepseek-tiny")
    assert [cfg.is_moe_layer(i) for i in range(cfg.num_layers)] == [False, True, True]
    assert cfg.n_group > 1 and cfg.rope.type == "yarn" and cfg.q_lora_rank
    model = DeepSeek(cfg, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, t: m(t))
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, cfg.vocab_size)
    logits = np.asarray(forward(model, tokens))
    assert logits.shape == (2, 13, cfg.vocab_size)
    assert np.all(np.isfinite(logits)) and np.std(logits) > 0
    # causal: the first 7 positions do not depend on the tokens after them
    other = np.asarray(forward(model, tokens.at[:, 7:].set((tokens[:, 7:] + 1) % cfg.vocab_size)))
    np.testing.assert_allclose(other[:, :7], logits[:, :7], rtol=1e-5, atol=1e-5)
    assert not np.allclose(other[:, 7:], logits[:, 7:])


def test_invalid_configs_are_rejected_with_the_field_named():
    d = load("deepseek-tiny").to_dict()
    with pytest.raises(ConfigError, match="n_group"):
        MLAConfig.from_dict({**d, "n_group": 3})
    with pytest.raises(ConfigError, match="num_expert"):
        MLAConfig.from_dict({**d, "num_expert": 4})
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        MLAConfig.from_dict({**d, "kv_lora_rank": 0})
