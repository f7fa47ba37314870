"""Packaging: every package is installed, kernels live only under `jaxpd`, pins match."""

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "jaxpd").rglob("__init__.py")}
    found.add("jaxpd.kernels")
    assert found == listed


def test_kernels_import_only_under_the_jaxpd_namespace(tmp_path):
    import jaxpd.kernels

    assert Path(jaxpd.kernels.__file__).parent == REPO / "kernels"
    # From outside the repository (its root on sys.path would make `kernels` importable).
    probe = "import importlib.util as u; print(u.find_spec('kernels') is None)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "True"


def test_installed_versions_match_constraints():
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s#]+)", line.strip())
        if m:
            assert importlib.metadata.version(m.group(1)) == m.group(2), line


def test_embedded_default_model_is_small_and_complete():
    folder = REPO / "jaxpd" / "assets" / "default_model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 20 * 1024 * 1024
