"""The persistent compilation cache: where it lives, how it is turned off, and that a real run
fills it (a second run then loads executables instead of compiling them)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxpd import compile_cache


def test_where_the_cache_lives(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXPD_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve() == tmp_path / "xdg" / "jaxpd" / "xla"
    monkeypatch.setenv("JAXPD_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.resolve() == tmp_path / "mine"
    assert compile_cache.resolve("off") is None and compile_cache.resolve("OFF") is None
    assert compile_cache.resolve(str(tmp_path / "flag")) == tmp_path / "flag"  # a flag wins


def _generate(cache: str, env_dir: Path):
    env = {k: v for k, v in os.environ.items() if k != "JAXPD_CACHE_DIR"}
    env["HOME"] = str(env_dir)  # nothing lands in the real ~/.cache
    return subprocess.run([sys.executable, "-m", "jaxpd.cli", "generate", "--prompt-ids", "1,2,3",
                           "--max-tokens", "2", "--json", "--compile-cache", cache],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_a_run_fills_the_cache_and_a_second_run_loads_it(tmp_path):
    cache = tmp_path / "xla"
    first = _generate(str(cache), tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "no executable was cached"
    second = _generate(str(cache), tmp_path)
    tokens = lambda run: json.loads(run.stdout)["token_ids"]  # noqa: E731
    assert second.returncode == 0 and tokens(second) == tokens(first)
    assert len(list(cache.iterdir())) == len(entries)  # same programs: loaded, not added


def test_off_points_jax_nowhere_and_tells_child_processes(monkeypatch, tmp_path):
    import jax

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(compile_cache.ENV, os.environ.get(compile_cache.ENV, ""))  # restored after
    before = jax.config.jax_compilation_cache_dir
    assert compile_cache.enable("off") is None
    assert os.environ[compile_cache.ENV] == "off"  # what `jaxpd serve` workers inherit
    assert jax.config.jax_compilation_cache_dir == before and not (tmp_path / ".cache").exists()
