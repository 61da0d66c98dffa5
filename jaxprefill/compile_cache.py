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

import importlib.util
import os
import pkgutil
import sys
from pathlib import Path
from typing import Mapping

import jax

ENV = "JAXPREFILL_COMPILE_CACHE"
DEFAULT = Path("~/.cache/jaxprefill/jax")


def likely_platform(environ: Mapping[str, str] = os.environ) -> str:
    """"cpu" when JAX will run on CPUs, else "accelerator", without starting JAX's backends
    (a multi-host run must call `jax.distributed.initialize` first): JAX_PLATFORMS when set,
    else whether an accelerator plugin (a `jax_plugins` module, libtpu) is installed."""
    chosen = (environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "").strip()
    if chosen:
        return "cpu" if chosen.split(",")[0].strip() == "cpu" else "accelerator"
    try:
        import jax_plugins  # namespace package of the installed PJRT plugins (CUDA, ROCm)
        plugins = [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        plugins = []
    if plugins or importlib.util.find_spec("libtpu") is not None:
        return "accelerator"
    return "cpu"


def enable(environ: Mapping[str, str] = os.environ, platform: str | None = None) -> Path | None:
    """Turn on the persistent compilation cache (module docstring); returns its directory, or
    None when it is off. platform: "cpu" or not (default: `likely_platform`). A directory that
    cannot be made leaves the cache off with one warning line."""
    current = jax.config.jax_compilation_cache_dir
    if current:  # the user's own JAX setting
        return Path(current)
    where = environ.get(ENV, "").strip()
    if where.lower() == "off":
        return None
    if not where and (platform or likely_platform(environ)) != "cpu":  # opt-in there
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


__all__ = ["DEFAULT", "ENV", "enable", "likely_platform"]
