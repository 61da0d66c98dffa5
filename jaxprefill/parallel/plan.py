"""Which ring schedule a chunk over a cached prefix runs: pass-KV or pass-Q.

A chunk of ``T`` new tokens attends to ``P`` cached tokens plus itself, split over ``n``
devices (T / n queries and (T + P) / n keys each). Per ring step a device computes its queries
against one visiting key shard and sends one shard on:

    compute per step   F = 4 (T / n) ((T + P) / n) Hq D          FLOPs (QK^T and PV, full blocks)
    pass-KV sends      2 ((T + P) / n) Hkv D e                   bytes (K and V of a shard)
    pass-Q sends       (T / n) Hq D e                            bytes (one query shard; the
                                                                  partial outputs return once,
                                                                  by an all-to-all at the end)

with e bytes per element. Pass-KV's transfer hides behind the step's compute when
``bytes / bandwidth <= F / flops``, i.e. ``T >= n * flops * Hkv * e / (2 * Hq * bandwidth)``;
pass-KV moves fewer bytes than pass-Q when ``T / (T + P) >= 2 Hkv / Hq``. The rule (the one of
Yang et al. 2024, "Context Parallelism for Scalable Million-Token Inference", derived here):
pass-KV if either holds, else pass-Q (a short chunk over a long prefix, the cache hit case).

``flops`` and ``bandwidth`` are the achieved attention FLOP/s of one device and the one-way
bandwidth of one ring link. :data:`HARDWARE` holds the values used when none are given;
they are modelled, not measured on a ring (see docs/context_parallel.md).
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Hardware:
    """flops: attention FLOP/s one device sustains; bandwidth: bytes/s one way over a link."""

    flops: float
    bandwidth: float


HARDWARE = {
    # H100: the block-sparse kernel's 639 TFLOP/s at 128K (docs/performance.md); NVLink 4 at
    # 450 GB/s each way (900 GB/s per GPU both ways, the NVIDIA datasheet).
    "gpu": Hardware(639e12, 450e9),
    # TPU v5p: 459 TFLOP/s bf16 peak at an assumed 60% in attention; one ICI link ~100 GB/s
    # each way (4,800 Gbps per chip over 6 links, Google's published figure).
    "tpu": Hardware(0.6 * 459e12, 100e9),
    # CPU runs (tests): any value works; the rule only matters where transfers cost time.
    "cpu": Hardware(1e12, 10e9),
}


def default_hardware() -> Hardware:
    return HARDWARE.get(jax.default_backend(), HARDWARE["cpu"])


def hides_behind_compute(new: int, n: int, hq: int, hkv: int, itemsize: int,
                         hw: Hardware) -> bool:
    """Pass-KV's per-step transfer takes no longer than the step's compute."""
    return new * 2 * hq * hw.bandwidth >= n * hw.flops * hkv * itemsize


def choose_schedule(new: int, cached: int, n: int, hq: int, hkv: int, itemsize: int,
                    hw: Hardware | None = None) -> str:
    """"pass_kv" or "pass_q" for a chunk of ``new`` tokens over ``cached`` ones (module doc).

    Args:
      new: T, the chunk's tokens; cached: P, tokens before it in the cache.
      n: devices on the ring; hq, hkv: query and KV heads; itemsize: bytes per element.
      hw: device numbers (default :func:`default_hardware`).
    """
    hw = hw or default_hardware()
    if new <= 0:
        raise ValueError(f"choose_schedule: a chunk needs >= 1 new token, got {new}")
    fewer_bytes = new * hq >= 2 * hkv * (new + max(int(cached), 0))
    return "pass_kv" if fewer_bytes or hides_behind_compute(new, n, hq, hkv, itemsize, hw) \
        else "pass_q"


def ring_bytes(schedule: str, new: int, cached: int, n: int, hq: int, hkv: int, dqk: int,
               dv: int, itemsize: int) -> float:
    """Bytes one device sends over a whole ring pass (n - 1 steps; pass-Q adds the return of
    its partial outputs, float32 with their lse)."""
    if schedule == "pass_kv":
        return (n - 1) * (new + cached) / n * hkv * (dqk + dv) * itemsize
    q = (n - 1) * new / n * hq * dqk * itemsize
    back = (n - 1) * new / n * hq * (dv + 1) * 4
    return q + back


__all__ = ["HARDWARE", "Hardware", "choose_schedule", "default_hardware",
           "hides_behind_compute", "ring_bytes"]
