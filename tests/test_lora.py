"""LoRA (jaxprefill.lora) and adapter files (jaxprefill.loading.adapter): the branch equals the
merged weight, dropout acts in training only, only adapters train, adapter files round-trip
through jp.load with their config overrides, bundled adapter names, bad configs in one line.
Tiny models (2 layers, hidden 32) keep every compile short."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprefill as jp
from jaxprefill import lora
from jaxprefill.config import ConfigError, MLAConfig, ModelConfig, RopeConfig
from jaxprefill.data import ByteTokenizer
from jaxprefill.loading import adapter as adapter_lib
from jaxprefill.loading.weights import WeightError
from jaxprefill.models.layers import rope_inv_freq
from jaxprefill.train.config import LoRASection, OptimSection, TrainConfig
from jaxprefill.train.export import adapter_metadata, export_adapter, export_hf
from jaxprefill.train.optimizer import make_optimizer
from jaxprefill.train.step import StepOptions, init_state, make_eval_step, make_train_step, merge
from jaxprefill.validate import InputError
from test_train import enable_compilation_cache

enable_compilation_cache()  # identical programs across runs compile once

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    max_position_embeddings=64, tie_word_embeddings=False, qkv_bias=True,
                    o_bias=True, rope=RopeConfig(theta=10000.0, original_max_position_embeddings=64))
MLA = MLAConfig(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=48,
                num_layers=2, num_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=8, max_position_embeddings=64, q_lora_rank=16, n_routed_experts=4,
                n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
                first_k_dense_replace=1, scoring_func="sigmoid", topk_method="noaux_tc",
                norm_topk_prob=True)
LLAMA_TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
MLA_TARGETS = ["q_a", "q_b", "kv_a", "kv_b", "o", "gate", "up", "down"]
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 12)).astype(np.int32)


def new_model(cfg, seed=0):
    cls = jp.DeepSeek if isinstance(cfg, MLAConfig) else jp.Llama
    model = cls(cfg, rngs=nnx.Rngs(seed), attention=jp.AttentionSpec("xla"))
    if isinstance(cfg, MLAConfig):  # decisive routing: float rounding must not flip an expert
        for layer in model.layers:
            if hasattr(layer.mlp, "router"):
                layer.mlp.router[...] = layer.mlp.router[...] * 20.0
    return model


def perturb(model, seed=1, norms=False):
    """Random B factors (A @ B starts at zero) and, optionally, norm scales: a model whose
    adapters change its outputs."""
    key = jax.random.PRNGKey(seed)
    for i, (_, w) in enumerate(lora.lora_weights(model)):
        w.b[...] = 0.2 * jax.random.normal(jax.random.fold_in(key, i), w.b.shape)
    if norms:
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            if lora.is_norm(path):
                var[...] = var[...] * 1.1
    return model


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def logits(model, tokens=TOKENS) -> np.ndarray:
    """model(tokens) under jit, one compile per model structure."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(tokens)))


def assert_close(got, want, rel=1e-5):
    scale = float(np.max(np.abs(want)))
    assert scale > 1e-3
    assert float(np.max(np.abs(got - want))) <= rel * scale, float(np.max(np.abs(got - want)))


# ---------------------------------------------------------------------------- the LoRA branch
@pytest.mark.parametrize("cfg,targets", [(LLAMA, LLAMA_TARGETS), (MLA, MLA_TARGETS)],
                         ids=["llama", "deepseek"])
def test_merged_equals_unmerged_forward(cfg, targets):
    model = new_model(cfg)
    base = logits(model)
    assert lora.available_targets(model) == targets
    lora.attach(model, targets, rank=3, alpha=6.0, rngs=nnx.Rngs(5))
    np.testing.assert_array_equal(logits(model), base)  # B = 0: starts at the base model
    perturb(model)
    unmerged = logits(model)
    (path, w), *_ = lora.lora_weights(model)
    want = np.asarray(w.base[...]) + 2.0 * np.tensordot(np.asarray(w.a[...]), np.asarray(w.b[...]), 1)
    np.testing.assert_allclose(np.asarray(w[...]), want, rtol=1e-6, atol=1e-7)  # w[...] is merged
    merged = logits(lora.merge(model))
    assert not lora.lora_weights(model)
    assert float(np.max(np.abs(unmerged - base))) > 1e-3  # the adapters do change the outputs
    assert_close(merged, unmerged)


