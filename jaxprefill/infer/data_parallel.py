"""Data parallelism within a host: one engine replica per device, requests dealt round-robin.

`EngineConfig(data_parallel=n)` (or `DataParallelEngine(model, tokenizer, config, devices)`):
replica i lives on device i with the parameters replicated there and its own page pool,
allocator and decode slots (a sequence's pages never leave its device, so no step needs a
collective). Valid requests are dealt round-robin in input order.

The driver advances the replicas' engine loops (`Engine.iterate`) in turn. Each loop yields
right after it dispatches a device call and before it reads the result back, so while the host
waits on one device the others are computing (JAX dispatch is asynchronous). A request's tokens
do not depend on its batch or device, so the outputs equal a one-device engine's.

Across hosts (TPU VM pods, GPU nodes): run one job per host on its shard of the input
(`jaxprefill infer --shard i/n`; each host may use data_parallel over its local devices), then
merge the per-host outputs (`jaxprefill.infer.jobs.merge_outputs`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import jax
from tqdm.auto import tqdm

from jaxprefill.infer.config import EngineConfig
from jaxprefill.infer.engine import Engine, Request, Result, generate_in_order


class DataParallelEngine:
    """`Engine`'s API (`generate`, `run`, `stats`) over one replica per device."""

    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig(),
                 devices: Sequence[jax.Device] | None = None):
        if devices is None:  # this host's devices (a multi-host job shards its input instead)
            local = jax.local_devices()
            if config.data_parallel > len(local):
                raise ValueError(f"data_parallel={config.data_parallel} but this host has only "
                                 f"{len(local)} devices")
            devices = local[:config.data_parallel]
        self.devices = list(devices)
        self.config, self.tokenizer = config, tokenizer
        self.replicas: list[Engine] = []
        for device in self.devices:
            with jax.default_device(device):
                engine = Engine(model, tokenizer, config)
            # committed to the device: every step of this replica runs there
            engine.state = jax.device_put(engine.state, device)
            engine.cache = jax.device_put(engine.cache, device)
            self.replicas.append(engine)

    @property
    def stats(self) -> dict:
        return {k: sum(e.stats[k] for e in self.replicas) for k in self.replicas[0].stats}

    def generate(self, prompts: Iterable, progress: bool = False) -> list[Result]:
        """As `Engine.generate`: results in input order."""
        return generate_in_order(self.run, prompts, progress)

    def run(self, requests: Iterable[Request], on_result: Callable[[Result], None],
            on_error: Callable[[Request, Exception], None] | None = None,
            progress: bool = False, total: int | None = None) -> None:
        """As `Engine.run`; requests dealt round-robin over the replicas."""
        n = len(self.replicas)
        waiting: list[list] = [[] for _ in range(n)]
        count = 0
        for req in requests:
            try:
                seq = self.replicas[count % n].prepare(req)
            except ValueError as e:
                if on_error is None:
                    raise
                on_error(req, e)
                continue
            waiting[count % n].append(seq)
            count += 1
        bar = tqdm(total=total or count, desc="requests", disable=not progress)
        loops = [e.iterate(w, on_result, lambda: bar.update(1))
                 for e, w in zip(self.replicas, waiting)]
        while loops:
            for loop in list(loops):
                try:
                    next(loop)  # this replica: read its last result, dispatch its next call
                except StopIteration:
                    loops.remove(loop)
        bar.close()


def make_engine(model, tokenizer, config: EngineConfig) -> Engine | DataParallelEngine:
    """An `Engine`, or a `DataParallelEngine` when config.data_parallel > 1."""
    if config.data_parallel > 1:
        return DataParallelEngine(model, tokenizer, config)
    return Engine(model, tokenizer, config)
