"""Attention kernels (Pallas TPU, Pallas GPU, XLA, reference); no jaxprefill import.

    from pallas_kernels import BlockSparseLayout, SegmentIds, block_sparse_attention
    from pallas_kernels import mla_decode        # MLA decode over a paged latent cache

Which implementation runs a call: ``block_sparse_backend`` / ``mla_decode_backend`` /
``estimation.estimation_backend`` (one resolver per op, see :mod:`pallas_kernels.backends`).
"""

from pallas_kernels._prep import SegmentIds
from pallas_kernels.attention import IMPLS, block_sparse_attention, block_sparse_backend
from pallas_kernels.layout import BlockSparseLayout
from pallas_kernels.layout_columns import with_columns
from pallas_kernels.mla_ops import mla_decode, mla_decode_backend, mla_decode_reference

__all__ = ["BlockSparseLayout", "IMPLS", "SegmentIds", "block_sparse_attention",
           "block_sparse_backend", "mla_decode", "mla_decode_backend", "mla_decode_reference",
           "with_columns"]
