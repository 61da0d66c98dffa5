"""JAX's persistent compilation cache for the command line.

A `jaxprefill` command compiles its model steps and kernels for the shapes it runs (tens of
seconds for a long-context model: each prefill bucket, each sparse policy, the decode step).
With JAX's persistent cache the compiled programs are kept on disk and a later run of the same
model and shapes loads them instead. The command line turns it on (`jaxprefill.cli.main`); the
library does not (a Python user sets `jax.config.update("jax_compilation_cache_dir", ...)`).

Where: `$JAXPREFILL_COMPILE_CACHE` (a directory; "off" turns the cache off), else, on CPUs,
~/.cache/jaxprefill/jax. On GPUs and TPUs the cache is opt-in (set the variable): reloading
serialized GPU programs has not been checked here yet, and XLA has had Hopper programs whose
cached kernels lost their TMA descriptors. A cache directory already given to JAX
(`JAX_COMPILATION_CACHE_DIR` or `jax.config`) is left as it is. JAX keys entries by program,
backend, device kind and version, so one directory serves several machines and versions; it
does not evict them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

import jax

ENV = "JAXPREFILL_COMPILE_CACHE"
DEFAULT = Path("~/.cache/jaxprefill/jax")


def enable(environ: Mapping[str, str] = os.environ, platform: str | None = None) -> Path | None:
    """Turn on the persistent compilation cache (module docstring); returns its directory, or
    None when it is off. platform: the default backend's (asked of JAX when None). A directory
    that cannot be made leaves the cache off with one warning line."""
    current = jax.config.jax_compilation_cache_dir
    if current:  # the user's own JAX setting
        return Path(current)
    where = environ.get(ENV, "").strip()
    if where.lower() == "off":
        return None
    if not where and (platform or jax.default_backend()) != "cpu":  # opt-in there
        return None
    path = Path(where or DEFAULT).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"warning: compilation cache off: cannot create {path} ({e.strerror}); set {ENV} "
              f"to a writable directory or to off", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path


__all__ = ["DEFAULT", "ENV", "enable"]