def test_targets_named_per_model():
    assert lora.available_targets(new_model(MLA.replace(q_lora_rank=None)))[:3] == ["q", "kv_a", "kv_b"]
    model = new_model(LLAMA)
    with pytest.raises(ConfigError) as e:
        lora.attach(model, ["q", "q_a", "kv_b"], rank=2, alpha=2.0, rngs=nnx.Rngs(0))
    assert str(e.value) == ("lora.targets: ['q_a', 'kv_b'] not in this llama model; it has: q, k, "
                            "v, o, gate, up, down")
    with pytest.raises(ConfigError, match="listed more than once"):
        lora.attach(model, ["q", "q"], rank=2, alpha=2.0, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"lora.rank must be a positive integer, got 0"):
        lora.attach(model, ["q"], rank=0, alpha=2.0, rngs=nnx.Rngs(0))
    # the MoE layer's routed experts take no adapters; its shared experts do
    deepseek = lora.attach(new_model(MLA), ["gate"], rank=2, alpha=2.0, rngs=nnx.Rngs(0))
    assert [p for p, _ in lora.lora_weights(deepseek)] == [
        ("layers", 0, "mlp", "gate"), ("layers", 1, "mlp", "shared", "gate")]


def test_dropout_acts_on_the_branch_input_in_training_only():
    model = perturb(lora.attach(new_model(LLAMA), ["q", "down"], rank=2, alpha=4.0, dropout=0.5,
                                rngs=nnx.Rngs(3)))
    w = model.layers[0].attn.q
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 32))
    eq = "bse,ehd->bshd"
    no_drop = w(eq, x)
    key = jax.random.PRNGKey(7)
    w.key = lora.DropoutKey(key)
    mask = np.asarray(jax.random.bernoulli(key, 0.5, x.shape))
    want = (jnp.einsum(eq, x, w.base[...])
            + 2.0 * jnp.einsum("bsr,rhd->bshd", jnp.einsum("bse,er->bsr", jnp.where(mask, x / 0.5, 0.0),
                                                           w.a[...]), w.b[...]))
    np.testing.assert_allclose(np.asarray(w(eq, x)), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert float(np.max(np.abs(np.asarray(w(eq, x)) - np.asarray(no_drop)))) > 1e-3
    w.b[...] = jnp.zeros_like(w.b[...])  # no branch: dropout leaves the base product alone
    np.testing.assert_array_equal(np.asarray(w(eq, x)), np.asarray(jnp.einsum(eq, x, w.base[...])))

    # through the train step: its loss (with dropout) differs from the eval loss of the same
    # params, which is the plain forward's (no dropout)
    model = perturb(lora.attach(new_model(LLAMA.replace(num_layers=1)), ["q", "down"], rank=2,
                                alpha=4.0, dropout=0.5, rngs=nnx.Rngs(3)))
    graphdef, params, frozen = nnx.split(model, lora.trainable_filter(), nnx.Param)
    t_tmpl, f_tmpl = params, frozen
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    batch = {"tokens": TOKENS, "positions": np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12)),
             "segment_ids": np.ones((2, 12), np.int32)}
    opts = StepOptions(dropout=True)
    tx = optax.sgd(0.0)
    step = jax.jit(make_train_step(graphdef, t_tmpl, tx, lambda s: 0.0, opts, f_tmpl))
    evaluate = jax.jit(make_eval_step(graphdef, t_tmpl, opts, f_tmpl))
    state = init_state(params, tx, 0)
    _, m = step(state, {k: v[None] for k, v in batch.items()}, frozen)
    _, again = step(state, {k: v[None] for k, v in batch.items()}, frozen)
    assert float(m["loss"]) == float(again["loss"])  # the keys come from the state's RNG
    total, count = evaluate(params, batch, frozen)
    eval_loss = float(total / count)
    lg = logits(merge(graphdef, t_tmpl, params, f_tmpl, frozen))
    nll = jax.nn.logsumexp(lg[:, :-1], -1) - np.take_along_axis(lg[:, :-1], TOKENS[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(eval_loss, float(nll.mean()), rtol=1e-5)
    assert abs(float(m["loss"]) - eval_loss) > 1e-4  # float noise is ~1e-6


@pytest.mark.parametrize("cfg,targets,norms", [(LLAMA, ["q", "v"], 2 * 2 + 1),
                                               (MLA, ["q_b", "kv_b"], 2 * 4 + 1)],
                         ids=["llama", "deepseek"])
def test_only_adapters_and_norms_train(cfg, targets, norms):
    model = lora.attach(new_model(cfg), targets, rank=2, alpha=4.0, rngs=nnx.Rngs(3))
    graphdef, params, frozen = nnx.split(model, lora.trainable_filter(train_norms=True), nnx.Param)
    t_tmpl, f_tmpl = params, frozen
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    leaves = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    assert all(k.endswith(("['a']", "['b']", "['scale']")) for k in leaves), leaves
    # (a, b) x targets x 2 layers + the norm scales (per layer: block norms, MLA's q_a / kv norms)
    assert len(leaves) == 2 * len(targets) * 2 + norms
    frozen_before = jax.tree.map(np.array, frozen)
    tx, lr = make_optimizer(OptimSection(lr=1e-2, warmup_steps=0), params, 10)
    state = init_state(params, tx, 0)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    assert n_moments == 2 * n_params  # AdamW moments of the trainable leaves only
    step = jax.jit(make_train_step(graphdef, t_tmpl, tx, lr, StepOptions(), f_tmpl))
    batch = {"tokens": TOKENS[None], "positions": np.broadcast_to(np.arange(12, dtype=np.int32), (1, 2, 12)),
             "segment_ids": np.ones((1, 2, 12), np.int32)}
    start = jax.tree.map(np.array, params)
    for _ in range(3):
        state, _ = step(state, batch, frozen)
    after = jax.device_get(state["params"])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(after), jax.tree.leaves(start)):
        assert not np.array_equal(a, b), jax.tree_util.keystr(path)  # every trainable moved
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(frozen), jax.tree.leaves(frozen_before)):
        assert np.array_equal(np.asarray(a), b), jax.tree_util.keystr(path)  # the base: bitwise


