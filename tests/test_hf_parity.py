"""Parity with Hugging Face transformers: fixtures from tools/make_hf_fixtures.py (torch, fp32)."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import HF_FIXTURES, HF_MODELS, expected
from jaxpd.generate import Generator, SamplingParams
from jaxpd.model import forward
from jaxpd.model.checkpoint import load_model
from jaxpd.model.sharding import make_mesh


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", HF_MODELS)
def test_last_logits_match_transformers(name, tp, devices):
    exp = expected(name)
    mesh = make_mesh(devices[:tp], tp)
    model = load_model(HF_FIXTURES / name, mesh)
    for prompt, want in zip(exp["prompts"], exp["last_logits"]):
        out = forward.prefill(model.params, jnp.asarray([prompt]), jnp.asarray([len(prompt)]),
                              config=model.config, mesh=mesh)
        np.testing.assert_allclose(np.asarray(out.logits[0]), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", HF_MODELS)
def test_greedy_continuations_match_transformers(name, devices):
    exp = expected(name)
    mesh = make_mesh(devices[:4], 4)
    model = load_model(HF_FIXTURES / name, mesh)
    # All prompts batched together (mixed lengths, right-padded) at TP=4.
    got = Generator(model.config, model.params, mesh).generate(
        exp["prompts"], SamplingParams(max_tokens=exp["max_new_tokens"]))
    assert got == exp["greedy"]


def test_fixtures_cover_what_they_claim():
    llama = load_model(HF_FIXTURES / "llama").config
    assert llama.rope_scaling is not None and llama.rope_scaling.kind == "llama3"
    assert llama.num_kv_heads < llama.num_heads
    assert len(list((HF_FIXTURES / "llama").glob("model-*.safetensors"))) > 1
    qwen = load_model(HF_FIXTURES / "qwen2").config
    assert qwen.qkv_bias and qwen.tie_word_embeddings
    mistral = load_model(HF_FIXTURES / "mistral").config
    assert mistral.head_dim * mistral.num_heads != mistral.hidden_size


@pytest.mark.slow
@pytest.mark.parametrize("name, layout", [("qwen2", "colocated"), ("mistral", "disaggregated")])
def test_paged_engine_with_pallas_matches_transformers(name, layout):
    """The serving engine with `attention: pallas` (the TPU kernel, interpreted on CPU) gives
    transformers' greedy tokens for all prompts batched: colocated TP 2, and disaggregated TP
    4 -> 2 (each layout on a fixture of its own, to keep the suite short: the llama fixture's
    disaggregated pallas engine is test_engine_attention.py's, the window fixture's
    test_engine.py's)."""
    from conftest import ONE_SHAPE, deployment
    from jaxpd.engine.builder import build_engine
    from jaxpd.engine.request import Request
    from jaxpd.engine.sampling import SamplingParams as EngineSampling

    exp = expected(name)
    model = load_model(HF_FIXTURES / name)
    mesh = (dict(devices=(0, 1), tp=2) if layout == "colocated" else
            dict(devices=(0, 1, 2, 3), tp=4, decode_devices=(4, 5), decode_tp=2))
    engine = build_engine(model.config, model.params,
                          deployment(page_size=4, num_pages=96, chunk_size=16,
                                     max_prefill_tokens=32, attention="pallas", **mesh,
                                     **ONE_SHAPE))
    n = exp["max_new_tokens"]
    final = engine.run_to_completion([Request(f"r{i}", tuple(p), EngineSampling(
        max_tokens=n, ignore_eos=True)) for i, p in enumerate(exp["prompts"])])
    assert [list(final[f"r{i}"].token_ids) for i in range(len(exp["prompts"]))] == exp["greedy"]
    assert engine.prefill.manager.all_free and engine.decode.manager.all_free
