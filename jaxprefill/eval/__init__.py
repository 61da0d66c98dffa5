"""Measurement of sparse prefill and long-context accuracy.

* `jaxprefill eval` (:mod:`~jaxprefill.eval.suite`, :mod:`~jaxprefill.eval.report`): RULER-style
  tasks (:mod:`~jaxprefill.eval.tasks`) over committed CPython code and prose haystacks with
  disjoint dev / test splits (:mod:`~jaxprefill.eval.haystack`), dense vs sparse prefill on the
  same samples, Wilson and paired intervals (:mod:`~jaxprefill.eval.stats`).
* `jaxprefill analyze` and the attention statistics (:mod:`~jaxprefill.eval.runner`,
  :mod:`~jaxprefill.eval.metrics`): density, attention recall, output error, pictures.
* `jaxprefill perplexity` (:mod:`~jaxprefill.eval.perplexity`,
  :mod:`~jaxprefill.eval.perplexity_cli`): held-out perplexity against the context length.
"""

from jaxprefill.eval.haystack import test_documents
from jaxprefill.eval.metrics import LayerStats, block_density, head_stats
from jaxprefill.eval.probe import capture_qkv, layer_qkv
from jaxprefill.eval.tasks import TASKS, Sample, make_sample

__all__ = ["LayerStats", "TASKS", "Sample", "block_density", "capture_qkv", "head_stats",
           "layer_qkv", "make_sample", "test_documents"]
