"""Meshes and the one table that maps logical parameter axes to mesh axes.

Mesh axes: `data` (batch), `fsdp` (batch + parameter sharding), `tensor` (heads / MLP / vocab),
`sequence` (tokens of long prefill), `expert` (MoE experts). A logical axis whose size does not
divide by its mesh axes is replicated instead (e.g. SmolLM2's 3 KV heads on tensor=4), so every
model runs on every mesh; `describe_sharding` shows what happened.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence", "expert")

# logical axis -> mesh axis (or tuple of mesh axes). The only place this mapping lives.
LOGICAL_RULES: dict[str, Any] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
    "batch": ("data", "fsdp"),
    "length": "sequence",
    "expert": "expert",
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, sequence: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `data x fsdp x tensor x sequence x expert` devices (all local devices must be
    used exactly; pass `devices` to use a subset)."""
    sizes = (data, fsdp, tensor, sequence, expert)
    if any(s < 1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be >= 1, got {dict(zip(MESH_AXES, sizes))}")
    devices = list(jax.devices() if devices is None else devices)
    n = math.prod(sizes)
    if n != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {n} devices, "
                         f"{len(devices)} are available")
    kwargs = {}
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:  # Auto: let GSPMD propagate shardings inside jit
        kwargs["axis_types"] = (axis_type.Auto,) * len(MESH_AXES)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, **kwargs)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: dict[str, Any] = LOGICAL_RULES) -> P:
    """PartitionSpec for a value with logical `axes`; axes that don't divide are replicated and
    a mesh axis is used at most once."""
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t in mesh.shape and mesh.shape[t] > 1 and t not in used)
        if targets and size % math.prod(mesh.shape[t] for t in targets) == 0:
            used.update(targets)
            spec.append(targets[0] if len(targets) == 1 else targets)
        else:
            spec.append(None)
    return P(*spec)


def state_shardings(abstract_state: nnx.State, mesh: Mesh) -> nnx.State:
    """A NamedSharding for every parameter of an (abstract) NNX state, from its `axes`."""
    def one(var):
        axes = var.get_metadata().get("axes") or (None,) * len(var.shape)
        return NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh))
    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh | None, batch: int, ndim: int = 2) -> NamedSharding | None:
    """Sharding for activations [B, ...]: batch over (data, fsdp) when it divides."""
    if mesh is None:
        return None
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), (batch,) + (1,) * (ndim - 1), mesh)
    return NamedSharding(mesh, spec)


def place(value_fn: Callable[[tuple[slice, ...]], np.ndarray], shape: tuple[int, ...], dtype,
          sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Build a device array from a host callback that returns the block at a given index.

    Each device receives only its own shard (no full copy per device).
    """
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.make_array_from_callback(shape, sharding,
                                        lambda idx: np.asarray(value_fn(idx), dtype=dtype))


def describe_sharding(state: nnx.State) -> dict[str, tuple]:
    """{param path: partition spec as a tuple of mesh axes} for a concrete state (logs, tests)."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var[...] if isinstance(var, nnx.Variable) else var
        spec = getattr(value.sharding, "spec", ())
        out["/".join(map(str, path))] = tuple(spec) + (None,) * (value.ndim - len(spec))
    return out
