"""Measurement of sparse prefill: density, attention recall, output error, pictures, and a
synthetic long-context suite (passkey, NIAH single / multi-key / multi-value, variable tracking)
built from Python standard-library text (no downloads). CLI: `jaxprefill analyze`, `jaxprefill eval`.
"""

from jaxprefill.eval.metrics import LayerStats, block_density, head_stats
from jaxprefill.eval.probe import capture_qkv
from jaxprefill.eval.tasks import TASKS, Sample, make_sample

__all__ = ["LayerStats", "TASKS", "Sample", "block_density", "capture_qkv", "head_stats",
           "make_sample"]
