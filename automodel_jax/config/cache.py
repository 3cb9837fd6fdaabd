"""The project's cache directory, and JAX's persistent compilation cache in it.

`cache_dir()` is `$AUTOMODEL_JAX_CACHE`, else `~/.cache/automodel_jax`: the embedded models and data live there, and
so, in `xla/`, do compiled XLA programs (`enable_compilation_cache`), so that a rerun or a resume of the same run
loads its train step instead of compiling it again.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax

CACHE_ENV = "AUTOMODEL_JAX_CACHE"
# JAX's own variable for this threshold; a user who sets it keeps their value.
_MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def cache_dir() -> Path:
    """The project's cache directory: `$AUTOMODEL_JAX_CACHE`, else `~/.cache/automodel_jax` (not created here)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "automodel_jax").expanduser()


def _source(directory: str | None) -> str:
    """Where the compilation cache directory came from, for error messages (empty when the caller chose it)."""
    if directory:
        return ""
    if jax.config.jax_compilation_cache_dir:
        return " (from JAX_COMPILATION_CACHE_DIR)"
    return f" (from ${CACHE_ENV})" if os.environ.get(CACHE_ENV) else " (the default cache directory)"


def enable_compilation_cache(enabled: bool = True, directory: str | None = None,
                             fix: str = f"point {CACHE_ENV} at a writable directory, or set "
                                        "JAX_ENABLE_COMPILATION_CACHE=false") -> Path | None:
    """Turn JAX's persistent compilation cache on (or, with `enabled=False`, off) for this process; returns the
    directory in use, or None when off.

    `directory`: where compiled programs go; None takes JAX_COMPILATION_CACHE_DIR when the user set it, else
    `cache_dir() / "xla"`. Every program is cached however quickly it compiled (JAX's own guide does the same; the
    `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` variable still sets a threshold), and JAX_ENABLE_COMPILATION_CACHE=
    false keeps it off. Call it at process start, before anything is compiled: JAX decides at the first compile of a
    process whether that process uses the cache. In a multi-process run every process reads the cache and only
    process 0 writes it (JAX's rule, which keeps processes from racing on one file).

    Raises ValueError naming the directory, followed by `fix`, when it cannot be created or written.
    """
    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if not jax.config.jax_enable_compilation_cache:  # JAX_ENABLE_COMPILATION_CACHE=false
        return None
    chosen = Path(directory or jax.config.jax_compilation_cache_dir or cache_dir() / "xla").expanduser()
    try:
        chosen.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=chosen).close()
    except OSError as e:
        raise ValueError(f"compilation cache directory {chosen}{_source(directory)} cannot be written "
                         f"({e.strerror or e}); {fix}") from None
    jax.config.update("jax_compilation_cache_dir", str(chosen))
    if _MIN_COMPILE_TIME_ENV not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return chosen
