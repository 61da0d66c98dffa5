"""Attention dispatch: the single entry point every model uses (`attend`)."""

from jaxprefill.attention.dispatch import AttentionSpec, attend, build_mask, reference_attention

__all__ = ["AttentionSpec", "attend", "build_mask", "reference_attention"]
