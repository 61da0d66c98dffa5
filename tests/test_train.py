"""Training recipes end to end on CPU: loss goes down, resume is bitwise exact, configs fail loudly.

Each Trainer compiles its init and step (5-10 s each on a small CPU), so runs are tiny, one
reference run is shared, and a persistent compilation cache lets identical programs (the
reference, the preempted and the resumed run) compile once.
"""

from __future__ import annotations

import glob
import os
import signal
import tempfile

import jax
import numpy as np
import pytest

from jaxprefill.config import ConfigError
from jaxprefill.data import build_corpus
from jaxprefill.train import TrainConfig, Trainer
from jaxprefill.train.metrics import read_events, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "train", "tiny-cpu.yaml")
JIT_CACHE = os.path.join(tempfile.gettempdir(), "jaxprefill-test-jit-cache")


def enable_compilation_cache() -> None:
    jax.config.update("jax_compilation_cache_dir", JIT_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:  # another test module may have compiled first, which fixes the cache as "off"
        from jax._src import compilation_cache
        compilation_cache.reset_cache()
    except Exception:  # private API: losing it only costs time
        pass


enable_compilation_cache()

# Shared by the reference, preempted and resumed runs (identical programs -> one compile).
RUN = ["steps=12", "batch_size=8", "data.seq_len=64", "optim.warmup_steps=3", "log.every=1",
       "log.eval_every=0", "log.eval_batches=1", "checkpoint.every=4", "checkpoint.keep=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    stats = build_corpus(out, max_files=120, val_fraction=0.1)
    assert stats["train"] > 50 and stats["validation"] > 0
    return out


def tiny_cfg(corpus, out_dir, *overrides) -> TrainConfig:
    return TrainConfig.load(RECIPE, [f"output_dir={out_dir}",
                                     f"data.train=[{corpus}/train.jsonl]",
                                     f"data.validation=[{corpus}/validation.jsonl]",
                                     "log.progress=false", *overrides])


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if "loss" in r}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted 12-step tiny-cpu run: (output dir, result, final train state on host)."""
    out = tmp_path_factory.mktemp("reference")
    trainer = Trainer(tiny_cfg(corpus, out, *RUN))
    result = trainer.fit()
    state = jax.device_get(trainer.state)
    trainer.close()
    return out, result, state


def test_tiny_cpu_loss_decreases_and_logs(reference):
    out, result, _ = reference
    assert result.status == "finished" and result.step == 12
    ls = losses(out)
    assert sorted(ls) == list(range(1, 13))
    first, last3 = ls[1], np.mean([ls[s] for s in (10, 11, 12)])
    assert first > 5.0                 # ~ln(258): random init over byte ids
    assert last3 < first - 1.0, ls
    assert result.val_loss is not None and result.val_loss < first - 1.0
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert any("tokens_per_s" in r and r["tokens_per_s"] > 0 for r in records)
    assert all(r["lr"] <= 3e-3 + 1e-9 for r in records if "lr" in r)
    # TensorBoard events carry the same losses (CRCs checked by the reader).
    (events,) = glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
    tb = {step: v["loss"] for step, v in read_events(events) if "loss" in v}
    assert sorted(tb) == sorted(ls)
    assert all(abs(tb[s] - ls[s]) <= 1e-6 * abs(ls[s]) for s in ls)
    # periodic + final checkpoints, only the last `keep` kept
    assert sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit()) == [8, 12]


def test_sigterm_then_resume_is_bitwise_identical(corpus, reference, tmp_path):
    ref_dir, _, ref_state = reference

    def preempt(trainer, step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # what a preemptible VM receives

    first = Trainer(tiny_cfg(corpus, tmp_path, *RUN))
    assert first.resumed_from is None
    r1 = first.fit(callback=preempt)
    first.close()
    assert (r1.status, r1.step) == ("preempted", 7)
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [4, 7]

    messages = []  # the same "command" again: resumes from step 7 and says so
    second = Trainer(tiny_cfg(corpus, tmp_path, *RUN), log_fn=messages.append)
    assert second.resumed_from == 7
    assert any("resumed from checkpoint step 7" in m for m in messages)
    r2 = second.fit()
    state = jax.device_get(second.state)
    second.close()
    assert (r2.status, r2.step) == ("finished", 12)

    flat_ref = jax.tree_util.tree_leaves_with_path(ref_state)
    flat = jax.tree_util.tree_leaves(state)
    assert len(flat_ref) == len(flat)
    for (path, a), b in zip(flat_ref, flat):  # params, optimizer moments, step, RNG: bitwise
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
    ref_losses, run_losses = losses(ref_dir), losses(tmp_path)
    assert sorted(run_losses) == list(range(1, 13))
    assert all(ref_losses[s] == run_losses[s] for s in range(1, 13)), (ref_losses, run_losses)
    assert any(r.get("event") == "resume" for r in read_jsonl(tmp_path / "metrics.jsonl"))


def test_bad_config_keys_are_named(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        tiny_cfg(corpus, tmp_path, "optim.lrr=1")
    with pytest.raises(ConfigError, match=r"unknown key.*'colour'"):
        tiny_cfg(corpus, tmp_path, "colour=blue")
    with pytest.raises(ConfigError, match=r"steps.*integer"):
        tiny_cfg(corpus, tmp_path, "steps=ten")
    with pytest.raises(ConfigError, match=r"model\.remat"):
        tiny_cfg(corpus, tmp_path, "model.remat=sometimes")
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        tiny_cfg(corpus, tmp_path, "optim.lr=fast")
    with pytest.raises(ConfigError, match=r"data\.seq_len"):
        tiny_cfg(corpus, tmp_path, "data.seq_len=0")
    with pytest.raises(ConfigError, match=r"grad_accum"):
        tiny_cfg(corpus, tmp_path, "optim.grad_accum=3")  # batch 8 does not split in 3
    with pytest.raises(ConfigError, match=r"model\.overrides.*hidden_sise"):
        Trainer(tiny_cfg(corpus, tmp_path, "model.overrides={hidden_sise: 64}"))
    assert tiny_cfg(corpus, tmp_path, "optim.lr=3e-4").optim.lr == 3e-4  # YAML's "3e-4" string

    from jaxprefill.cli import main
    assert main(["train", "--config", RECIPE, "optim.betas=1"]) == 2


def test_recipes_parse():
    recipes = sorted(glob.glob(os.path.join(ROOT, "configs", "train", "*.yaml")))
    names = {os.path.basename(p)[:-5] for p in recipes}
    assert {"tiny-cpu", "smollm2-longctx", "llama-1b-bench"} <= names
    for path in recipes:
        cfg = TrainConfig.load(path)
        assert os.path.isabs(cfg.output_dir)
    longctx = TrainConfig.load(os.path.join(ROOT, "configs", "train", "smollm2-longctx.yaml"))
    assert longctx.model.pretrained == "smollm2-135m-instruct"
    assert longctx.data.seq_len == 32768
