"""The paged engine equals a naive full-recompute reference, token for token, in every mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import HF_FIXTURES, ONE_SHAPE, count_compilations, deployment, expected
from jaxpd.engine.builder import build_engine
from jaxpd.engine.request import Request
from jaxpd.engine.sampling import SamplingParams
from jaxpd.config import parse_config
from jaxpd.request_check import DuplicateRequest, InvalidRequest
from jaxpd.errors import CapacityError, ConfigError
from jaxpd.model import forward
from jaxpd.model.checkpoint import load_model

SMALL = dict(page_size=4, num_pages=64, chunk_size=16, max_prefill_tokens=32)
DISAGG = dict(devices=(0, 1, 2, 3), tp=4, decode_devices=(4, 5), decode_tp=2)


def naive_greedy(model, prompt, n):
    """Recompute the whole sequence for every token: slow, obviously right."""
    tokens = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, 128), np.int32)  # one shape: one compilation
        padded[0, :len(tokens)] = tokens
        out = forward.prefill(model.params, jnp.asarray(padded), jnp.asarray([len(tokens)]),
                              config=model.config)
        tokens.append(int(jnp.argmax(out.logits[0])))
    return tokens[len(prompt):]


def prompts(n, seed=0, vocab=320):
    rng = np.random.default_rng(seed)
    return [tuple(int(t) for t in rng.integers(3, vocab, rng.integers(3, 40))) for _ in range(n)]


def run_staggered(engine, requests, every=2):
    """Requests arrive a few at a time between steps, so batches change while decoding."""
    pending, final, steps = list(requests), {}, 0
    while pending or engine.has_unfinished():
        if steps % every == 0 and pending:
            engine.add_request(pending.pop(0))
        for out in engine.step():
            if out.finished:
                final[out.id] = out
        steps += 1
    return final


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_engine_matches_naive_recompute(llama, mode):
    engine = build_engine(llama.config, llama.params,
                          deployment(**SMALL, **(DISAGG if mode == "disaggregated" else {})))
    ps = prompts(6)
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=6 + i, ignore_eos=True))
            for i, p in enumerate(ps)]
    final = run_staggered(engine, reqs)
    for i, p in enumerate(ps):
        assert list(final[f"r{i}"].token_ids) == naive_greedy(llama, p, 6 + i), f"request r{i}"
        assert final[f"r{i}"].finish_reason == "length"
    assert engine.prefill.manager.all_free and engine.decode.manager.all_free
    assert len(engine.prefill.runner.programs) <= 8  # bucketed: compilations stay bounded


@pytest.mark.slow
def test_embedded_model_disaggregated_matches_naive():
    model = load_model()
    engine = build_engine(model.config, model.params, deployment(**SMALL, **DISAGG, **ONE_SHAPE))
    ps = prompts(3, seed=9, vocab=4096)
    final = run_staggered(engine, [Request(f"d{i}", p, SamplingParams(max_tokens=8, ignore_eos=True))
                                   for i, p in enumerate(ps)], every=1)
    for i, p in enumerate(ps):
        assert list(final[f"d{i}"].token_ids) == naive_greedy(model, p, 8)
    assert engine.prefill.manager.all_free and engine.decode.manager.all_free


@pytest.mark.slow
def test_engine_matches_transformers_fixture_disaggregated():
    model = load_model(HF_FIXTURES / "qwen2")
    exp = expected("qwen2")
    engine = build_engine(model.config, model.params, deployment(**SMALL, **DISAGG, **ONE_SHAPE))
    final = engine.run_to_completion([Request(f"r{i}", tuple(p), SamplingParams(max_tokens=12, ignore_eos=True))
                                      for i, p in enumerate(exp["prompts"])])
    assert [list(final[f"r{i}"].token_ids) for i in range(3)] == exp["greedy"]


@pytest.mark.slow
@pytest.mark.parametrize("max_batch", [8, 2])  # 2: more sequences running than one step takes
def test_preemption_under_page_pressure_keeps_outputs(llama, max_batch):
    engine = build_engine(llama.config, llama.params,
                          deployment(page_size=4, num_pages=24, chunk_size=16, max_decode_batch=max_batch))
    ps = prompts(5, seed=1)
    final = engine.run_to_completion([Request(f"r{i}", p, SamplingParams(max_tokens=20, ignore_eos=True))
                                      for i, p in enumerate(ps)])
    assert engine.num_preemptions > 0
    for i, p in enumerate(ps):
        assert list(final[f"r{i}"].token_ids) == naive_greedy(llama, p, 20)
    assert engine.prefill.manager.all_free


def test_prefix_cache_hit_is_identical_and_cheaper(llama):
    system = prompts(1, seed=2)[0] * 2  # a shared "system prompt" of several pages
    turn1 = system + (11, 12, 13)
    turn2 = system + (21, 22, 23, 24, 25)
    cached = build_engine(llama.config, llama.params, deployment(**SMALL))
    cached.run_to_completion([Request("a", turn1, SamplingParams(max_tokens=4, ignore_eos=True))])
    before = cached.prefill.runner.tokens_computed
    hit = cached.run_to_completion([Request("b", turn2, SamplingParams(max_tokens=4, ignore_eos=True))])["b"]
    computed = cached.prefill.runner.tokens_computed - before

    cold = build_engine(llama.config, llama.params, deployment(**SMALL, prefix_caching=False))
    miss = cold.run_to_completion([Request("b", turn2, SamplingParams(max_tokens=4, ignore_eos=True))])["b"]
    assert hit.token_ids == miss.token_ids
    assert hit.prompt_tokens_cached >= len(system) - 4 and miss.prompt_tokens_cached == 0
    assert computed <= len(turn2) + 4 - hit.prompt_tokens_cached  # fewer prefill tokens computed
    assert cached.prefill.manager.all_free


@pytest.mark.slow
def test_seeded_sampling_is_independent_of_the_batch(llama):
    sp = SamplingParams(max_tokens=8, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    p = prompts(1, seed=3)[0]
    alone = build_engine(llama.config, llama.params, deployment(**SMALL)).run_to_completion(
        [Request("x", p, sp)])["x"]
    crowd = build_engine(llama.config, llama.params, deployment(**SMALL)).run_to_completion(
        [Request(f"o{i}", q, SamplingParams(max_tokens=5, temperature=1.0)) for i, q in enumerate(prompts(3, 4))]
        + [Request("x", p, sp)])["x"]
    assert alone.token_ids == crowd.token_ids


def test_top_k_one_is_greedy_and_logprobs_are_reported(llama):
    p = prompts(1, seed=5)[0]
    engine = build_engine(llama.config, llama.params, deployment(**SMALL))
    out = engine.run_to_completion([Request("k", p, SamplingParams(
        max_tokens=5, temperature=1.5, top_k=1, logprobs=True, ignore_eos=True))])["k"]
    assert list(out.token_ids) == naive_greedy(llama, p, 5)
    padded = np.zeros((1, 128), np.int32)
    padded[0, :len(p)] = p
    logits = forward.prefill(llama.params, jnp.asarray(padded), jnp.asarray([len(p)]), config=llama.config).logits[0]
    np.testing.assert_allclose(out.logprobs[0], jax.nn.log_softmax(logits)[out.token_ids[0]], atol=1e-4)


def test_stop_token_and_abort_free_pages(llama):
    p = prompts(1, seed=6)[0]
    first = naive_greedy(llama, p, 3)
    engine = build_engine(llama.config, llama.params, deployment(**SMALL))
    out = engine.run_to_completion([Request("s", p, SamplingParams(max_tokens=10, stop_token_ids=(first[2],)))])["s"]
    assert list(out.token_ids) == first and out.finish_reason == "stop"
    assert out.matched_token_id == first[2]
    engine.add_request(Request("a", p, SamplingParams(max_tokens=50)))
    engine.step()
    assert not engine.prefill.manager.all_free
    aborted = engine.abort("a")
    assert aborted.finish_reason == "abort" and aborted.matched_token_id is None
    assert engine.prefill.manager.all_free and not engine.has_unfinished()


def test_bad_requests_are_refused_clearly(llama):
    engine = build_engine(llama.config, llama.params, deployment(**SMALL))
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        engine.add_request(Request("v", (1, 5000)))
    with pytest.raises(InvalidRequest, match="prompt_token_ids: is empty"):
        engine.add_request(Request("e", ()))
    with pytest.raises(InvalidRequest, match="needs 1006 tokens of KV but a page pool here holds at most 252"):
        engine.add_request(Request("big", (1,) * 1000, SamplingParams(max_tokens=6)))
    engine.add_request(Request("dup", (1, 2)))
    with pytest.raises(DuplicateRequest, match="already in flight"):
        engine.add_request(Request("dup", (1, 2)))


def test_length_finish_has_no_matched_token(llama):
    engine = build_engine(llama.config, llama.params, deployment(**SMALL))
    out = engine.run_to_completion([Request("n", prompts(1, seed=6)[0],
                                            SamplingParams(max_tokens=3, ignore_eos=True))])["n"]
    assert out.finish_reason == "length" and out.matched_token_id is None


def test_a_request_no_pool_can_hold_raises_capacity_error(llama):
    engine = build_engine(llama.config, llama.params, deployment(**SMALL))
    held = engine.prefill.manager.allocate(50 * 4)  # pages held elsewhere: 13 of 63 stay free
    engine.add_request(Request("big", (7,) * 60, SamplingParams(max_tokens=4)))
    with pytest.raises(CapacityError, match="'big' .* raise kv.num_pages") as e:
        engine.step()
    assert e.value.request_id == "big"
    assert engine.abort("big").finish_reason == "abort" and not engine.has_unfinished()
    engine.prefill.manager.release(held)
    assert engine.prefill.manager.all_free


def test_engine_uses_the_first_replica_of_each_group(llama):
    cfg = parse_config({"mode": "disaggregated", "kv": {"page_size": 4, "num_pages": 16},
                        "prefill": {"devices": [2, 3, 4, 5], "tp": 2, "replicas": 2},
                        "decode": {"devices": [6, 7], "tp": 1, "replicas": 2}})
    engine = build_engine(llama.config, llama.params, cfg)
    assert [d.id for d in engine.prefill.runner.mesh.devices.flat] == [2, 3]
    assert [d.id for d in engine.decode.runner.mesh.devices.flat] == [6]


def test_build_engine_rechecks_configs_copied_without_validation(llama):
    bad = parse_config({}).model_copy(update={"mode": "disaggregated"})
    with pytest.raises(ConfigError, match="needs a 'decode' mesh"):
        build_engine(llama.config, llama.params, bad)


@pytest.mark.slow
def test_precompile_covers_every_shape_requests_use(llama):
    """After `Engine.precompile`, a mixed workload (long and short prompts, a prefix hit that
    leaves one token, decode batches of every size up to the cap, multi-step calls with every
    budget) compiles nothing more: JAX's own compile hook sees no compilation."""
    engine = build_engine(llama.config, llama.params,
                          deployment(devices=(0, 1), tp=2, page_size=4, num_pages=128,
                                     chunk_size=16, max_prefill_tokens=64, max_decode_batch=2,
                                     decode_steps_per_dispatch=4,
                                     prefill_batch_sizes=[1, 2]))  # fewer buckets: shorter
    compiled = engine.precompile()
    runner = engine.prefill.runner  # colocated: one runner
    ready = set(runner.programs.ready())
    assert compiled == len(ready)
    assert {(s.batch, s.tokens) for s in ready if s.kind == "steps"} == {(1, 4), (2, 4)}
    assert engine.precompile() == 0  # idempotent
    ps = prompts(6, seed=21) + [prompts(1, seed=22)[0] * 5] * 2
    with count_compilations() as compiles:
        final = engine.run_to_completion([Request(f"q{i}", p, SamplingParams(
            max_tokens=3 + i, ignore_eos=True)) for i, p in enumerate(ps)])
    assert len(final) == len(ps)
    assert set(runner.programs.ready()) == ready and runner.request_path_compiles == 0
    assert [name for name in compiles if "step" in name] == []
    assert engine.prefill.manager.all_free and engine.decode.manager.all_free


