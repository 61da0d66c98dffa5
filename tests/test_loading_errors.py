"""Bad checkpoints fail with messages that name the problem."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxprefill as jp
from jaxprefill.loading.weights import hf_name_map

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64,
          "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "tie_word_embeddings": True}


def write_checkpoint(path, config=CONFIG, drop=(), reshape=None):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    cfg = jp.ModelConfig.from_hf_dict(config)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape, _ in hf_name_map(cfg).values():
        if name in drop:
            continue
        if reshape and name in reshape:
            shape = reshape[name]
        tensors[name] = rng.standard_normal(shape).astype(np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_good_checkpoint_loads(tmp_path):
    model, tok = jp.load(write_checkpoint(tmp_path / "ok"))
    assert tok is None
    logits = model(np.arange(7, dtype=np.int32)[None])
    assert logits.shape == (1, 7, 64) and np.isfinite(np.asarray(logits)).all()


def test_missing_tensor(tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    with pytest.raises(jp.WeightError, match=r"missing tensor 'model\.layers\.0\.self_attn\.k_proj\.weight'.*\(16, 32\)"):
        jp.load(write_checkpoint(tmp_path / "m", drop=(name,)))


def test_misshaped_tensor_names_both_shapes(tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(jp.WeightError, match=r"up_proj.*shape \(40, 32\), expected \(48, 32\)"):
        jp.load(write_checkpoint(tmp_path / "m", reshape={name: (40, 32)}))


def test_unknown_architecture(tmp_path):
    with pytest.raises(jp.ConfigError, match="unsupported architecture.*gpt2.*supported"):
        jp.load(write_checkpoint(tmp_path / "m", config={**CONFIG, "model_type": "gpt2",
                                                         "architectures": ["GPT2LMHeadModel"]}))


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a bundled model"):
        jp.load(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        jp.load(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"xx")
    with pytest.raises(ValueError, match="don't know how to load"):
        jp.load(tmp_path / "weights.bin")
    d = tmp_path / "nosafetensors"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        jp.load(d)
    (d / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="not a safetensors file"):
        jp.load(d)
