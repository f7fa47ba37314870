"""JAX's persistent compilation cache, on by default, so a restarted server or a second
`jaxpd generate` reuses the XLA executables of the last run instead of compiling again.

Where: `$JAXPD_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxpd/xla`, else `~/.cache/jaxpd/xla`.
`JAXPD_CACHE_DIR=off` (or `--compile-cache off`) turns it off. Worker processes started by
`jaxpd serve` inherit the setting through the environment.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("jaxpd")

ENV = "JAXPD_CACHE_DIR"
OFF = ("off", "none", "0", "false")


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxpd" / "xla"


def resolve(setting: str | None = None) -> Path | None:
    """The cache directory a setting (a flag value, else the environment) asks for; None = off."""
    value = setting if setting is not None else os.environ.get(ENV)
    if value is not None and value.strip().lower() in OFF:
        return None
    return Path(value).expanduser() if value else default_dir()


def enable(setting: str | None = None) -> Path | None:
    """Point JAX's persistent cache at the resolved directory (created if needed) and export it
    to child processes; returns the directory, or None when off or not writable."""
    import jax

    directory = resolve(setting)
    os.environ[ENV] = str(directory) if directory is not None else "off"
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache off: cannot create %s (%s)", directory, e.strerror or e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # cache every executable, even quick ones: a server compiles dozens of small step shapes
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
