"""Context parallelism: attention split over the mesh's `sequence` axis (ring attention).

    from jaxprefill.parallel import ContextParallel
    spec = AttentionSpec(context=ContextParallel(mesh))   # mesh = make_mesh(sequence=n)

context.py   ContextParallel (the setting, a field of AttentionSpec) and the model hooks
zigzag.py    which chunks of the sequence each device holds; ring order and back
ring.py      pass-KV / pass-Q ring attention and flash-decoding over the block-sparse kernel,
             the online-softmax (lse) combine
rows.py      sparse policies on the ring: each device's layout rows, each step's part
plan.py      the pass-KV / pass-Q cost rule
backward.py  gradients through the ring (training): the differentiable step kernels
Design, memory and time model: docs/context_parallel.md.
"""

from jaxprefill.parallel.context import ContextParallel
from jaxprefill.parallel.plan import choose_schedule
from jaxprefill.parallel.ring import chunk_attention, merge, prompt_attention

__all__ = ["ContextParallel", "choose_schedule", "chunk_attention", "merge",
           "prompt_attention"]
