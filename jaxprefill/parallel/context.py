"""`ContextParallel`: the context-parallel setting of attention, and what models do with it.

    mesh = jp.make_mesh(sequence=8)
    spec = AttentionSpec(context=ContextParallel(mesh))      # static: part of the jit key
    model = jp.Llama(cfg, rngs=nnx.Rngs(0), attention=spec)
    logits = make_forward(model, mesh)(tokens)               # make_forward sets it by itself

With a context setting, a fresh prefill (no ``cache_index``) runs in *ring order*
(:mod:`jaxprefill.parallel.zigzag`): the model pads the prompt to
:meth:`ContextParallel.padded_length` (a multiple of ring chunks x ``block``), permutes token
ids, positions and segment ids (:meth:`ContextParallel.enter`), runs every layer on that order
with the length axis sharded over ``axis``, and restores the natural order of its hidden states
at the end (:meth:`ContextParallel.exit`). Attention (`jaxprefill.attention.attend`) runs the
ring (:mod:`jaxprefill.parallel.ring`). Padding sits after every real token, so causal
attention never lets a real token see it; ``lengths`` tells sparse estimators where a row ends.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxprefill.parallel import zigzag
from jaxprefill.sharding import logical_to_spec

try:  # jax >= 0.6
    shard_map = jax.shard_map
except AttributeError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map

SCHEDULES = ("auto", "pass_kv", "pass_q")
KERNELS = ("auto", "reference", "xla", "triton", "mosaic_gpu", "mosaic_tpu")


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """Attention split over the ``axis`` of ``mesh`` (hashable: a field of `AttentionSpec`).

    mesh: the device mesh (`jaxprefill.sharding.make_mesh`); batch rows follow its
      `data`/`fsdp` axes and heads its `tensor` axis where they divide, so no device computes
      another device's rows or heads.
    axis: the mesh axis the sequence is split over (size n = the ring length).
    schedule: for chunks over a cached prefix (calls with ``q_offset``): "pass_kv" (K/V shards
      travel), "pass_q" (query shards travel) or "auto" (the cost rule of
      :mod:`jaxprefill.parallel.plan`). A whole prompt always passes K/V (zigzag balances it).
    zigzag: load-balanced token assignment (2 chunks per device) for prompts; False: one
      contiguous chunk per device (device n - 1 then does n times device 0's causal work).
    block: query/key block of the ring's kernel calls (dense) and the granule of its chunks:
      prompts are padded to a multiple of ``2n x block`` (zigzag) or ``n x block``. A sparse
      policy's ``block_size`` must divide the chunk.
    kernel: the block-sparse implementation of every step ("auto" or a name of
      `pallas_kernels.block_sparse_attention`; "auto" takes the sparse config's kernel).
      Differentiable calls (training) need "xla" or "reference"; there "auto" with no sparse
      kernel named runs "xla" (:mod:`jaxprefill.parallel.backward`).
    interpret: run Pallas kernels in interpret mode (True or a `pltpu.InterpretParams`).
    skip_empty: sparse layouts: a ring step whose visiting shard holds no listed block runs no
      kernel (a `lax.cond`; results are the same either way).
    merge_every: ring steps whose partial outputs join the float32 accumulator in one pass
      (each pass reads and writes it). The default 8 merges once per device on rings of up
      to 8 (on one GPU at 128K, 8 shards: 1.043x the unsplit kernel, 1.056x at 2) and holds
      min(n, 8) partial outputs, [B, S/n, Hq, Dv] each; 2 holds two (the least memory that
      still halves the passes; docs/context_parallel.md).
    """

    mesh: Mesh
    axis: str = "sequence"
    schedule: str = "auto"
    zigzag: bool = True
    block: int = 128
    kernel: str = "auto"
    interpret: Any = False
    skip_empty: bool = True
    merge_every: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.mesh, Mesh):
            raise ValueError(f"ContextParallel.mesh must be a jax.sharding.Mesh, got "
                             f"{type(self.mesh).__name__}")
        if self.axis not in self.mesh.axis_names:
            raise ValueError(f"ContextParallel.axis={self.axis!r} is not a mesh axis "
                             f"{tuple(self.mesh.axis_names)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"ContextParallel.schedule={self.schedule!r}; choose one of "
                             f"{SCHEDULES}")
        if self.block < 8 or self.block & (self.block - 1):
            raise ValueError(f"ContextParallel.block must be a power of two >= 8, got "
                             f"{self.block}")
        if self.merge_every < 1:
            raise ValueError(f"ContextParallel.merge_every must be >= 1, got {self.merge_every}")
        if self.kernel not in KERNELS:
            raise ValueError(f"ContextParallel.kernel={self.kernel!r}; choose one of {KERNELS}")

    # ----------------------------------------------------------------------------- geometry
    @property
    def n(self) -> int:
        """Devices on the ring."""
        return int(self.mesh.shape[self.axis])

    @property
    def chunks_per_device(self) -> int:
        return zigzag.chunks_per_device(self.zigzag)

    def padded_length(self, length: int) -> int:
        """The prompt length a prefill of ``length`` tokens runs at (a multiple of the chunks
        times ``block``)."""
        granule = self.n * self.chunks_per_device * self.block
        return -(-max(int(length), 1) // granule) * granule

    def batch_axes(self, batch: int) -> Any:
        """The mesh axes batch rows are split over (a PartitionSpec entry), or None."""
        entry = logical_to_spec(("batch",), (batch,), self.mesh)[0]
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        axes = tuple(a for a in axes if a != self.axis)
        return None if not axes else axes[0] if len(axes) == 1 else axes

    def head_axis(self, hq: int, hkv: int) -> str | None:
        """`tensor` when it splits both the query and the KV heads, else None (replicated)."""
        t = int(self.mesh.shape.get("tensor", 1))
        if t > 1 and self.axis != "tensor" and hq % t == 0 and hkv % t == 0:
            return "tensor"
        return None

    def sharding(self, batch: int, ndim: int, length_axis: bool = True) -> NamedSharding:
        """NamedSharding of a [B, S, ...] activation: batch rows and (optionally) the length."""
        spec = (self.batch_axes(batch), self.axis if length_axis else None)
        return NamedSharding(self.mesh, P(*spec, *([None] * (ndim - 2))))

    # ------------------------------------------------------------------------- model hooks
    def enter(self, tokens: jax.Array, positions: jax.Array | None,
              segment_ids: jax.Array | None, lengths: jax.Array | None
              ) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
        """A fresh prefill's inputs [B, S] -> padded to :meth:`padded_length` and in ring order.

        Returns (tokens, positions, segment_ids, lengths). Padding tokens are id 0, at positions
        S, S + 1, ... and segment id 0, after every real token. ``lengths`` (valid tokens per
        row, read by sparse estimation) becomes S when it was None and padding was added.
        """
        b, s = tokens.shape
        total = self.padded_length(s)
        pad = total - s
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        if pad:
            tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
            tail = positions[:, -1:] + 1 + jnp.arange(pad, dtype=positions.dtype)[None, :]
            positions = jnp.concatenate([positions, tail], axis=1)
            if segment_ids is not None:
                segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
            if lengths is None:
                lengths = jnp.full((b,), s, jnp.int32)
        ring = lambda x: zigzag.to_ring(x, self.n, self.zigzag)  # noqa: E731
        tokens = jax.lax.with_sharding_constraint(ring(tokens), self.sharding(b, 2))
        positions = ring(positions)
        segment_ids = None if segment_ids is None else ring(segment_ids)
        return tokens, positions, segment_ids, lengths

    def natural(self, x: jax.Array) -> jax.Array:
        """A [B, S, ...] array in ring order (S = a padded length) -> natural order, moved between
        devices by two collective permutes (no device holds more than its shard)."""
        if not self.zigzag or self.n == 1:
            return x
        spec = self.sharding(x.shape[0], x.ndim).spec
        fn = shard_map(lambda t: zigzag.from_ring_local(t, self.axis, self.n, self.zigzag),
                       mesh=self.mesh, in_specs=(spec,), out_specs=spec, check_vma=False)
        return fn(x)

    def exit(self, x: jax.Array, length: int) -> jax.Array:
        """Hidden states [B, S_padded, E] in ring order -> natural order, the first ``length``."""
        return self.natural(x)[:, :length]


__all__ = ["ContextParallel", "KERNELS", "SCHEDULES", "shard_map"]
