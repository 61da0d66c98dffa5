"""The timing helper every script uses: median milliseconds per call of a jitted function.

    from scripts.common.timing import time_ms

    t = time_ms(f, q, k, v, warmup=2, reps=10)         # t.ms: median ms per call
    t = time_ms(f, q, k, v, sample_ms=30, reps=7)      # short kernels: queued calls per sample

What a number means, in every script: wall time on the host around ``jax.block_until_ready``,
after ``warmup`` untimed calls (compilation, autotuning and first allocations stay out), per
call, median over ``reps`` samples. A sample is ``calls`` calls issued back to back and then
blocked on together (all their outputs). JAX dispatches asynchronously and a device runs its
queue in order, so a sample of several calls measures the device's time per call with the
host's launch cost hidden behind the previous call; a sample of one call also counts that
launch and the final synchronization. Kernels of a millisecond or less, timed one call at a
time from the host, varied by up to 3x on an H100 (dispatch noise): time those with
``calls`` > 1, or ``sample_ms`` to pick ``calls`` so that a sample lasts at least that long.

Nothing here uses CUDA events or ``triton.testing.do_bench``: host clock and
``block_until_ready`` work for every backend (CPU smoke runs included) and for programs that
span several GPUs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax


@dataclasses.dataclass(frozen=True)
class Timing:
    """Result of :func:`time_ms`.

    ms: median milliseconds per call over the samples.
    samples_ms: each sample's milliseconds per call (its wall time / ``calls``), in order.
    calls: calls per sample.
    """

    ms: float
    samples_ms: tuple[float, ...]
    calls: int


def _call_ms(fn: Callable[..., Any], args: tuple, n: int) -> float:
    """Milliseconds per call of ``n`` back-to-back calls, blocked on all their outputs."""
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(n)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - t0) * 1e3 / n


def time_ms(fn: Callable[..., Any], *args: Any, warmup: int = 1, reps: int = 7, calls: int = 1,
            sample_ms: float | None = None, max_calls: int = 50,
            budget_ms: float | None = None) -> Timing:
    """Median milliseconds per call of ``fn(*args)`` (see the module docstring).

    warmup: untimed calls first, each blocked on (>= 0).
    reps: samples (>= 1).
    calls: calls per sample (>= 1), unless ``sample_ms`` is given.
    sample_ms: time one more call after the warm-up and take
        ``calls = clamp(sample_ms // that call's ms, 1, max_calls)``.
    budget_ms: if ``reps`` samples would take longer than this (from that one call's time),
        take a single sample instead (slow variants of a sweep). Needs ``sample_ms``.
    """
    if warmup < 0 or reps < 1 or calls < 1 or max_calls < 1:
        raise ValueError(f"time_ms: need warmup >= 0, reps >= 1, calls >= 1, max_calls >= 1; "
                         f"got warmup={warmup}, reps={reps}, calls={calls}, "
                         f"max_calls={max_calls}")
    if budget_ms is not None and sample_ms is None:
        raise ValueError("time_ms: budget_ms is judged from the call that sample_ms times; "
                         "pass sample_ms too")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    if sample_ms is not None:
        one = _call_ms(fn, args, 1)
        calls = max(1, min(max_calls, int(sample_ms / max(one, 1e-3))))
        if budget_ms is not None and one * calls * reps >= budget_ms:
            reps = 1
    samples = tuple(_call_ms(fn, args, calls) for _ in range(reps))
    return Timing(ms=statistics.median(samples), samples_ms=samples, calls=calls)
