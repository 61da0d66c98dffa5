"""`Trainer`: ties config, model, data, optimizer, the jitted step, checkpoints and metrics.

    from jaxprefill.train import Trainer, TrainConfig
    trainer = Trainer(TrainConfig.load("configs/train/tiny-cpu.yaml"))
    result = trainer.fit()          # resumes from <output_dir>/checkpoints if there is one

Output directory: config.yaml (the resolved config), metrics.jsonl, tensorboard/, checkpoints/,
export/ (when checkpoint.export_at_end), adapter.safetensors (LoRA runs, at the end of every
`fit` that is not preempted). Only process 0 writes logs; orbax coordinates saves across hosts
itself.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprefill import lora
from jaxprefill.config import ConfigError
from jaxprefill.loading.adapter import ADAPTER_FILE
from jaxprefill.parallel import ContextParallel
from jaxprefill.sharding import LOGICAL_RULES, logical_to_spec, make_mesh
from jaxprefill.train import mfu as mfu_lib
from jaxprefill.train.checkpoint import Checkpointer, StopSignal, abstract_like
from jaxprefill.train.config import MeshSection, TrainConfig, config_diff
from jaxprefill.train.export import adapter_metadata, export_adapter, export_hf
from jaxprefill.train.metrics import MetricsLog, ProgressLine
from jaxprefill.train.model import SplitModel, build, merged
from jaxprefill.train.optimizer import make_optimizer
from jaxprefill.train.step import (StepOptions, init_state, make_eval_step, make_train_step,
                                   state_shardings)

# data.packing modes whose rows hold one document (+ padding): plain causal attention suffices
ONE_DOCUMENT_ROWS = ("none", "document")


@dataclasses.dataclass
class TrainResult:
    step: int                 # steps completed (the train state's step)
    status: str               # "finished" | "preempted" | "stopped"
    last: dict[str, Any]      # the last metrics record
    val_loss: float | None


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` on multi-host launches (coordinator env set, SLURM with
    several tasks, or a multi-worker TPU slice); a no-op on one host."""
    env = os.environ
    multi = (env.get("JAX_COORDINATOR_ADDRESS") or int(env.get("SLURM_NTASKS", "1")) > 1
             or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
    if multi and not getattr(jax.distributed, "is_initialized", lambda: False)():
        jax.distributed.initialize()


def build_mesh(m: MeshSection):
    """The run's mesh. `data: -1` fills all devices; a smaller explicit mesh uses the first
    devices (one host only: debugging, or comparing against fewer devices)."""
    n = jax.device_count()
    data = m.data if m.data != -1 else n // (m.fsdp * m.tensor * m.expert * m.sequence)
    used = data * m.fsdp * m.tensor * m.expert * m.sequence
    if data < 1 or used > n or (used < n and (m.data == -1 or jax.process_count() > 1)):
        raise ConfigError(f"mesh: data={m.data} x fsdp={m.fsdp} x tensor={m.tensor} x "
                          f"expert={m.expert} x sequence={m.sequence} does not fit the {n} "
                          f"devices")
    return make_mesh(data=data, fsdp=m.fsdp, tensor=m.tensor, expert=m.expert,
                     sequence=m.sequence, devices=jax.devices()[:used])


def ring_context(mesh: jax.sharding.Mesh, seq_len: int) -> ContextParallel | None:
    """Ring attention over the mesh's `sequence` axis when it has n > 1 devices, else None.

    Training runs the differentiable "xla" kernel. The ring pads a row to a multiple of
    2n x block tokens; the block is the smallest power of two (8..128) that makes 2n chunks of
    ``seq_len``, so a seq_len that is a multiple of 2n x 8 runs with no padding."""
    n = int(mesh.shape["sequence"])
    if n == 1:
        return None
    chunk = -(-seq_len // (2 * n))
    block = min(128, max(8, 1 << (chunk - 1).bit_length()))
    return ContextParallel(mesh, block=block, kernel="xla")


# Batch rows are split over the expert axis too: its devices hold different experts but must not
# compute the same rows (the usual expert-parallel layout; GSPMD moves tokens to their experts).
BATCH_RULES = {**LOGICAL_RULES, "batch": ("data", "fsdp", "expert")}


class Trainer:
    def __init__(self, cfg: TrainConfig, *, log_fn: Callable[[str], None] | None = None) -> None:
        maybe_initialize_distributed()
        self.cfg = cfg
        self.is_main = jax.process_index() == 0
        self.say = log_fn or (lambda msg: print(f"[train] {msg}", file=sys.stderr, flush=True))
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.mesh = build_mesh(cfg.mesh)
        packed = not ((cfg.data.format == "synthetic" and not cfg.data.synthetic_docs)
                      or (cfg.data.format != "synthetic" and cfg.data.packing in ONE_DOCUMENT_ROWS))
        self.model: SplitModel = build(cfg.model, self.mesh, cfg.seed, cfg.lora,
                                       context=ring_context(self.mesh, cfg.data.seq_len))
        mcfg = self.model.config
        if cfg.lora is not None:
            self.say(self._lora_summary())
        if not packed and cfg.data.format != "synthetic":
            self.say(f"data.packing={cfg.data.packing}: one document per row, plain causal "
                     f"attention (no segment mask)")
        self.tokenizer, self.train_loader, self.val_source = self._data()
        if self.tokenizer is not None and self.tokenizer.vocab_size > mcfg.vocab_size:
            raise ConfigError(f"data.tokenizer has {self.tokenizer.vocab_size} ids but the model's "
                              f"vocab_size is {mcfg.vocab_size} (set model.overrides.vocab_size)")
        if cfg.data.seq_len > mcfg.max_position_embeddings:
            self.say(f"warning: data.seq_len {cfg.data.seq_len} > max_position_embeddings "
                     f"{mcfg.max_position_embeddings}")

        self.tx, self.lr_fn = make_optimizer(cfg.optim, self.model.params, cfg.steps)
        replicated = NamedSharding(self.mesh, P())
        abstract = jax.eval_shape(lambda p: init_state(p, self.tx, cfg.seed), self.model.params)
        self.shardings = state_shardings(self.model.shardings, self.tx, abstract, replicated)
        self.state = jax.jit(lambda p: init_state(p, self.tx, cfg.seed), out_shardings=self.shardings,
                             donate_argnums=0)(self.model.params)  # donated: no second copy
        self.model.params = None  # the train state owns the parameters from here on

        a = cfg.optim.grad_accum
        self.micro_batch = cfg.batch_size // a
        # tokens over `sequence` (context parallelism; the model permutes them into ring order)
        spec = logical_to_spec((None, "batch", "length"), (a, self.micro_batch, cfg.data.seq_len),
                               self.mesh, {**BATCH_RULES, "length": "sequence"})
        self.batch_sharding = NamedSharding(self.mesh, spec)
        self.eval_sharding = NamedSharding(self.mesh, P(*spec[1:]))
        opts = StepOptions(remat=cfg.model.remat, packed=packed,
                           dropout=cfg.lora is not None and cfg.lora.dropout > 0)
        frozen_t, frozen_sh = self.model.frozen_template, self.model.frozen_shardings
        step = make_train_step(self.model.graphdef, self.model.template, self.tx, self.lr_fn, opts,
                               frozen_t)
        # the frozen base (LoRA runs) is an input of every step, never donated or updated
        self.step_fn = jax.jit(step, in_shardings=(self.shardings, self.batch_sharding, frozen_sh),
                               out_shardings=(self.shardings, replicated), donate_argnums=0)
        self.eval_fn = jax.jit(make_eval_step(self.model.graphdef, self.model.template, opts, frozen_t),
                               in_shardings=(self.shardings["params"], self.eval_sharding, frozen_sh),
                               out_shardings=replicated)
        self.frozen_weights = cfg.lora is not None  # no weight gradients for the base
        self.flops_per_token = mfu_lib.flops_per_token(mcfg, cfg.data.seq_len,
                                                       frozen_weights=self.frozen_weights)
        self.peak = mfu_lib.peak_flops()

        self.ckpt = (Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), keep=cfg.checkpoint.keep,
                                  async_save=cfg.checkpoint.async_save)
                     if cfg.checkpoint.enabled else None)
        self.metrics = MetricsLog(cfg.output_dir, tensorboard=cfg.log.tensorboard, enabled=self.is_main)
        if self.is_main:
            with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        self.resumed_from = self._maybe_restore()

    # ---- setup ----------------------------------------------------------------------------------

    def _data(self):
        d, cfg = self.cfg.data, self.cfg
        hosts, host = jax.process_count(), jax.process_index()
        if cfg.batch_size % hosts:
            raise ConfigError(f"batch_size ({cfg.batch_size}) must divide over {hosts} hosts")
        local_batch = cfg.batch_size // hosts
        if d.format == "synthetic":
            from jaxprefill.data.synthetic import SyntheticLoader

            loader = SyntheticLoader(vocab_size=self.model.config.vocab_size, seq_len=d.seq_len,
                                     batch_size=local_batch, seed=d.shuffle_seed + 1000 * host,
                                     documents=d.synthetic_docs)
            return None, loader, None
        from jaxprefill.data import make_loader, make_tokenizer, open_source

        tokenizer = make_tokenizer(d.tokenizer, cfg.model.pretrained)
        weighted = d.span_weight != 1.0
        source = open_source(d.format, d.train, d.text_key, key="data.train",
                             spans_key="loss_spans" if weighted else None)
        loader = make_loader(source, tokenizer, seq_len=d.seq_len, batch_size=local_batch,
                             packing=d.packing, seed=d.shuffle_seed, shard_index=host,
                             shard_count=hosts, add_bos=d.add_bos, add_eos=d.add_eos,
                             workers=d.workers, span_weight=d.span_weight if weighted else None)
        val = open_source(d.format, d.validation, d.text_key, key="data.validation") if d.validation else None
        return tokenizer, loader, val

    def _lora_summary(self) -> str:
        lo = self.cfg.lora
        trained, frozen = _size(self.model.template), _size(self.model.frozen_template)
        extra = [w for w, on in (("norm scales", lo.train_norms), ("biases", lo.train_biases)) if on]
        return (f"lora: rank {lo.rank}, alpha {lo.alpha:g}, dropout {lo.dropout:g} on "
                f"{', '.join(lo.targets)}{' + ' + ', '.join(extra) if extra else ''}: "
                f"{trained:,} trainable parameters, {frozen:,} frozen "
                f"({100 * trained / (trained + frozen):.2f}% trained)")

    def model_meta(self) -> dict[str, Any]:
        """The model description saved in checkpoints and compared on resume: the model config,
        plus the LoRA settings of a LoRA run (they decide the checkpoint's shapes)."""
        meta = self.model.config.to_dict()
        if self.cfg.lora is not None:
            meta["lora"] = dataclasses.asdict(self.cfg.lora)
        return meta

    def _maybe_restore(self) -> int | None:
        """Resume from the newest checkpoint that restores (damaged ones are moved aside with a
        warning each; see checkpoint.py); None when there is none."""
        model_config = self.model_meta()
        restored = None
        if self.ckpt is not None:
            restored = self.ckpt.restore_newest(abstract_like(self.state, self.shardings),
                                                model_config=model_config, warn=self.say)
        if restored is None:
            old = self.metrics.set_aside()  # an earlier run's records would repeat its steps
            self.say(f"starting from scratch in {self.cfg.output_dir}"
                     + (f" (the earlier metrics.jsonl is now {os.path.basename(old)})" if old else ""))
            return None
        step = restored.step
        self.state = restored.state
        self.train_loader.set_state(restored.data_state)
        diff = config_diff(restored.meta.get("model"), model_config)
        if diff:
            self.say(f"warning: the checkpoint's model config differs from this run's: {'; '.join(diff[:5])}"
                     + (f" (+{len(diff) - 5} more)" if len(diff) > 5 else ""))
        self.say(f"resumed from checkpoint step {step} in {self.ckpt.directory}")
        # Steps after `step` run again: their old records go, so each step keeps one record.
        dropped, torn = self.metrics.drop_after(step)
        if dropped or torn:
            self.say(f"metrics.jsonl: dropped {dropped} record(s) after step {step} (replayed)"
                     + (f" and {torn} torn line(s)" if torn else ""))
        self.metrics.write({"event": "resume", "step": step, "time": time.time()})
        return step

    # ---- steps ----------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state["step"]))

    def _next_batch(self) -> dict[str, jax.Array]:
        """This host's rows [local B, S] -> global arrays [A, B/A, S] on the mesh."""
        local = next(self.train_loader)
        a = self.cfg.optim.grad_accum
        out = {}
        for k in ("tokens", "positions", "segment_ids", "loss_weights"):
            if k not in local:  # loss_weights: only with data.span_weight
                continue
            x = np.asarray(local[k], np.float32 if k == "loss_weights" else np.int32)
            x = x.reshape(a, x.shape[0] // a, x.shape[1])
            shape = (a, self.micro_batch, x.shape[2])
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding, x, shape)
        return out

    def evaluate(self) -> float | None:
        """Mean validation loss (nats/token) over the first `log.eval_batches` batches."""
        if self.val_source is None:
            return None
        from jaxprefill.data import make_loader

        d = self.cfg.data
        hosts = jax.process_count()
        loader = make_loader(self.val_source, self.tokenizer, seq_len=d.seq_len,
                             batch_size=self.micro_batch // hosts, packing=d.packing, shuffle=False,
                             repeat=False, shard_index=jax.process_index(), shard_count=hosts,
                             add_bos=d.add_bos, add_eos=d.add_eos)
        total = count = 0.0
        for i, batch in enumerate(loader):
            if i >= self.cfg.log.eval_batches:
                break
            arrays = {k: jax.make_array_from_process_local_data(
                self.eval_sharding, np.asarray(batch[k], np.int32), (self.micro_batch, d.seq_len))
                for k in ("tokens", "positions", "segment_ids")}
            t, c = jax.device_get(self.eval_fn(self.state["params"], arrays, self.model.frozen))
            total, count = total + float(t), count + float(c)
        return total / count if count else None

    def save(self) -> None:
        """Start an (async) checkpoint of the current step, unless it exists or saving is off."""
        if self.ckpt is None:
            return
        step = self.step
        if step in self.ckpt.all_steps():
            return
        meta = {"model": self.model_meta(), "config": self.cfg.to_dict()}
        self.ckpt.save(step, self.state, self.train_loader.get_state(), meta)

    def fit(self, callback: Callable[["Trainer", int], None] | None = None) -> TrainResult:
        """Train to `cfg.steps`. `callback(trainer, step)` runs after every step (tests, hooks)."""
        cfg = self.cfg
        start = self.step
        tokens_per_step = cfg.batch_size * cfg.data.seq_len
        last: dict[str, Any] = {}
        status, val_loss = "finished", None
        pending: list[dict] = []  # device metrics of the steps not yet written
        window: dict[str, Any] = {"start": None, "steps": 0}  # timing of the tokens/s window
        bar = self._progress(start)
        line = self._progress_line(tokens_per_step)

        def flush(done: int) -> None:
            """Write the pending steps' records (the last one with tokens/s and MFU)."""
            nonlocal pending, last
            if not pending:
                return
            records = jax.device_get(pending)
            now = time.perf_counter()
            steps = window["steps"]
            tok_s = (steps * tokens_per_step / (now - window["start"])) if steps else None
            for i, r in enumerate(records):
                last = {"step": done - len(records) + 1 + i, **{k: float(v) for k, v in r.items()}}
                if i == len(records) - 1 and tok_s:
                    last["tokens_per_s"] = tok_s
                    m = mfu_lib.mfu(tok_s, self.model.config, cfg.data.seq_len,
                                    jax.device_count(), self.peak,
                                    frozen_weights=self.frozen_weights)
                    if m is not None:
                        last["mfu"] = m
                self.metrics.write(last)
            pending = []
            window.update(start=now, steps=0)

        t0 = time.perf_counter()
        done = start
        with StopSignal(cfg.checkpoint.save_on_sigterm) as stop:
            for step in range(start, cfg.steps):
                batch = self._next_batch()
                self.state, metrics = self.step_fn(self.state, batch, self.model.frozen)
                pending.append(metrics)
                done = step + 1
                if window["start"] is None:  # the first step includes compilation: time it apart
                    jax.block_until_ready(metrics)
                    window.update(start=time.perf_counter(), steps=0)
                    if line is not None:
                        line.start(done)
                    self.metrics.write({"event": "first_step", "step": done,
                                        "seconds": window["start"] - t0})
                else:
                    window["steps"] += 1
                if line is not None and line.due(done):
                    line.log(done, float(jax.device_get(metrics["loss"])))
                if done % cfg.log.every == 0 or done == cfg.steps:
                    flush(done)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
                if bar is not None:
                    bar.update(1)
                if cfg.log.eval_every and done % cfg.log.eval_every == 0 and done != cfg.steps:
                    self._log_eval(done)
                if done % cfg.checkpoint.every == 0 and done != cfg.steps:
                    self.save()
                if callback is not None:
                    callback(self, done)
                if self._stop_requested(stop):
                    status = "preempted"
                    break
                if self._out_of_time(t0) and done != cfg.steps:
                    status = "stopped"
                    self.say(f"time_limit_s={cfg.time_limit_s} reached at step {done}")
                    break
        flush(done)  # a run that stops between log steps keeps its records
        if bar is not None:
            bar.close()
        self.save()
        if status == "preempted":
            self.say(f"stop requested (SIGTERM): saved step {self.step}; rerun the same command to resume")
        else:
            val_loss = self._log_eval(self.step)
            if cfg.lora is not None and self.is_main:
                out = self.export_adapter(os.path.join(cfg.output_dir, ADAPTER_FILE),
                                          cfg.checkpoint.export_dtype)
                self.say(f"adapter written to {out}")
            if cfg.checkpoint.export_at_end and self.is_main:
                out = self.export(os.path.join(cfg.output_dir, "export"), cfg.checkpoint.export_dtype,
                                  cfg.checkpoint.export_shard_mb)
                self.say(f"exported to {out}")
        if self.ckpt is not None:
            self.ckpt.wait()
        return TrainResult(self.step, status, last, val_loss)

    def _stop_requested(self, stop: StopSignal) -> bool:
        flag = stop.requested
        if jax.process_count() > 1:  # every host must stop at the same step
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
        return flag

    def _out_of_time(self, t0: float) -> bool:
        if self.cfg.time_limit_s is None:
            return False
        flag = time.perf_counter() - t0 > self.cfg.time_limit_s
        if jax.process_count() > 1:  # every host must stop at the same step
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
        return flag

    def _log_eval(self, step: int) -> float | None:
        loss = self.evaluate()
        if loss is not None:
            self.metrics.write({"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))})
            self.say(f"step {step}: validation loss {loss:.4f} (ppl {math.exp(min(loss, 50.0)):.2f})")
        return loss

    def _progress(self, start: int):
        """A tqdm bar when stderr is a terminal (else None: see `_progress_line`)."""
        if not (self.cfg.log.progress and self.is_main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.steps, initial=start, desc="train", dynamic_ncols=True)

    def _progress_line(self, tokens_per_step: int) -> ProgressLine | None:
        """Progress lines every `log.progress_every` (default `log.every`) steps when stderr is
        not a terminal (a log file, a job scheduler), where a tqdm bar would show nothing."""
        if not (self.cfg.log.progress and self.is_main) or sys.stderr.isatty():
            return None
        return ProgressLine(self.say, total=self.cfg.steps, tokens_per_step=tokens_per_step,
                            every=self.cfg.log.progress_every or self.cfg.log.every)

    # ---- outputs --------------------------------------------------------------------------------

    def nnx_model(self):
        """The current parameters as an NNX `Llama` or `DeepSeek` (shares the arrays). A LoRA
        run's adapters are merged into plain weights W + alpha / rank * A @ B."""
        model = merged(self.model, self.state["params"])
        return model if self.cfg.lora is None else lora.merge(model)

    def export_adapter(self, path: str, dtype: str = "float32") -> str:
        """Write the LoRA adapter (factors, trained norms / biases, config overrides) as one
        safetensors file, which `jp.load(base, adapter=path)` applies; returns the path."""
        if self.cfg.lora is None:
            raise ConfigError("export_adapter: this run has no lora section (export() writes the "
                              "whole model)")
        meta = adapter_metadata(self.model.config, self.cfg.lora, self.cfg.model.pretrained,
                                step=self.step)
        return export_adapter(merged(self.model, self.state["params"]), path, meta=meta,
                              trained=[p for p, _ in nnx.to_flat_state(self.model.template)],
                              dtype=dtype)

    def export(self, out_dir: str, dtype: str = "float32", shard_mb: int | None = None) -> str:
        """HF-style directory of the current parameters (a LoRA run's merged into the base) and
        the run's tokenizer, which `jp.load(out_dir)` reads back (`shard_mb`: shard size)."""
        if self.tokenizer is None:
            self.say(f"export: this run has no tokenizer (data.format={self.cfg.data.format}), so "
                     f"{out_dir} holds weights only; jp.load gives tokenizer None (token-id prompts only)")
        return export_hf(self.nnx_model(), out_dir, dtype=dtype, tokenizer=self.tokenizer,
                         add_bos=self.cfg.data.add_bos,
                         max_shard_bytes=None if shard_mb is None else shard_mb * 2**20)

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
        self.metrics.close()


def _size(tree: Any) -> int:
    """Number of elements of every array (or ShapeDtypeStruct) in `tree`."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def train(cfg: TrainConfig, **kwargs) -> TrainResult:
    """Build a `Trainer`, run it to the end (or to a SIGTERM), close it."""
    trainer = Trainer(cfg, **kwargs)
    try:
        return trainer.fit()
    finally:
        trainer.close()
