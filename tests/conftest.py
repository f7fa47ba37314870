"""Test set-up: 8 host CPU devices so meshes, TP and resharding are real; shared fixtures."""

import os

# Must precede the first `import jax` anywhere in the test session.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
HF_FIXTURES = FIXTURES / "hf"
HF_MODELS = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, "tests expect 8 host devices (XLA_FLAGS was set too late?)"
    return devs


def expected(name: str) -> dict:
    return json.loads((HF_FIXTURES / name / "expected.json").read_text())