# ----------------------------------------------------------------------- bad lora configs
def _cfg(**lora_section):
    return TrainConfig.from_dict({"output_dir": "/tmp/x", "steps": 1, "batch_size": 1,
                                  "lora": {"targets": ["q"], **lora_section}})


@pytest.mark.parametrize("section,message", [
    ({"targets": ["qq", "v"]}, "lora.targets: unknown name(s) ['qq']"),
    ({"targets": []}, "lora.targets: list at least one projection"),
    ({"rank": 0}, "lora.rank must be a positive integer, got 0"),
    ({"rank": 2.5}, "lora.rank: expected an integer, got 2.5"),
    ({"alpha": 0}, "lora.alpha must be positive, got 0.0"),
    ({"dropout": 1.0}, "lora.dropout must be in [0, 1), got 1.0"),
    ({"ranks": 4}, "unknown key(s) ['lora.ranks']"),
])
def test_bad_lora_config_is_one_clear_line(section, message):
    with pytest.raises(ConfigError) as e:
        _cfg(**section)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_lora_config_cross_checks():
    with pytest.raises(ConfigError, match="optim.name: 'muon' does not train LoRA factors"):
        TrainConfig.from_dict({"output_dir": "/tmp/x", "steps": 1, "batch_size": 1,
                               "optim": {"name": "muon"}, "lora": {"targets": ["q"]}})
    with pytest.raises(ConfigError, match=r"model.overrides: \['rms_norm_eps'\] cannot change under lora"):
        TrainConfig.from_dict({"output_dir": "/tmp/x", "steps": 1, "batch_size": 1,
                               "model": {"pretrained": "smollm2-135m-instruct",
                                         "overrides": {"rms_norm_eps": 1e-6}},
                               "lora": {"targets": ["q"]}})
    from jaxprefill.train.model import build
    mesh = jp.make_mesh(devices=jax.devices()[:1])
    cfg = TrainConfig.from_dict({"output_dir": "/tmp/x", "steps": 1, "batch_size": 1,
                                 "model": {"config": "tiny-llama"},
                                 "lora": {"targets": ["q", "kv_a"]}})
    with pytest.raises(ConfigError, match=r"lora.targets: \['kv_a'\] not in this llama model; it has: q, k, v"):
        build(cfg.model, mesh, 0, cfg.lora)
    with pytest.raises(ConfigError, match="lora.train_biases: this model has no projection biases"):
        build(cfg.model, mesh, 0, LoRASection(targets=("q",), train_biases=True))


