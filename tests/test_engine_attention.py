"""The paged engine with each attention backend (the TPU Pallas kernel interpreted, the GPU
kernel's wiring with its CPU emulation) and a sliding window equals the reference, token for
token. A file of its own so `make test` (`--dist loadfile`) can run it beside test_engine.py."""

import pytest

from conftest import HF_FIXTURES, ONE_SHAPE, deployment, expected
from jaxpd.engine.builder import build_engine
from jaxpd.engine.request import Request
from jaxpd.engine.sampling import SamplingParams
from jaxpd.errors import ConfigError
from jaxpd.model.checkpoint import load_model
from test_engine import DISAGG, naive_greedy, prompts


def _pallas_engine_gives_the_reference_tokens(llama):
    """A disaggregated TP 4 -> 2 engine with `attention: pallas` and a mixed batch (a shared
    prefix, a prompt longer than one chunk, one shorter than a page) gives the greedy tokens
    of recomputing from scratch, and frees every page. Returns the engine."""
    base = prompts(1, seed=12)[0]
    ps = [base + (7, 8, 9), base + (11,), prompts(1, seed=13)[0][:3] or (5,)]
    engine = build_engine(llama.config, llama.params,
                          deployment(page_size=8, num_pages=48, chunk_size=16,
                                     max_prefill_tokens=32, **DISAGG, attention="pallas"))
    final = engine.run_to_completion([Request(f"p{i}", p, SamplingParams(max_tokens=4,
                                                                         ignore_eos=True))
                                      for i, p in enumerate(ps)])
    for i, p in enumerate(ps):
        assert list(final[f"p{i}"].token_ids) == naive_greedy(llama, p, 4), f"request p{i}"
    assert engine.prefill.manager.all_free and engine.decode.manager.all_free
    return engine


@pytest.mark.slow
def test_pallas_attention_gives_the_reference_tokens(llama):
    """`attention: pallas` on CPU runs the TPU kernel through Pallas's interpreter."""
    engine = _pallas_engine_gives_the_reference_tokens(llama)
    assert engine.prefill.runner.backend.name == "pallas"


def test_backend_choice_per_platform(monkeypatch):
    from jaxpd.engine import attention

    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    assert attention.resolve("pallas", head_dim=128, dtype="bfloat16").prefill is \
        attention.pallas_gpu_attention
    with pytest.raises(ConfigError, match="needs bfloat16 or float16 and head_dim 64 or 128"):
        attention.resolve("pallas", head_dim=128, dtype="float32")
    assert attention.resolve("auto", head_dim=64, dtype="bfloat16").name == "cudnn"
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "tpu")
    assert attention.resolve("auto", head_dim=64, dtype="bfloat16").name == "pallas"


@pytest.mark.slow
def test_gpu_pallas_wiring_gives_the_reference_tokens(llama, monkeypatch):
    """The GPU backend's engine path (per-TP-shard call on the stacked pool, the model step's
    own KV scatter, page size 8 so one step spans 8 pages) with the kernel's CPU emulation
    standing in for the Mosaic GPU call, which needs a GPU."""
    from jaxpd.engine import attention
    from jaxpd.kernels import gpu_paged_attention as gpu

    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(gpu, "supported", lambda dtype, head_dim: True)
    monkeypatch.setattr(gpu, "paged_attention", gpu.paged_attention_tiled)
    engine = _pallas_engine_gives_the_reference_tokens(llama)
    assert engine.decode.runner.backend.decode is attention.pallas_gpu_attention


@pytest.mark.slow
@pytest.mark.parametrize("attention, layout", [("reference", {}), ("pallas", DISAGG)],
                         ids=["reference-colocated", "pallas-disaggregated"])
def test_sliding_window_matches_transformers_and_frees_pages(attention, layout):
    """A Mistral fixture whose 8-token window is shorter than its prompts: the paged engine
    gives transformers' greedy tokens, and decode gives back pages that left the window."""
    model = load_model(HF_FIXTURES / "mistral_window")
    exp = expected("mistral_window")
    assert model.config.sliding_window == 8 and max(map(len, exp["prompts"])) > 8
    engine = build_engine(model.config, model.params,
                          deployment(page_size=4, num_pages=64, chunk_size=16,
                                     max_prefill_tokens=32, attention=attention, **layout,
                                     **ONE_SHAPE))
    n = exp["max_new_tokens"]
    longest = max(range(len(exp["prompts"])), key=lambda i: len(exp["prompts"][i]))
    # the longest prompt alone first: its decode must hold at most the window's pages
    engine.add_request(Request("solo", tuple(exp["prompts"][longest]),
                               SamplingParams(max_tokens=n, ignore_eos=True)))
    used, outputs = [], {}
    while engine.has_work():
        for out in engine.step():
            outputs[out.id] = out
        used.append(engine.decode.manager.allocator.num_used)
    assert list(outputs["solo"].token_ids) == exp["greedy"][longest]
    total_pages = -(-(len(exp["prompts"][longest]) + n) // 4)  # 9 without freeing
    assert 0 < min(u for u in used[-4:] if u) <= 8 // 4 + 2 < total_pages
    final = engine.run_to_completion([Request(f"w{i}", tuple(p), SamplingParams(
        max_tokens=n, ignore_eos=True)) for i, p in enumerate(exp["prompts"])])
    assert [list(final[f"w{i}"].token_ids) for i in range(len(exp["prompts"]))] == exp["greedy"]
    assert engine.prefill.manager.all_free and engine.decode.manager.all_free


