"""Attention kernels (Pallas TPU, Pallas GPU, XLA, reference); no jaxprefill import.

    from pallas_kernels import BlockSparseLayout, SegmentIds, block_sparse_attention
    from pallas_kernels import mla_decode        # MLA decode over a paged latent cache
"""

from pallas_kernels._prep import SegmentIds
from pallas_kernels.attention import IMPLS, block_sparse_attention, default_impl
from pallas_kernels.layout import BlockSparseLayout
from pallas_kernels.mla_ops import mla_decode, mla_decode_reference

__all__ = ["BlockSparseLayout", "SegmentIds", "block_sparse_attention", "default_impl", "IMPLS",
           "mla_decode", "mla_decode_reference"]
