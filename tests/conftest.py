"""Test set-up: 8 host CPU devices so meshes, TP and resharding are real; shared fixtures."""

import os
import shutil
import tempfile

# Must precede the first `import jax` anywhere in the test session. The test models are tiny, so
# LLVM's optimisation of each compiled program costs more than it saves: level 0 made the suite
# about a fifth faster (benchmarks and users keep XLA's default). Processes the tests start
# inherit it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session: the xdist workers and every process
# the tests start (`jaxpd serve`, `jaxpd generate`) inherit this variable, so a program compiled
# by one of them is loaded by the others. A fresh temporary directory per session keeps runs
# hermetic (nothing from ~/.cache; tests/test_compile_cache.py sets its own); the process that
# made it removes it at the end.
if "JAXPD_TEST_CACHE_DIR" not in os.environ:
    os.environ["JAXPD_TEST_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxpd-test-xla-")
    _SESSION_CACHE_OWNER = True
else:
    _SESSION_CACHE_OWNER = False
os.environ["JAXPD_CACHE_DIR"] = os.environ["JAXPD_TEST_CACHE_DIR"]
# Fast worker starts and few compilations: `jaxpd serve` workers compile only their first step
# programs and fit every step to them (tests/test_serve_modes.py runs the default background
# mode; tests/test_programs.py and tests/test_engine.py check the compiled programs themselves).
os.environ["JAXPD_PRECOMPILE"] = "first"

import contextlib  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxpd import compile_cache  # noqa: E402

compile_cache.enable()


def pytest_unconfigure(config):
    if _SESSION_CACHE_OWNER:
        shutil.rmtree(os.environ["JAXPD_TEST_CACHE_DIR"], ignore_errors=True)


_COMPILE_WATCHERS: list[tuple[int, list[str]]] = []


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        for thread, names in _COMPILE_WATCHERS:
            if thread == threading.get_ident():
                names.append(str(kwargs.get("fun_name", "?")))


jax.monitoring.register_event_duration_secs_listener(_on_duration)


@contextlib.contextmanager
def count_compilations():
    """The names of the functions XLA compiled on this thread inside the block, as JAX's own
    compile hook reports them (a persistent-cache hit counts too: it would still be a
    compilation on the request path without the cache)."""
    names: list[str] = []
    watcher = (threading.get_ident(), names)
    _COMPILE_WATCHERS.append(watcher)
    try:
        yield names
    finally:
        _COMPILE_WATCHERS.remove(watcher)


FIXTURES = Path(__file__).parent / "fixtures"
HF_FIXTURES = FIXTURES / "hf"
HF_MODELS = ("llama", "qwen2", "mistral", "mistral_window")


@pytest.fixture(scope="session")
def llama():
    """The tiny random Llama fixture (Llama-3 rope scaling, GQA), loaded once per process."""
    from jaxpd.model.checkpoint import load_model

    return load_model(HF_FIXTURES / "llama")


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, "tests expect 8 host devices (XLA_FLAGS was set too late?)"
    return devs


def expected(name: str) -> dict:
    return json.loads((HF_FIXTURES / name / "expected.json").read_text())


_KNOB_SECTIONS = {"page_size": "kv", "num_pages": "kv", "kv_dtype": "kv", "chunk_size": "scheduler",
                  "max_prefill_tokens": "scheduler", "max_decode_batch": "scheduler",
                  "prefix_caching": "scheduler", "decode_steps_per_dispatch": "scheduler",
                  "overlap": "scheduler", "prefill_batch_sizes": "scheduler",
                  "prefill_chunk_sizes": "scheduler", "decode_batch_sizes": "scheduler"}


# Every step padded to 4 rows: one prefill and one decode program per runner (with chunk_size
# 16), for tests about tokens rather than shapes; batching is still real (rows of different
# lengths share a call).
ONE_SHAPE = dict(prefill_batch_sizes=[4], decode_batch_sizes=[4], max_decode_batch=4)


def deployment(*, devices=(0,), tp=1, decode_devices=None, decode_tp=1, **knobs):
    """A DeploymentConfig from flat knobs (page_size=4, chunk_size=16, attention="reference"),
    so a test names only what it varies. `decode_devices` makes it disaggregated."""
    from jaxpd.config import parse_config

    data: dict = {"prefill": {"devices": list(devices), "tp": tp}}
    if decode_devices is not None:
        data.update(mode="disaggregated", decode={"devices": list(decode_devices), "tp": decode_tp})
    for key, value in knobs.items():
        section = _KNOB_SECTIONS.get(key)
        key = "dtype" if key == "kv_dtype" else key
        if section is None:
            data[key] = value  # top level: mode, attention, seed
        else:
            data.setdefault(section, {})[key] = value
    return parse_config(data, "test deployment")


def first_programs_only(engine):
    """Compile each stage's first step program (batch 1, smallest chunk; one decode row) and fit
    every later step to ready programs, as a `--precompile first` worker does: two compilations
    per engine, for tests whose subject is not the shapes themselves."""
    for stage in (engine.prefill, engine.decode):
        stage.runner.programs.compile(stage.shapes()[0])
        stage.runner.compile_on_demand = False
    return engine


def checkpoint_with_tokenizer_eos(folder: Path, eos_id: int) -> Path:
    """A copy of the embedded default model whose tokenizer files declare one more EOS id than
    its config.json (as Llama-3 instruct's <|eot_id|>, listed only in generation_config.json)."""
    from jaxpd.model.checkpoint import default_checkpoint

    src = default_checkpoint()
    folder.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((src / name).read_bytes())
    (folder / "model.safetensors").symlink_to(src / "model.safetensors")
    eos = json.loads((src / "config.json").read_text())["eos_token_id"]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [*eos, eos_id]}))
    return folder
