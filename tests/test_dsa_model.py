"""DeepSeek-V3.2 (DSA) on our MLA + MoE model: config and hub weights, logits equal
transformers' `DeepseekV32ForCausalLM` where the top-k changes the output (k < sequence
length, a ragged batch), the paged cache (latent + index-key pages: prefill, sparse decode,
chunk continuation) against one full forward, and the engine against `jp.generate`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

import jaxprefill as jp
from jaxprefill.config import ConfigError, MLAConfig, config_from_hf_dict
from jaxprefill.infer import Engine, EngineConfig, Request
from jaxprefill.loading.deepseek_weights import build_deepseek, deepseek_to_hf_tensors
from jaxprefill.loading.safetensors_io import SafetensorsCheckpoint
from jaxprefill.mla.dsa_cache import PagedDSACache
from jaxprefill.train.model import model_class
from jaxprefill.validate import InputError
from jaxprefill.models.dsa import DSACache, DSAOptions, DeepSeekV32
from tests.dsa_tiny import tiny_v32
from tests.model_steps import cached_step

VOCAB = 131
TOPK = 8
HF = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
          num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
          qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=512, n_routed_experts=8,
          n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1, q_lora_rank=24,
          n_group=4, topk_group=2, routed_scaling_factor=2.5, index_topk=TOPK,
          index_head_dim=16, index_n_heads=8,
          rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                               original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                               mscale=1.0, mscale_all_dim=1.0))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny DeepseekV32ForCausalLM saved in the hub layout, and the torch model."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV32Config(**HF),
                                                          dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # routers start at zero: make routing decisive so float rounding cannot flip choices
            p.add_((0.5 if name.endswith("mlp.gate.weight") else 0.05) * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    path = tmp_path_factory.mktemp("dsv32")
    model.save_pretrained(path)
    return path, model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens)[None])).logits[0].float().numpy()


def jit_logits(model, tokens):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, jnp.asarray(tokens)))


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def test_logits_match_transformers_ragged_batch_where_topk_matters(hf_dir):
    path, hf = hf_dir
    model, _ = jp.load(path)
    assert isinstance(model, DeepSeekV32) and model.config.index_topk == TOPK
    rng = np.random.default_rng(1)
    lengths = (37, 23)  # right-padded rows of one batch, both longer than k = 8
    tokens = np.zeros((2, 37), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(0, VOCAB, n)
    ours = jit_logits(model, tokens)
    refs = [hf_logits(hf, tokens[b, :n]) for b, n in enumerate(lengths)]
    for b, n in enumerate(lengths):
        assert rel(ours[b, :n], refs[b]) < 1e-4
    # the top-k matters: attending to every earlier token gives other logits
    dense = build_deepseek(model.config.replace(index_topk=64), SafetensorsCheckpoint(path))
    assert rel(jit_logits(dense, tokens)[0], refs[0]) > 1e-2
    # a prompt of at most k tokens takes the dense path: the same as transformers' top-k of all
    short = tokens[1, :TOPK]
    assert rel(jit_logits(model, short[None])[0], hf_logits(hf, short)) < 1e-4


def test_paged_cache_prefill_sparse_decode_and_chunk_match_full_forward(hf_dir):
    model, _ = jp.load(hf_dir[0])
    model.decode_impl = "reference"
    run = cached_step(model)

    b, s0, total = 2, 30, 38
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, VOCAB, (b, total)), jnp.int32)
    full = jit_logits(model, tokens)
    cache = DSACache.zeros(model.config, b, 128)  # 128 cached positions > k: sparse decode
    assert cache.index_pages[0].shape == (b * 2, 64, 16)
    logits, cache = run(tokens[:, :s0], cache, None)
    got = [np.asarray(logits)]
    for t in range(s0, total - 4):  # one token per step: index keys and latent from the pages
        logits, cache = run(tokens[:, t:t + 1], cache, jnp.full((b,), t, jnp.int32))
        got.append(np.asarray(logits))
    logits, cache = run(tokens[:, total - 4:], cache, jnp.full((b,), total - 4, jnp.int32))
    got.append(np.asarray(logits))
    assert rel(np.concatenate(got, axis=1), full) < 1e-4
    # the cache holds each token's index key (what the indexer scores decode queries against)
    @nnx.jit
    def index_keys(model, tokens):
        x = model.layers[0].attn_norm(jnp.take(model.embed[...], tokens, axis=0))
        cos_sin = model.rope_tables(jnp.broadcast_to(jnp.arange(total), (b, total)))
        return model.layers[0].attn.indexer.keys(x, *cos_sin)

    keys = index_keys(model, tokens)
    cached = np.asarray(cache.index_pages[0][cache.page_table]).reshape(b, -1, 16)
    assert rel(cached[:, :total], np.asarray(keys)) < 1e-5


def test_engine_equals_generate():
    model = tiny_v32()
    rng = np.random.default_rng(4)
    # 64-token prefill rows, 16-token pages: 70 is chunked, 5 + 33 pack into a row; every
    # call sees more than k = 12 keys (sparse prefill, chunks and decode); page tables of 128
    # tokens throughout (bucket), so each step compiles once
    prompts = [rng.integers(1, 97, n).tolist() for n in (70, 5, 33)]
    config = EngineConfig(max_batch=2, prefill_tokens=64, prefill_rows=2, page_size=16,
                          num_pages=40, max_new_tokens=4, bucket=128, chat=False)
    engine = Engine(model, None, config)
    assert isinstance(engine.cache, PagedDSACache)
    assert engine.cache.index_pages[0].shape == (40, 16, 16)
    results = engine.generate([Request(id=str(i), prompt=p) for i, p in enumerate(prompts)])
    assert engine.stats["packed_rows"] > 0 and engine.stats["chunk_rows"] > 0
    assert engine.allocator.num_free == 39
    want = jp.generate(model, None, prompts, max_new_tokens=4)
    assert [r.tokens for r in results] == [w.tokens for w in want]


# the published config.json of deepseek-ai/DeepSeek-V3.2-Exp (Hugging Face spelling)
V32_CONFIG_JSON = {
    "model_type": "deepseek_v32", "architectures": ["DeepseekV32ForCausalLM"],
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "moe_intermediate_size": 2048, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "n_group": 8, "topk_group": 4, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 0,
    "eos_token_id": 1, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048,
    "num_nextn_predict_layers": 1}


def test_v32_config_yaml_and_errors():
    cfg = MLAConfig.from_yaml("configs/models/deepseek-v3.2.yaml")
    assert cfg == config_from_hf_dict(V32_CONFIG_JSON)
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (64, 128, 2048)
    assert cfg.has_indexer and cfg.rope_interleave and cfg.latent_dim == 576
    d = cfg.to_dict()
    with pytest.raises(ConfigError, match="deepseek_v32 fields"):
        MLAConfig.from_dict({**d, "model_type": "deepseek_v3"})
    with pytest.raises(ConfigError, match="index_head_dim must be a power of two"):
        MLAConfig.from_dict({**d, "index_head_dim": 96})
    with pytest.raises(ConfigError, match="index_topk"):
        MLAConfig.from_dict({**d, "index_topk": 0})
    with pytest.raises(ConfigError, match="q_lora_rank"):
        MLAConfig.from_dict({**d, "q_lora_rank": None})
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        config_from_hf_dict({**V32_CONFIG_JSON, "mlp_layer_types": ["sparse"] * 61})
    with pytest.raises(ConfigError, match="deepseek_v32"):  # no from-scratch training
        model_class(cfg)


def test_indexer_tensors_round_trip_and_a_missing_one_is_named(hf_dir, tmp_path):
    path = hf_dir[0]
    model, _ = jp.load(path)
    tensors = deepseek_to_hf_tensors(model)
    assert tensors["model.layers.1.self_attn.indexer.wq_b.weight"].shape == (8 * 16, 24)
    assert tensors["model.layers.0.self_attn.indexer.weights_proj.weight"].shape == (8, 48)
    del tensors["model.layers.1.self_attn.indexer.k_norm.bias"]
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file({k: torch.from_numpy(v.copy()) for k, v in tensors.items()},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(jp.WeightError, match="indexer.k_norm.bias"):
        jp.load(tmp_path)
    assert json.loads((path / "config.json").read_text())["model_type"] == "deepseek_v32"


def test_load_takes_dsa_options_and_refuses_bad_ones(hf_dir, tmp_path):
    path = hf_dir[0]
    model, _ = jp.load(path, dsa={"fp8": True, "index_impl": "xla"})
    assert model.dsa == DSAOptions(index_impl="xla", fp8=True)
    assert model.cache_options == {"index_fp8": True}
    for bad, msg in (({"fp9": True}, r"dsa: unknown key\(s\) \['fp9'\] in dsa options"),
                     ({"index_impl": "cuda"}, "dsa: dsa index_impl must be one of"),
                     ({"fp8": "yes"}, "dsa: dsa fp8 must be true or false"),
                     ("fp8", "dsa: dsa options must be a mapping")):
        with pytest.raises(InputError, match=msg) as err:
            jp.load(path, dsa=bad)
        assert "\n" not in str(err.value)
    # a DeepSeek-V3 config over the same weights: no indexer, so no DSA options
    cfg = json.loads((path / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("index_")}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v3"}))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(InputError, match="dsa options are for DeepSeek-V3.2"):
        jp.load(tmp_path, dsa={"fp8": True})
