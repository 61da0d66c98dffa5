"""The CPU twin of the 32K recipe (configs/train/smollm2-32k-lora-tiny.yaml) end to end: LoRA
over a pretrained tiny base with YaRN, one document per row, adapter-only checkpoints, exact
resume after a SIGTERM, and the adapter through `jp.load(base, adapter=...)` and through the
merged export. Shares test_train's corpus and compilation cache."""

from __future__ import annotations

import ast
import json
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

import jaxprefill as jp
from jaxprefill import lora
from jaxprefill.config import ModelConfig
from jaxprefill.data import ByteTokenizer
from jaxprefill.train import TrainConfig, Trainer
from jaxprefill.train.export import export_hf
from test_lora import logits
from test_train import ROOT, corpus, losses  # noqa: F401  (corpus: a fixture)

TWIN = os.path.join(ROOT, "configs", "train", "smollm2-32k-lora-tiny.yaml")
RUN = ["steps=6", "checkpoint.every=3", "checkpoint.keep=3", "log.every=1", "log.progress=false",
       "log.eval_batches=1", "time_limit_s=null"]
TOKENS = np.random.default_rng(1).integers(0, 258, (2, 40)).astype(np.int32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pretrained tiny base, as `jaxprefill train --config configs/train/tiny-cpu.yaml
    --export DIR` writes it (random weights stand in for the training)."""
    out = tmp_path_factory.mktemp("base")
    cfg = ModelConfig.from_yaml(os.path.join(ROOT, "configs", "models", "tiny-llama.yaml"))
    export_hf(jp.Llama(cfg, rngs=nnx.Rngs(0)), str(out), tokenizer=ByteTokenizer())
    return out


def twin_cfg(corpus, base, out, *overrides) -> TrainConfig:  # noqa: F811
    return TrainConfig.load(TWIN, [f"output_dir={out}", f"model.pretrained={base}",
                                   f"data.train=[{corpus}/train.jsonl]",
                                   f"data.validation=[{corpus}/validation.jsonl]", *RUN, *overrides])


@pytest.fixture(scope="module")
def reference(corpus, base, tmp_path_factory):  # noqa: F811
    """An uninterrupted 6-step twin run: (trainer, result, output dir, messages)."""
    out = tmp_path_factory.mktemp("twin")
    messages: list[str] = []
    trainer = Trainer(twin_cfg(corpus, base, out), log_fn=messages.append)
    result = trainer.fit()
    yield trainer, result, out, messages
    trainer.close()


def test_twin_recipe_mirrors_the_32k_recipe():
    big = TrainConfig.load(os.path.join(ROOT, "configs", "train", "smollm2-32k-lora.yaml"))
    twin = TrainConfig.load(TWIN)
    for cfg in (big, twin):
        assert cfg.lora is not None and cfg.data.packing == "document" and cfg.time_limit_s
        assert cfg.model.pretrained and cfg.model.overrides["rope"]["type"] == "yarn"
    assert big.lora.targets == twin.lora.targets == ("q", "k", "v", "o", "gate", "up", "down")
    assert big.data.seq_len == big.model.overrides["max_position_embeddings"] == 32768
    assert twin.data.seq_len == 256 and 16 <= big.lora.rank <= 32
    assert big.model.pretrained == "smollm2-135m-instruct" and big.model.dtype == "bfloat16"
    assert big.checkpoint.every == 50 and big.optim.warmup_steps > 0 and big.optim.schedule == "cosine"
    # the shipped adapter's size: factors over SmolLM2-135M's shapes + norm scales, bf16
    smol = ModelConfig.from_yaml(os.path.join(ROOT, "configs", "models", "smollm2-135m.yaml"))
    model = nnx.eval_shape(lambda: lora.attach(jp.Llama(smol, rngs=nnx.Rngs(0)), big.lora.targets,
                                               rank=big.lora.rank, alpha=big.lora.alpha,
                                               rngs=nnx.Rngs(0)))
    trainable = nnx.state(model, lora.trainable_filter(big.lora.train_norms))
    n = sum(x.size for x in jax.tree.leaves(trainable))
    assert big.checkpoint.export_dtype == "bfloat16" and 2 * n <= 25e6, n


def test_twin_trains_only_the_adapters(reference, base):
    trainer, result, out, messages = reference
    assert (result.status, result.step) == ("finished", 6)
    ls = losses(out)
    assert sorted(ls) == list(range(1, 7)) and all(np.isfinite(list(ls.values())))
    assert any(m.startswith("lora: rank 4, alpha 8, dropout 0.05 on q, k, v, o, gate, up, down")
               for m in messages), messages
    assert any("one document per row, plain causal attention" in m for m in messages)
    # the train state holds the factors and norm scales only
    keys = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainer.state["params"])}
    assert keys and all(k.endswith(("['a']", "['b']", "['scale']")) for k in keys), keys
    # ... and the base is untouched: every weight of the merged model that is neither a target nor
    # a norm equals the base checkpoint's, bit for bit
    base_model, _ = jp.load(base)
    ref = dict(nnx.to_flat_state(nnx.state(base_model, nnx.Param)))
    got = dict(nnx.to_flat_state(nnx.state(trainer.nnx_model(), nnx.Param)))
    changed = set()
    for path, var in ref.items():
        if not np.array_equal(np.asarray(var[...]), np.asarray(got[path][...])):
            changed.add(path[-1])
    assert changed == {"q", "k", "v", "o", "gate", "up", "down", "scale"}, changed


def test_checkpoints_hold_only_trainable_parameters(reference, base):
    trainer, _, out, _ = reference
    step_dir = out / "checkpoints" / "6"
    meta = json.loads((step_dir / "state" / "_METADATA").read_text())
    names = [ast.literal_eval(k) for k in meta["tree_metadata"]]
    param_leaves = [k[-1] for k in names if k[0] == "params"]
    assert param_leaves and set(param_leaves) == {"a", "b", "scale"}
    assert not any("embed" in k or "base" in k for k in names)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(step_dir) for f in fs)
    n = sum(x.size for x in jax.tree.leaves(trainer.state["params"]))
    base_bytes = os.path.getsize(base / "model.safetensors")
    # params + two Adam moments (float32) + small files; a full checkpoint is 3x the base model
    assert size < 3 * 4 * n + 300_000 and 2 * size < base_bytes, (size, n, base_bytes)


def test_twin_resume_is_exact(corpus, base, reference, tmp_path):  # noqa: F811
    ref_trainer, _, ref_dir, _ = reference

    def preempt(trainer, step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    first = Trainer(twin_cfg(corpus, base, tmp_path), log_fn=lambda m: None)
    r1 = first.fit(callback=preempt)
    first.close()
    assert (r1.status, r1.step) == ("preempted", 4)
    assert not (tmp_path / "adapter.safetensors").exists()  # written by runs that finish or stop
    messages: list[str] = []
    second = Trainer(twin_cfg(corpus, base, tmp_path), log_fn=messages.append)
    assert second.resumed_from == 4
    r2 = second.fit()
    state = jax.device_get(second.state)
    second.close()
    assert (r2.status, r2.step) == ("finished", 6)
    ref_losses, run_losses = losses(ref_dir), losses(tmp_path)
    assert all(ref_losses[s] == run_losses[s] for s in range(1, 7)), (ref_losses, run_losses)
    ref_state = jax.device_get(ref_trainer.state)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_state), jax.tree.leaves(state)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)


def test_adapter_loads_over_the_base_and_matches_the_merged_export(reference, base, tmp_path):
    trainer, _, out, _ = reference
    want = logits(trainer.nnx_model(), TOKENS)
    model, tok = jp.load(base, adapter=out)  # the run's output_dir: its adapter.safetensors
    cfg = model.config
    assert cfg.max_position_embeddings == 256 and tok is not None
    assert (cfg.rope.type, cfg.rope.factor, cfg.rope.original_max_position_embeddings) == ("yarn", 2.0, 128)
    assert cfg == trainer.model.config
    got = logits(model, TOKENS)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    exported, tok2 = jp.load(trainer.export(str(tmp_path / "hf")))
    assert exported.config == cfg and tok2 is not None
    np.testing.assert_array_equal(logits(exported, TOKENS), want)  # float32 export: bit for bit
    assert os.path.getsize(out / "adapter.safetensors") * 10 < os.path.getsize(tmp_path / "hf" / "model.safetensors")


def test_init_from_an_adapter(corpus, base, reference, tmp_path):  # noqa: F811
    """lora.init_from: a new run starts equal to jp.load(base, adapter=...) (factors and trained
    norms taken over, the optimizer fresh) and trains on from there; an adapter of another rank,
    context or target set is refused with one line."""
    trainer, _, out, _ = reference
    adapted, _ = jp.load(base, adapter=out)
    want = logits(adapted, TOKENS)
    cfg = twin_cfg(corpus, base, tmp_path / "next", f"lora.init_from={out}", "steps=2")
    second = Trainer(cfg, log_fn=lambda m: None)
    try:
        got = logits(second.nnx_model(), TOKENS)
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
        assert second.fit().step == 2
        assert not np.array_equal(logits(second.nnx_model(), TOKENS), got)  # it trains on
    finally:
        second.close()
    for overrides, message in (
            (["lora.rank=2"], "rank 4 and alpha 8, this run rank 2"),
            (["model.overrides.max_position_embeddings=512"], "max_position_embeddings"),
            (["lora.targets=[q, k]"], "also adapts"),
            ([f"lora.init_from={tmp_path}/missing.safetensors"], "missing.safetensors")):
        with pytest.raises(jp.ConfigError, match=message) as e:
            Trainer(twin_cfg(corpus, base, tmp_path / "bad", f"lora.init_from={out}",
                             *overrides), log_fn=lambda m: None)
        assert "\n" not in str(e.value)


def recipe(name: str) -> TrainConfig:
    return TrainConfig.load(os.path.join(ROOT, "configs", "train", name))


def test_32k_recipe_stages_chain():
    """Stage 2 of the shipped 32K adapter starts from stage 1's adapter and keeps its model,
    LoRA shape and answer weight (an adapter only fits the run that shaped it)."""
    one, two = recipe("smollm2-32k-lora.yaml"), recipe("smollm2-32k-lora-stage2.yaml")
    stage1_adapter = os.path.join(one.output_dir, "adapter.safetensors")
    assert os.path.abspath(two.lora.init_from) == stage1_adapter
    assert two.output_dir != one.output_dir
    shape = [(c.model.overrides, c.model.pretrained, c.lora.targets, c.lora.rank, c.lora.alpha,
              c.lora.train_norms, c.data.seq_len, c.data.span_weight) for c in (one, two)]
    assert shape[0] == shape[1]