def test_a_follow_up_turn_reuses_the_previous_reply_from_the_prefix_cache():
    """A finished request's prompt and reply enter the prefix cache, so the next turn of the
    conversation (prompt + reply + new text) prefills only what is new, and draws the same
    tokens as without the cache."""
    from jaxpd.config import parse_config
    from jaxpd.engine.builder import build_engine
    from jaxpd.engine.request import Request
    from jaxpd.engine.sampling import SamplingParams
    from jaxpd.model.checkpoint import load_model

    model = load_model()
    first_prompt = tuple(range(5, 45))  # 40 tokens
    runs = {}
    for caching in (True, False):
        engine = build_engine(model.config, model.params, parse_config(
            {"kv": {"page_size": 16, "num_pages": 64},
             "scheduler": {"prefix_caching": caching}}))
        first = engine.run_to_completion([Request("t1", first_prompt, SamplingParams(
            max_tokens=30, ignore_eos=True))])["t1"]
        follow_up = first_prompt + tuple(first.token_ids) + (7, 8, 9)  # 73 tokens
        second = engine.run_to_completion([Request("t2", follow_up, SamplingParams(
            max_tokens=8, ignore_eos=True))])["t2"]
        runs[caching] = (first.token_ids, second)
    cached = runs[True][1]
    # prompt + reply = 70 tokens, of which the 69 fed through the model hold KV: 4 full blocks
    assert cached.prompt_tokens_cached == 64
    assert runs[False][1].prompt_tokens_cached == 0
    assert runs[True][0] == runs[False][0] and cached.token_ids == runs[False][1].token_ids
