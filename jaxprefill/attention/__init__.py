"""Attention: `attend`, the single entry point every model uses; `attention_backend` says which
implementation runs a call and why; sparse prefill enters through `attention.sparse`."""

from jaxprefill.attention.dispatch import (AttentionSpec, attend, attention_backend, build_mask,
                                           reference_attention)
from jaxprefill.attention.sparse import LayoutShare

__all__ = ["AttentionSpec", "LayoutShare", "attend", "attention_backend", "build_mask",
           "reference_attention"]
