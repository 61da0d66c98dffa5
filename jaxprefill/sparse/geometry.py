"""Block geometry of one sparse prefill: static sizes, per-row lengths, the forced and causal
blocks every policy shares (:mod:`jaxprefill.sparse.base` applies them), and an optional window
of query-block rows (chunked prefill, :meth:`jaxprefill.sparse.base.Policy.build_rows`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxprefill.sparse.estimation import Estimation


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes plus per-row lengths of one prefill. Blocks are square (block x block)."""

    B: int
    S: int
    Hq: int
    Hkv: int
    D: int
    block: int
    lengths: jax.Array  # int32 [B], valid tokens per row (1..S)
    # Row window (build_rows): query-block rows [row0, row0 + nr) only; None = all n rows.
    row0: jax.Array | None = None  # int32 [B], first query-block row of the window
    nr: int = 0  # static number of rows in the window (when row0 is set)
    estimation: Estimation = Estimation()  # how estimators run (the policy's)

    @property
    def G(self) -> int:
        return self.Hq // self.Hkv

    @property
    def n(self) -> int:
        """Number of query blocks == number of key blocks."""
        return -(-self.S // self.block)

    @property
    def scale(self) -> float:
        return self.D ** -0.5

    @property
    def nq(self) -> int:
        """Number of query-block rows computed: n, or nr for a row window."""
        return self.n if self.row0 is None else self.nr

    def query_rows(self) -> jax.Array:
        """int32 [1 or B, nq]: the global query-block index of each computed row (rows of a
        window may reach past n - 1: they lie in the padding and come out empty)."""
        r = jnp.arange(self.nq, dtype=jnp.int32)[None, :]
        return r if self.row0 is None else self.row0[:, None] + r

    def query_start(self) -> jax.Array:
        """int32 [1 or B]: position of the first query of the computed rows (0 or row0*block)."""
        return jnp.zeros((1,), jnp.int32) if self.row0 is None else self.row0 * self.block

    def query_valid(self) -> jax.Array:
        """bool [B, nq * block]: query t of the computed rows is a real (not padding) token."""
        pos = self.query_start()[:, None] + jnp.arange(self.nq * self.block)[None, :]
        return pos < self.lengths[:, None]

    def row_blocks(self) -> jax.Array:
        """int32 [B]: blocks holding at least one valid token of each row."""
        return (self.lengths + self.block - 1) // self.block

    def causal(self) -> jax.Array:
        """bool [B, 1, nq, n]: block (i, j) holds a visible valid pair (j <= i, both valid)."""
        i = self.query_rows()[:, None, :, None]
        j = jnp.arange(self.n)
        nb = self.row_blocks()[:, None, None, None]
        return ((j <= i) & (i < nb))

    def forced(self) -> jax.Array:
        """bool [1 or B, 1, nq, n]: the sink block and the diagonal."""
        i = self.query_rows()[:, None, :, None]
        j = jnp.arange(self.n)
        return (j == 0) | (j == i)

    def tail_rows(self, n_last: int) -> jax.Array:
        """bool [B, nq]: the computed query-block rows holding one of each row's last
        ``n_last`` queries (none for 0)."""
        if n_last <= 0:
            return jnp.zeros((self.B, self.nq), bool)
        first = (self.lengths - n_last) // self.block  # [B] block of the tail's first query
        return self.query_rows() >= first[:, None]

    def diagonal(self) -> jax.Array:
        """bool [1 or B, 1, nq, n]: the diagonal block of each computed row."""
        return self.query_rows()[:, None, :, None] == jnp.arange(self.n)

    def valid_tokens(self) -> jax.Array:
        """bool [B, S]: token t of row b is real (not right padding)."""
        return jnp.arange(self.S)[None, :] < self.lengths[:, None]


def make_geometry(q: jax.Array, k: jax.Array, block: int, lengths: jax.Array | None,
                  estimation: Estimation = Estimation()) -> Geometry:
    if q.ndim != 4 or k.ndim != 4 or q.shape[1] != k.shape[1]:
        raise ValueError(f"sparse prefill needs q [B,S,Hq,D], k [B,S,Hkv,D]: {q.shape}, {k.shape}")
    return _geometry(q.shape, k.shape, block, lengths, estimation)


def make_row_geometry(q_rows: jax.Array, k: jax.Array, block: int, row0: jax.Array,
                      lengths: jax.Array | None,
                      estimation: Estimation = Estimation()) -> Geometry:
    """Geometry of the query-block rows [row0, row0 + nr) of a prefill whose keys are k.

    q_rows [B, Sr, Hq, D]: query t at position row0[b] * block + t; nr = ceil(Sr / block).
    k [B, S, Hkv, D]: all keys (S sets n). row0: int32 [B] (traced allowed).
    """
    if q_rows.ndim != 4 or k.ndim != 4 or q_rows.shape[0] != k.shape[0]:
        raise ValueError(f"row layouts need q [B,Sr,Hq,D], k [B,S,Hkv,D]: {q_rows.shape}, "
                         f"{k.shape}")
    B, _, Hq, D = q_rows.shape
    geo = _geometry((B, k.shape[1], Hq, D), k.shape, block, lengths, estimation)
    row0 = jnp.broadcast_to(jnp.asarray(row0, jnp.int32).reshape(-1), (B,))
    return dataclasses.replace(geo, row0=row0, nr=-(-q_rows.shape[1] // int(block)))


def _geometry(q_shape: tuple, k_shape: tuple, block: int, lengths: jax.Array | None,
              estimation: Estimation) -> Geometry:
    B, S, Hq, D = q_shape
    Hkv = k_shape[2]
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    if lengths is None:
        lengths = jnp.full((B,), S, jnp.int32)
    lengths = jnp.clip(jnp.asarray(lengths, jnp.int32).reshape(B), 1, S)
    return Geometry(B, S, Hq, Hkv, D, int(block), lengths, estimation=estimation)
