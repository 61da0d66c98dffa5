"""Bad checkpoints fail with messages that name the problem."""

import json
import re
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxprefill as jp
from jaxprefill.loading.gguf_reader import open_gguf, read_gguf
from jaxprefill.loading.safetensors_io import SafetensorsCheckpoint
from jaxprefill.loading.weights import hf_name_map
from test_gguf_reader import _layer as _gguf_layer
from test_gguf_reader import _write as _write_gguf

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


# ---------------------------------------------------------------- truncated or damaged files


def test_truncated_safetensors_names_file_and_sizes(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m")
    f = ckpt / "model.safetensors"
    full = f.stat().st_size
    path = re.escape(str(f))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(jp.WeightError, match=rf"^{path} is truncated: its header describes {full} "
                                             rf"bytes, the file has {full - 100} \(100 missing"):
        jp.load(ckpt)
    (n,) = struct.unpack("<Q", f.read_bytes()[:8])
    f.write_bytes(f.read_bytes()[:8 + n // 2])
    with pytest.raises(jp.WeightError, match=rf"^{path} is truncated: its header needs {8 + n} "
                                             rf"bytes, the file has {8 + n // 2}$"):
        jp.load(ckpt)


def test_every_cut_of_a_safetensors_file_is_a_weight_error(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m")
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    for cut in range(0, len(data), max(1, len(data) // 150)):
        f.write_bytes(data[:cut])
        with pytest.raises(jp.WeightError, match=re.escape(str(f))):
            SafetensorsCheckpoint(ckpt)


def _raw_safetensors(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_damaged_safetensors_headers(tmp_path):
    f = tmp_path / "model.safetensors"
    _raw_safetensors(f, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(8))
    with pytest.raises(jp.WeightError, match=r"corrupt safetensors header: tensor 'w' "
                                             r"\(F32 \[2\]\) spans 4 bytes, expected 8"):
        SafetensorsCheckpoint(tmp_path)
    _raw_safetensors(f, {"w": {"dtype": "F32", "shape": [2]}}, bytes(8))
    with pytest.raises(jp.WeightError, match=r"entry 'w' needs 'dtype', 'shape' and two "
                                             r"'data_offsets'"):
        SafetensorsCheckpoint(tmp_path)
    _raw_safetensors(f, [1, 2], b"")
    with pytest.raises(jp.WeightError, match="expected a JSON object"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(jp.WeightError, match=r"model\.safetensors\.index\.json is damaged"):
        SafetensorsCheckpoint(tmp_path)


def _tiny_gguf(path):
    _write_gguf(path, "llama", _gguf_layer(np.random.default_rng(0)))
    return path


def test_truncated_gguf_names_file_and_sizes(tmp_path):
    f = _tiny_gguf(tmp_path / "t.gguf")
    full, path = f.stat().st_size, re.escape(str(f))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(jp.WeightError, match=rf"^GGUF file '{path}' is truncated: its tensor table "
                                             rf"needs {full} bytes, the file has {full - 100} "
                                             rf"\(100 missing"):
        jp.load(f)
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(jp.WeightError, match=rf"^GGUF file '{path}' is truncated or damaged: its "
                                             rf"header runs past the end of the file \(needs at "
                                             rf"least \d+ bytes, the file has 40\)$"):
        jp.load(f)
    f.write_bytes(b"")
    with pytest.raises(jp.WeightError, match=rf"^'{path}' is not a GGUF file: it has 0 bytes"):
        jp.load(f)


def test_every_cut_of_a_gguf_file_is_a_weight_error(tmp_path):
    """No cut point leaks a struct.error or a numpy buffer error."""
    f = _tiny_gguf(tmp_path / "t.gguf")
    data = f.read_bytes()
    for cut in range(0, len(data), max(1, len(data) // 300)):
        f.write_bytes(data[:cut])
        with pytest.raises(jp.WeightError, match=re.escape(str(f))):
            read_gguf(f)


def test_damaged_gguf_tensor_type(tmp_path):
    f = _tiny_gguf(tmp_path / "t.gguf")
    reader = open_gguf(f)
    name = reader.tensors[0].name.encode()
    data = bytearray(f.read_bytes())
    # tensor info: name, n_dims (u32), dims (u64 each), type (u32), offset (u64)
    at = data.index(name) + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 999)
    f.write_bytes(bytes(data))
    with pytest.raises(jp.WeightError, match=rf"tensor '{name.decode()}' has unknown type 999"):
        read_gguf(f)
