"""``minference``: MInference 1.0 (NeurIPS'24) vertical-slash / block-sparse / A-shape heads.

Per head, one of three patterns (offline search: scripts/tools/search_minference_patterns.py writes
a per-head JSON; without one every head is vertical-slash, the released configs' fallback):

* "vs" (vertical, slash): softmax(Q[-64:] K^T / sqrt(D) + causal) in float32 over the last 64
  queries of the row; vertical score of key j = column sum, slash score of diagonal o = diagonal
  sum. The first 30 columns and the 100 most local diagonals are always taken; then the top
  max(vertical, 30) columns and top max(slash, 50) diagonals. Defaults VS(1000, 6096) (the
  released configs' default head). Diagonals map to exact block diagonals; vertical columns go
  to the layout's **column path** (``col_idx``: single key columns, gathered by the kernels in
  chunks of block_k) unless they fall in a listed block; ``columns=False`` rounds them up to
  whole key blocks instead (the only option before the column path; over-counts density when
  few columns share a block). :meth:`MInference.block_mask` always shows the block-rounded view
  (block-granular tools: eval recall, pattern search).
* "bs": mean-pool Q and K over blocks, top ``bs_blocks`` key blocks per query block by
  Q̂K̂ᵀ (no softmax; MInference's runtime k_b = 100 blocks of 64).
* "a": A-shape, static sink + local window (search space 100 / 800 tokens).

Block size 64 (MInference's index builder asserts 64 x 64). Short rows use dense (min_length).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BlockSparseLayout
from jaxprefill.sparse import estimators as est
from jaxprefill.sparse.base import Geometry, Policy, make_geometry
from jaxprefill.sparse.columns import ascending_positions, attach_columns
from jaxprefill.sparse.streaming import streaming_blocks

PATTERNS = ("vs", "bs", "a")


@functools.lru_cache(maxsize=16)
def load_head_config(path: str) -> dict[int, tuple[tuple[str, int, int], ...]]:
    """JSON {"layers": {"<layer>": [[pattern, p1, p2], ... one per query head]}} -> dict.

    p1, p2: "vs" -> (vertical, slash); "bs" -> (blocks, 0); "a" -> (sink, local) tokens.
    """
    with open(path) as f:
        data = json.load(f)
    if "layers" not in data:
        raise ValueError(f"{path}: MInference head config needs a 'layers' key, got {sorted(data)}")
    out = {}
    for layer, heads in data["layers"].items():
        rows = []
        for h, entry in enumerate(heads):
            if len(entry) != 3 or entry[0] not in PATTERNS:
                raise ValueError(f"{path}: layer {layer} head {h}: want [pattern in {PATTERNS}, "
                                 f"int, int], got {entry}")
            rows.append((str(entry[0]), int(entry[1]), int(entry[2])))
        out[int(layer)] = tuple(rows)
    return out


@dataclasses.dataclass(frozen=True)
class MInference(Policy):
    """MInference. Params: vertical (1000), slash (6096), last_q (64), force_vertical (30),
    force_slash (100), bs_blocks (100), a_sink (100), a_local (800), head_config (JSON path or
    None), pattern ("vs": default pattern of unlisted heads), block_size (64)."""

    name = "minference"
    takes_key_columns = False  # its vertical lines are key columns already
    # Row-local: vertical / slash lines come from the row's last queries (the window's end),
    # block-sparse heads from pooled q of each row, A-shape heads are static.
    rows_exact = True
    block_size: int = 64
    vertical: int = 1000
    slash: int = 6096
    last_q: int = 64
    force_vertical: int = 30
    force_slash: int = 100
    bs_blocks: int = 100
    a_sink: int = 100
    a_local: int = 800
    head_config: str | None = None
    n_last: int = 128  # the dense query tail (Policy.n_last); 0 gives the paper's layout
    pattern: str = "vs"  # the pattern of heads a head_config does not list
    columns: bool = True  # vertical lines as single key columns (layout column path)

    @property
    def has_columns(self) -> bool:
        return self.columns

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern not in PATTERNS:  # checked here too: a config fails before the model runs
            raise ValueError(f"minference: pattern must be one of {PATTERNS}, got {self.pattern!r}")

    def head_patterns(self, layer: int, hq: int) -> tuple[tuple[str, int, int], ...]:
        """(pattern, p1, p2) per query head of ``layer``."""
        if self.pattern not in PATTERNS:
            raise ValueError(f"minference: pattern must be one of {PATTERNS}, got {self.pattern!r}")
        default = {"vs": ("vs", self.vertical, self.slash), "bs": ("bs", self.bs_blocks, 0),
                   "a": ("a", self.a_sink, self.a_local)}[self.pattern]
        if self.head_config is None:
            return (default,) * hq
        rows = load_head_config(self.head_config).get(layer)
        if rows is None:
            return (default,) * hq
        if len(rows) != hq:
            raise ValueError(f"{self.head_config}: layer {layer} lists {len(rows)} heads, "
                             f"the model has {hq}")
        return rows

    def layer_key(self, layer: int) -> int:
        return layer if self.head_config is not None else 0

    def select(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int) -> jax.Array:
        """Block mask with the vertical lines rounded up to blocks (block-granular view)."""
        return self.select_with_columns(q, k, geo, layer, columns=False)[0]

    def select_with_columns(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int,
                            columns: bool) -> tuple[jax.Array, jax.Array | None]:
        """(bool block mask [B, Hq, nq, n], vertical key positions int32 [B, Hq, V] or None).

        ``columns``: the vertical lines come back as positions (-1 = unused) instead of being
        rounded up into the block mask.
        """
        pats = self.head_patterns(layer, geo.Hq)
        kinds = {p for p, _, _ in pats}
        mask = jnp.zeros((geo.B, geo.Hq, geo.nq, geo.n), bool)
        cols = None
        if "vs" in kinds:
            kv = np.array([max(a, self.force_vertical) if p == "vs" else 0 for p, a, _ in pats])
            ks = np.array([max(b, 50) if p == "vs" else 0 for p, _, b in pats])
            vs_mask, cols = self.vertical_slash(q, k, geo, kv, ks, columns)
            mask = mask | vs_mask
        if "bs" in kinds:
            kb = np.array([a if p == "bs" else 0 for p, a, _ in pats])
            mask = mask | block_topk(q, k, geo, kb)
        if "a" in kinds:
            is_a = np.array([p == "a" for p, _, _ in pats])
            lead = geo.query_rows().shape[0]  # 1, or B for a row window
            a = jnp.stack([streaming_blocks(geo, s, l) if p == "a" else
                           jnp.zeros((lead, geo.nq, geo.n), bool) for p, s, l in pats], axis=1)
            mask = mask | (a & is_a[None, :, None, None])  # a [1 or B, Hq, nq, n]
        return mask, cols

    def layout(self, q: jax.Array, k: jax.Array, geo: Geometry, layer: int,
               min_length: int) -> BlockSparseLayout:
        """Layout of :meth:`Policy.layout` plus, with ``columns``, the vertical lines as layout
        columns (columns inside listed blocks or after a query block's last query dropped)."""
        mask, cols = self.select_with_columns(q, k, geo, layer, columns=self.columns)
        layout = self.finish(mask, geo, min_length, q, k)
        return layout if cols is None else attach_columns(layout, cols, geo)

    def block_mask(self, q: jax.Array, k: jax.Array, *, layer: int = 0,
                   lengths: jax.Array | None = None, min_length: int = 0) -> jax.Array:
        """bool [B, H, n, n]: blocks of the layout with every column rounded up to its block."""
        geo = make_geometry(q, k, self.block_size, lengths, self.estimation)
        mask = self.select_with_columns(q, k, geo, layer, columns=False)[0]
        return self.finish(mask, geo, min_length, q, k).to_block_mask()

    def vertical_slash(self, q, k, geo: Geometry, kv: np.ndarray, ks: np.ndarray,
                       columns: bool = False) -> tuple[jax.Array, jax.Array | None]:
        """The top kv[h] columns and ks[h] diagonals of each head: (bool [B, Hq, nq, n] block
        mask, None) with the columns rounded up to blocks, or (diagonal blocks only, column
        positions int32 [B, Hq, max(kv)] ascending, -1 = unused) when ``columns``."""
        vert, slash = est.last_q_sums(q, k, geo, self.last_q)  # [B, Hq, S] each
        tok = jnp.arange(geo.S)[None, None, :]
        valid = tok < geo.lengths[:, None, None]  # key j / offset o exists in the row
        vert = jnp.where(tok < self.force_vertical, jnp.inf, vert)
        slash = jnp.where(tok < self.force_slash, jnp.inf, slash)
        # columns and diagonal offsets [B, Hq, S] each, in one search (one pass per step)
        counts = jnp.stack([jnp.asarray(kv), jnp.asarray(ks)])[:, None, :]  # [2, 1, Hq]
        sel_v, sel_s = est.topk_mask(jnp.stack([vert, slash]), valid[None], counts,
                                     how=geo.estimation)
        diag = est.diagonal_blocks(est.slash_offsets_to_blocks(sel_s, geo), geo)
        on = (kv > 0)[None, :, None, None]
        if columns:
            return diag & on, ascending_positions(sel_v, max(1, min(int(kv.max()), geo.S)),
                                                  geo.estimation)
        col_blocks = est.block_sum(sel_v.astype(jnp.int32), geo) > 0  # [B, Hq, n]
        return (diag | col_blocks[:, :, None, :]) & on, None


def block_topk(q: jax.Array, k: jax.Array, geo: Geometry, kb: np.ndarray) -> jax.Array:
    """MInference block-sparse heads: top kb[h] key blocks per query block by pooled Q̂K̂ᵀ
    (row-local: bool [B, Hq, nq, n])."""
    qp, kp = est.pool_query_blocks(q, geo), est.pool_blocks(k, geo)  # [B, nq | n, H, D]
    s = est.grouped_logits(qp, kp)  # [B, Hq, nq, n]
    valid = geo.causal()
    return est.topk_mask(s, valid, jnp.asarray(kb)[None, :, None], how=geo.estimation)
