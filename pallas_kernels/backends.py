"""Which implementation runs an op, and why: one resolver per op over declared backends.

Every op (block-sparse attention, the estimation kernels, MLA decode) lists its backends in
preference order. Each backend says, for a concrete call, either nothing (it runs the call) or
one line saying why not (wrong device, dtype, head dims, layout features, shared memory).

* ``impl="auto"`` takes the first backend that runs the call; the choice and the reasons the
  earlier ones declined are logged at debug level (``logging.getLogger("pallas_kernels")``).
* A named ``impl`` runs that backend or raises ``ValueError`` with its reason: there is no
  silent fallback to another implementation.

Names are shared by every op:

    reference    float32 jnp, materializes what it needs (tests; small inputs)
    xla          jnp written for speed (gathers, fused reductions); runs anywhere
    triton       Pallas lowered through Triton (NVIDIA GPUs)
    mosaic_gpu   Pallas Mosaic GPU (Hopper: TMA + wgmma)
    mosaic_tpu   Pallas Mosaic TPU

``interpret=True`` runs a Pallas backend in interpret mode on any device (tests on CPUs): the
device checks are skipped, the other checks still apply.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax

NAMES = ("reference", "xla", "triton", "mosaic_gpu", "mosaic_tpu")

log = logging.getLogger("pallas_kernels")


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    name: a backend name (``NAMES`` for kernels; ops may add their own, e.g. "cudnn").
    platforms: device platforms it runs on natively ("cpu", "gpu", "tpu"); empty = any.
    why_not: call -> None when it runs the call, else one line saying why not (device checks
      excluded: ``platforms`` covers them).
    auto: False keeps it out of ``impl="auto"`` (opt-in backends, references).
    prefer_not: call -> None, or why "auto" passes over it for this call although it could
      run it (a measured preference, e.g. "decode runs faster elsewhere"); named, it runs.
    """

    name: str
    platforms: tuple[str, ...] = ()
    why_not: Callable[[Any], str | None] = lambda call: None
    auto: bool = True
    auto_note: str = ""  # why an opt-in backend is not chosen by "auto"
    prefer_not: Callable[[Any], str | None] = lambda call: None

    def refusal(self, call: Any, platform: str, interpret: bool) -> str | None:
        if self.platforms and platform not in self.platforms and not interpret:
            return f"runs on {'/'.join(self.platforms)}, not {platform}"
        return self.why_not(call)


def platform() -> str:
    """The default device's platform: "cpu", "gpu" (CUDA or ROCm) or "tpu"."""
    p = jax.default_backend()
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


def resolve(op: str, backends: Sequence[Backend], impl: str, call: Any, *,
            interpret: bool = False) -> str:
    """The backend of ``backends`` that runs ``call`` (see the module docstring)."""
    names = [b.name for b in backends]
    plat = platform()
    if impl != "auto":
        if impl not in names:
            raise ValueError(f"{op}: unknown impl {impl!r}; choose one of {['auto'] + names}")
        backend = backends[names.index(impl)]
        reason = backend.refusal(call, plat, interpret)
        if reason is not None:
            raise ValueError(f"{op}: impl={impl!r} cannot run this call: {reason}")
        return impl
    declined = []
    for backend in backends:
        reason = backend.refusal(call, plat, False)
        if reason is None and not backend.auto:
            reason = backend.auto_note or "opt-in only"
        if reason is None:
            reason = backend.prefer_not(call)
        if reason is None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: %s on %s%s", op, backend.name, plat,
                          "".join(f"; not {n}: {r}" for n, r in declined))
            return backend.name
        declined.append((backend.name, reason))
    raise ValueError(f"{op}: no implementation runs this call on {plat}: "
                     + "; ".join(f"{n}: {r}" for n, r in declined))


def explain(backends: Sequence[Backend], call: Any, *, interpret: bool = False) -> dict[str, str]:
    """{backend name: "runs" or why not} for ``call`` on the default device (docs, debugging)."""
    plat = platform()
    return {b.name: b.refusal(call, plat, interpret) or "runs" for b in backends}


__all__ = ["Backend", "NAMES", "explain", "platform", "resolve"]
