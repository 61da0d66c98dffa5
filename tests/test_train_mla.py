"""Training a DeepSeek (MLA + MoE) model with the same Trainer as Llama: the `mla-small` recipe
loads, a tiny MLA config learns on the stdlib corpus, and the export (bf16 and float32, single
file and sharded) loads back with `jp.load` as a `DeepSeek` giving the trained model's logits."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprefill as jp
from jaxprefill.config import MLAConfig
from jaxprefill.data import build_corpus
from jaxprefill.models import DeepSeek
from jaxprefill.train import TrainConfig, Trainer
from jaxprefill.train import mfu
from jaxprefill.train.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "train", "mla-small.yaml")

# mla-small's structure (V3 sigmoid routing, dense first layer, shared expert) at toy size
TINY = ("{hidden_size: 64, intermediate_size: 96, num_layers: 2, num_heads: 2, q_lora_rank: 32, "
        "kv_lora_rank: 32, qk_nope_head_dim: 16, qk_rope_head_dim: 8, v_head_dim: 16, "
        "n_routed_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 32}")


def test_mla_small_recipe_builds_a_deepseek_config():
    cfg = TrainConfig.load(RECIPE)
    from jaxprefill.train.model import model_config
    mcfg = model_config(cfg.model)
    assert isinstance(mcfg, MLAConfig) and mcfg.is_moe_layer(1) and not mcfg.is_moe_layer(0)
    assert mcfg.kv_lora_rank % 4 == 0 and mcfg.qk_rope_head_dim % 8 == 0  # TPLA g = 2, 4
    n = sum(x.size for x in jax.tree.leaves(
        nnx.state(nnx.eval_shape(lambda: DeepSeek(mcfg, rngs=nnx.Rngs(0))), nnx.Param)))
    assert 15e6 < n < 30e6, n  # bf16 export well under 60 MB
    # MFU counts the active path: top-k + shared experts, not all experts
    assert mfu.matmul_params(mcfg) < 0.6 * n


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    build_corpus(corpus, max_files=60, val_fraction=0.1)
    out = tmp_path_factory.mktemp("mla")
    cfg = TrainConfig.load(RECIPE, [
        f"output_dir={out}", f"data.train=[{corpus}/train.jsonl]",
        f"data.validation=[{corpus}/validation.jsonl]", "steps=16", "batch_size=8",
        "data.seq_len=64", "model.dtype=float32", "optim.lr=5e-3", "optim.warmup_steps=2",
        "log.every=1", "log.eval_batches=1", "log.progress=false", "checkpoint.enabled=false",
        "checkpoint.export_at_end=false", "time_limit_s=null", f"model.fields={_fields()}"])
    trainer = Trainer(cfg, log_fn=lambda m: None)
    result = trainer.fit()
    yield trainer, result, out
    trainer.close()


def jit_logits(model, tokens) -> np.ndarray:
    """model(tokens) under one jit (op-by-op eager dispatch is slow on CPU)."""
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, tokens))


def _fields() -> str:
    import yaml

    d = yaml.safe_load(open(RECIPE))["model"]["fields"]
    d.update(yaml.safe_load(TINY))
    return json.dumps(d)


def test_tiny_mla_loss_decreases(trained):
    trainer, result, out = trained
    assert isinstance(trainer.nnx_model(), DeepSeek)
    losses = [r["loss"] for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in r]
    assert len(losses) == 16 and np.all(np.isfinite(losses))
    # byte tokens start near ln(512) = 6.2; 16 steps reach well below the first losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1.0, losses
    assert result.val_loss is not None and result.val_loss < losses[0] - 1.0


@pytest.mark.parametrize("dtype,shard_bytes", [("float32", None), ("bfloat16", 150_000)])
def test_export_round_trips_logits(trained, tmp_path, dtype, shard_bytes):
    from jaxprefill.train.export import export_hf

    trainer, _, _ = trained
    model = trainer.nnx_model()
    export_hf(model, str(tmp_path), dtype=dtype, max_shard_bytes=shard_bytes)
    files = sorted(os.listdir(tmp_path))
    if shard_bytes:  # the tiny model is ~0.4 MB in bf16: several shards + the index
        shards = [f for f in files if f.endswith(".safetensors")]
        assert "model.safetensors.index.json" in files and len(shards) >= 2, files
        assert all(os.path.getsize(tmp_path / f) <= shard_bytes for f in shards)
    loaded, tok = jp.load(tmp_path)
    assert isinstance(loaded, DeepSeek) and tok is None
    assert loaded.config == model.config  # config.json round-trips every MLAConfig field
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 258, (2, 40)), jnp.int32)
    ref = jit_logits(model, tokens)
    if dtype == "bfloat16":  # the reference is the trained model with bf16-rounded weights
        params = nnx.state(model, nnx.Param)
        rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
        model = nnx.merge(nnx.graphdef(model), rounded, nnx.state(model, nnx.Not(nnx.Param)))
        ref = jit_logits(model, tokens)
    got = jit_logits(loaded, tokens)
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref)), np.max(np.abs(got - ref))
