"""Test run settings: one persistent XLA compilation cache for the whole run.

Many tests compile the same small programs (tiny models, the same kernels at the same shapes),
in both pytest-xdist workers and in the subprocesses that simulate several devices. JAX's
persistent cache lets each program compile once per run. Set before JAX is imported, and
inherited by subprocesses; an explicit JAX_COMPILATION_CACHE_DIR wins.
"""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "jaxprefill-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