def test_cli_reports_a_bad_lora_config_in_one_line(capsys):
    from jaxprefill.cli import main
    recipe = os.path.join(ROOT, "configs", "train", "smollm2-32k-lora-tiny.yaml")
    assert main(["train", "--config", recipe, "lora.rank=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: lora.rank must be a positive integer, got 0"], err
    tiny = os.path.join(ROOT, "configs", "train", "tiny-cpu.yaml")
    assert main(["train", "--config", tiny, "--export-adapter", "/tmp/never.safetensors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --export-adapter: this recipe has no lora section"], err


# ---------------------------------------------------------------------------- adapter files
def write_base(cfg, directory, seed=0):
    """A base model directory (float32 safetensors + config.json + byte tokenizer)."""
    model = new_model(cfg, seed)
    export_hf(model, str(directory), tokenizer=ByteTokenizer() if cfg.vocab_size >= 258 else None)
    return directory


@pytest.mark.parametrize("cfg,targets", [(LLAMA, LLAMA_TARGETS), (MLA, MLA_TARGETS)],
                         ids=["llama", "deepseek"])
def test_adapter_file_round_trips_through_load(tmp_path, cfg, targets):
    base_dir = write_base(cfg, tmp_path / "base")
    model, _ = jp.load(base_dir, attention="xla")
    lora.attach(model, targets, rank=3, alpha=6.0, rngs=nnx.Rngs(2))
    perturb(model, norms=True)
    section = LoRASection(targets=tuple(targets), rank=3, alpha=6.0, train_norms=True)
    trained = [p for p, _ in nnx.to_flat_state(nnx.split(model, lora.trainable_filter(True), ...)[1])]
    path = export_adapter(model, str(tmp_path / "a.safetensors"), trained=trained,
                          meta=adapter_metadata(model.config, section, str(base_dir)))
    meta = adapter_lib.read_adapter(path).meta
    assert meta["rank"] == 3 and meta["targets"] == targets and meta["base_model"] == str(base_dir)
    want = logits(lora.merge(model))
    loaded, _ = jp.load(base_dir, adapter=path, attention="xla")
    assert loaded.config == model.config
    assert_close(logits(loaded), want)
    # a directory holding adapter.safetensors (a run's output_dir) works as well
    os.replace(path, tmp_path / "adapter.safetensors")
    assert_close(logits(jp.load(base_dir, adapter=tmp_path, attention="xla")[0]), want)


def test_adapter_errors(tmp_path):
    base_dir = write_base(LLAMA, tmp_path / "base")
    other = write_base(LLAMA.replace(intermediate_size=40), tmp_path / "other")
    model = perturb(lora.attach(jp.load(base_dir)[0], ["up"], rank=2, alpha=2.0, rngs=nnx.Rngs(0)))
    path = export_adapter(model, str(tmp_path / "a.safetensors"),
                          meta=adapter_metadata(model.config, LoRASection(targets=("up",), rank=2, alpha=2.0), "x"))
    with pytest.raises(WeightError, match=r"mlp.up_proj.weight.*is \(40, 32\) in the base"):
        jp.load(other, adapter=path)
    with pytest.raises(FileNotFoundError, match="neither a bundled adapter"):
        jp.load(base_dir, adapter=tmp_path / "missing.safetensors")
    with pytest.raises(WeightError, match="is not a jaxprefill adapter"):
        jp.load(base_dir, adapter=base_dir / "model.safetensors")
    qwen = write_base(LLAMA.replace(model_type="qwen2", o_bias=False), tmp_path / "qwen")
    with pytest.raises(WeightError, match="trained on a llama model"):
        jp.load(qwen, adapter=path)


# ------------------------------------------------------------------------- config overrides
def test_config_overrides_reach_the_model(tmp_path):
    base_dir = write_base(LLAMA, tmp_path / "base")
    dim = LLAMA.head_dim
    cases = {
        "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        "linear": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
        "dynamic": {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
        "theta": {"rope_theta": 1.0e6},
    }
    for name, extra in cases.items():
        model, _ = jp.load(base_dir, overrides={"max_position_embeddings": 256, **extra})
        rope = model.config.rope
        assert model.config.max_position_embeddings == 256, name
        if name == "theta":
            assert (rope.type, rope.theta) == ("default", 1.0e6)
        else:  # the original length is the base's when the scaling does not say
            assert (rope.type, rope.factor, rope.original_max_position_embeddings) == (name, 4.0, 64)
        np.testing.assert_allclose(model.rope[0], rope_inv_freq(rope, dim)[0], rtol=1e-12)
    # dynamic NTK: transformers' frequencies at factor x the original length
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=dim, max_position_embeddings=64,
                     rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu", seq_len=256)
    dyn = RopeConfig(type="dynamic", theta=10000.0, factor=4.0, original_max_position_embeddings=64)
    np.testing.assert_allclose(rope_inv_freq(dyn, dim)[0], ref.numpy(), rtol=1e-5)
    # a transformers 5 config (rope_parameters) still takes the override
    d = json.loads((base_dir / "config.json").read_text())
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0}
    got = adapter_lib.apply_config_overrides(d, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert got["rope_theta"] == 5000.0 and got["rope_scaling"]["rope_type"] == "linear"
    assert "rope_parameters" not in got
    with pytest.raises(ConfigError, match=r"cannot override \['hidden_size'\]"):
        jp.load(base_dir, overrides={"hidden_size": 64})


# ------------------------------------------------------------------------ bundled adapters
def test_bundled_adapter_name(tmp_path, monkeypatch):
    monkeypatch.setattr(adapter_lib, "ASSET_DIR", tmp_path / "assets")
    with pytest.raises(FileNotFoundError) as e:
        jp.load("smollm2-135m-32k")
    msg = str(e.value)
    assert "\n" not in msg and "jaxprefill/assets/smollm2-135m-32k.safetensors" in msg
    assert "not in this installation" in msg
    # the mechanism, over a tiny base: name -> base + the asset adapter
    base_dir = write_base(LLAMA, tmp_path / "base")
    monkeypatch.setitem(adapter_lib.BUNDLED_ADAPTERS, "smollm2-135m-32k",
                        (str(base_dir), "smollm2-135m-32k.safetensors", "a recipe"))
    model = perturb(lora.attach(jp.load(base_dir)[0], ["q", "o"], rank=2, alpha=4.0, rngs=nnx.Rngs(0)))
    long_cfg = model.config.replace(max_position_embeddings=256, rope=RopeConfig(
        type="yarn", theta=10000.0, factor=4.0, original_max_position_embeddings=64))
    (tmp_path / "assets").mkdir()
    export_adapter(model, str(tmp_path / "assets" / "smollm2-135m-32k.safetensors"),
                   meta=adapter_metadata(long_cfg, LoRASection(targets=("q", "o"), rank=2, alpha=4.0), "tiny"))
    bundled, tok = jp.load("smollm2-135m-32k", attention="xla")
    assert bundled.config == long_cfg and tok is None
    explicit, _ = jp.load(base_dir, adapter="smollm2-135m-32k", attention="xla")
    np.testing.assert_array_equal(logits(bundled), logits(explicit))
    with pytest.raises(InputError, match="already brings its adapter"):
        jp.load("smollm2-135m-32k", adapter=tmp_path / "assets" / "smollm2-135m-32k.safetensors")


@pytest.mark.slow
def test_bundled_name_over_the_real_gguf(tmp_path, monkeypatch):
    """`smollm2-135m-32k` = the bundled GGUF + the asset adapter: config 32K YaRN x4, and the
    adapted weight is the GGUF's plus scale * B @ A (a hand-made rank-1 adapter on q_proj)."""
    from jaxprefill.train.export import save_safetensors
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1, 576)).astype(np.float32), rng.normal(size=(576, 1)).astype(np.float32)
    tensors = {}
    for i in range(30):
        tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"] = a
        tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"] = b
    meta = {"format": 1, "rank": 1, "alpha": 0.01, "model_type": "llama", "config_overrides": {
        "max_position_embeddings": 32768, "rope_theta": 100000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}}}
    (tmp_path / "smollm2-135m-32k.safetensors").parent.mkdir(exist_ok=True)
    save_safetensors(str(tmp_path / "smollm2-135m-32k.safetensors"), tensors,
                     {adapter_lib.METADATA_KEY: json.dumps(meta)})
    monkeypatch.setattr(adapter_lib, "ASSET_DIR", tmp_path)
    model, tok = jp.load("smollm2-135m-32k")
    base, _ = jp.load("smollm2-135m-instruct")
    cfg = model.config
    assert cfg.max_position_embeddings == 32768 and tok is not None
    assert (cfg.rope.type, cfg.rope.factor, cfg.rope.original_max_position_embeddings) == ("yarn", 4.0, 8192)
    delta = np.asarray(model.layers[7].attn.q[...]) - np.asarray(base.layers[7].attn.q[...])
    np.testing.assert_allclose(delta.reshape(576, 576), 0.01 * (b @ a).T, atol=1e-5)


@pytest.mark.slow
def test_shipped_32k_adapter():
    """The committed asset: `jp.load("smollm2-135m-32k")` on a plain install gives the 32K YaRN
    model, an adapter of the bundled GGUF under 25 MB, that still answers like the instruct
    model."""
    path = adapter_lib.ASSET_DIR / "smollm2-135m-32k.safetensors"
    assert path.is_file() and path.stat().st_size < 25_000_000
    model, tok = jp.load("smollm2-135m-32k")
    cfg = model.config
    assert cfg.max_position_embeddings == 32768
    assert (cfg.rope.type, cfg.rope.factor, cfg.rope.original_max_position_embeddings) == (
        "yarn", 16.0, 2048)
    out = jp.generate(model, tok, ["What is the capital of France?"], max_new_tokens=12,
                      chat=True)
    assert "Paris" in out[0].text
