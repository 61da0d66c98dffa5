"""ModelConfig from config.json dicts (transformers 4 and 5 spellings), YAML, and bad input."""

import json

import pytest
import yaml

from jaxprefill.config import ConfigError, ModelConfig

LLAMA31 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "eos_token_id": [128001, 128008, 128009],
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_llama31_transformers4_spelling():
    cfg = ModelConfig.from_hf_dict(LLAMA31)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 32, 8, 128)
    assert cfg.group_size == 4
    assert cfg.rope.type == "llama3" and cfg.rope.theta == 500000.0 and cfg.rope.factor == 8.0
    assert cfg.rope.original_max_position_embeddings == 8192
    assert cfg.eos_token_ids == (128001, 128008, 128009)
    assert not cfg.qkv_bias and not cfg.qk_norm


def test_transformers5_rope_parameters_spelling_is_equivalent():
    d = {k: v for k, v in LLAMA31.items() if k not in ("rope_theta", "rope_scaling")}
    d["rope_parameters"] = {**LLAMA31["rope_scaling"], "rope_theta": 500000.0}
    assert ModelConfig.from_hf_dict(d) == ModelConfig.from_hf_dict(LLAMA31)


def test_family_flags():
    base = {k: LLAMA31[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                    "num_hidden_layers", "num_attention_heads",
                                    "num_key_value_heads")}
    qwen2 = ModelConfig.from_hf_dict({**base, "model_type": "qwen2", "sliding_window": 4096,
                                      "use_sliding_window": False})
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.sliding_window is None
    qwen3 = ModelConfig.from_hf_dict({**base, "model_type": "qwen3", "head_dim": 64})
    assert qwen3.qk_norm and qwen3.head_dim == 64
    mistral = ModelConfig.from_hf_dict({**base, "model_type": "mistral", "sliding_window": 4096})
    assert mistral.sliding_window == 4096
    # model_type missing but a known architecture is named
    by_arch = ModelConfig.from_hf_dict({**base, "architectures": ["Qwen2ForCausalLM"]})
    assert by_arch.model_type == "qwen2"


def test_unknown_architecture_lists_supported():
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dict({**LLAMA31, "model_type": "mamba", "architectures": ["MambaForCausalLM"]})
    msg = str(e.value)
    assert "mamba" in msg and "llama" in msg and "qwen3" in msg and "MambaForCausalLM" in msg


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.pop("hidden_size"), "hidden_size"),
    (lambda d: d.update(num_attention_heads="many"), "malformed"),
    (lambda d: d.update(num_key_value_heads=5), "multiple of num_kv_heads"),
    (lambda d: d.update(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "longrope"),
    (lambda d: d.update(num_hidden_layers=0), "num_layers"),
])
def test_malformed_config_names_the_problem(mutate, needle):
    d = json.loads(json.dumps(LLAMA31))
    mutate(d)
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_hf_dict(d)


def test_malformed_json_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf_file(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_hf_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf_file(tmp_path / "nowhere")


def test_yaml_round_trip_and_unknown_key(tmp_path):
    cfg = ModelConfig.from_hf_dict(LLAMA31)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert ModelConfig.from_yaml(path) == cfg
    bad = cfg.to_dict()
    bad["hidden_sise"] = 3
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="hidden_sise"):
        ModelConfig.from_yaml(path)


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parent.parent
                                        .joinpath("configs/models").glob("*.yaml")))
def test_shipped_model_yamls_load(path):
    from jaxprefill.config import MLA_MODEL_TYPES, MLAConfig
    if yaml.safe_load(path.read_text())["model_type"] in MLA_MODEL_TYPES:
        # DeepSeek family (more checks in tests/test_model_configs.py)
        assert MLAConfig.from_yaml(path).latent_dim > 0
        return
    cfg = ModelConfig.from_yaml(path)
    assert cfg.num_heads % cfg.num_kv_heads == 0


def test_every_config_file_reader_names_a_yaml_syntax_error_in_one_line(tmp_path):
    """Model, engine, training and sparse configs read files through config.read_yaml."""
    from jaxprefill.infer.config import InferConfig
    from jaxprefill.sparse import SparseConfig
    from jaxprefill.train import TrainConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    for read in (ModelConfig.from_yaml, InferConfig.from_yaml, TrainConfig.load,
                 SparseConfig.from_yaml):
        with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML: .*\(line 2, column 1\)"):
            read(str(bad))


def test_infer_config_takes_dsa_options_as_a_mapping_of_known_keys():
    from jaxprefill.infer.config import InferConfig

    cfg = InferConfig.from_dict({"model": "x", "dsa": {"fp8": True, "index_impl": "xla"}})
    assert dict(cfg.dsa) == {"fp8": True, "index_impl": "xla"} and hash(cfg)
    assert InferConfig().dsa is None
    for bad in ({"fp8": True, "topk": 5}, "fp8"):
        with pytest.raises(ConfigError, match="infer config: dsa must be a mapping with keys "
                                              r"from \['fp8', 'index_impl', 'sparse_impl'\]"):
            InferConfig.from_dict({"dsa": bad})
