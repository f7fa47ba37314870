"""Multi-step decode (k decode steps per device call) gives exactly the tokens of one step per
call, ends every request at the right token (stop ids, EOS, max_tokens, aborts, stop strings,
preemption) and gives every page back."""

import json

import numpy as np
import pytest

from conftest import HF_FIXTURES, deployment, expected
from jaxpd.cli import main
from jaxpd.engine.builder import build_engine
from jaxpd.engine.output import TextStream, drive_engine
from jaxpd.engine.request import Request
from jaxpd.engine.sampling import SamplingParams
from jaxpd.model.checkpoint import load_model
from jaxpd.tokenizer import tokenizer_for_checkpoint
from test_engine import DISAGG, SMALL, naive_greedy, prompts, run_staggered


def make_engine(model, k, config=None, **knobs):
    knobs = {**SMALL, **knobs}
    return build_engine(config or model.config, model.params,
                        deployment(decode_steps_per_dispatch=k, **knobs))


def all_free(engine):
    return engine.prefill.manager.all_free and engine.decode.manager.all_free


def first_new(tokens, start):
    """An index >= start whose token did not occur before it (a usable stop id)."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


@pytest.mark.slow
@pytest.mark.parametrize("mode, k, overlap", [
    ("colocated", 1, False), ("colocated", 1, True), ("colocated", 4, True),
    ("colocated", 8, False), ("disaggregated", 8, True)])  # the decode engine is one either way
def test_greedy_tokens_match_the_reference_for_any_k(llama, mode, k, overlap):
    """Staggered arrivals, max_tokens 5..10 (not multiples of k), overlap on and off: the
    naive reference's tokens, each request ending with "length", every page free."""
    engine = make_engine(llama, k, overlap=overlap, **(DISAGG if mode == "disaggregated" else {}))
    ps = prompts(6)
    final = run_staggered(engine, [Request(f"r{i}", p, SamplingParams(max_tokens=5 + i, ignore_eos=True))
                                   for i, p in enumerate(ps)])
    for i, p in enumerate(ps):
        assert list(final[f"r{i}"].token_ids) == naive_greedy(llama, p, 5 + i), f"request r{i}"
        assert final[f"r{i}"].finish_reason == "length"
    assert all_free(engine)
    multistep = any(s.kind == "steps" for s in engine.decode.runner.programs.ready())
    assert multistep == (k > 1 or overlap)


@pytest.mark.slow
def test_seeded_sampling_draws_the_same_tokens_for_any_k(llama):
    sp = [SamplingParams(max_tokens=11, temperature=0.9, top_k=50, top_p=0.9, seed=1234 + i,
                         ignore_eos=True, logprobs=True) for i in range(3)]
    runs = {}
    for k in (1, 8):
        engine = make_engine(llama, k)
        runs[k] = run_staggered(engine, [Request(f"s{i}", p, sp[i])
                                         for i, p in enumerate(prompts(3, seed=3))], every=1)
        assert all_free(engine)
    for rid in runs[1]:
        assert runs[8][rid].token_ids == runs[1][rid].token_ids
        np.testing.assert_allclose(runs[8][rid].logprobs, runs[1][rid].logprobs, atol=1e-5)
    assert len({out.token_ids for out in runs[8].values()}) == 3


@pytest.mark.slow
def test_stop_ids_and_eos_end_a_block_at_the_matching_token(llama):
    """A stop token id and an EOS id that first appear mid-block end their requests there; a
    request that ignores EOS runs on to max_tokens in the same batches."""
    p, q = prompts(2, seed=6)
    greedy_p, greedy_q = naive_greedy(llama, p, 14), naive_greedy(llama, q, 14)
    i, j = first_new(greedy_p, 4), first_new(greedy_q, 6)
    eos = greedy_q[j]
    engine = make_engine(llama, 8, config=llama.config.replace(eos_token_ids=(eos,)))
    final = engine.run_to_completion([
        Request("stop", p, SamplingParams(max_tokens=14, stop_token_ids=(greedy_p[i],),
                                          ignore_eos=True)),
        Request("eos", q, SamplingParams(max_tokens=14)),
        Request("on", q, SamplingParams(max_tokens=13, ignore_eos=True))])
    assert list(final["stop"].token_ids) == greedy_p[:i + 1]
    assert (final["stop"].finish_reason, final["stop"].matched_token_id) == ("stop", greedy_p[i])
    assert list(final["eos"].token_ids) == greedy_q[:j + 1]
    assert (final["eos"].finish_reason, final["eos"].matched_token_id) == ("stop", eos)
    assert list(final["on"].token_ids) == greedy_q[:13] and final["on"].finish_reason == "length"
    assert all_free(engine)


@pytest.mark.parametrize("overlap", [False, True])
def test_abort_between_dispatches_frees_every_page(llama, overlap):
    """Without overlap the abort lands between calls; with it, while a call that still
    writes the aborted request's pages is in flight (its tokens are dropped)."""
    p, q = prompts(2, seed=7)
    engine = make_engine(llama, 8, overlap=overlap)
    engine.add_request(Request("a", p, SamplingParams(max_tokens=40, ignore_eos=True)))
    engine.add_request(Request("b", q, SamplingParams(max_tokens=12, ignore_eos=True)))
    latest = {}

    def step():
        latest.update((o.id, o) for o in engine.step())

    while "a" not in latest:  # the first token from prefill (and without overlap, one call)
        step()
    if overlap:
        step()  # a call for a and b is dispatched and stays in flight
        assert engine.decode.pending and len(latest["a"].token_ids) == 1
    n = len(latest["a"].token_ids)
    assert n == (1 if overlap else 9)  # 1 + k without overlap
    aborted = engine.abort("a")
    assert aborted.finish_reason == "abort" and list(aborted.token_ids) == naive_greedy(llama, p, n)
    while engine.has_work():
        step()
    assert list(latest["b"].token_ids) == naive_greedy(llama, q, 12)
    assert all_free(engine) and not engine.has_unfinished()


@pytest.mark.slow
def test_preemption_under_a_tiny_pool_keeps_outputs_and_frees_pages(llama):
    engine = make_engine(llama, 8, page_size=4, num_pages=24, max_decode_batch=8)
    ps = prompts(5, seed=1)
    final = engine.run_to_completion([Request(f"r{i}", p, SamplingParams(max_tokens=19, ignore_eos=True))
                                      for i, p in enumerate(ps)])
    assert engine.num_preemptions > 0
    for i, p in enumerate(ps):
        assert list(final[f"r{i}"].token_ids) == naive_greedy(llama, p, 19), f"request r{i}"
    assert all_free(engine)


@pytest.mark.slow
def test_a_stop_string_matched_mid_block_ends_the_output_there():
    """Tokens arrive 8 at a time; the stream cuts at the token completing the stop string,
    the request is ended (its pages freed) and later tokens of the block are dropped."""
    model = load_model()
    tokenizer = tokenizer_for_checkpoint(model.folder)
    prompt = tokenizer.encode("It is a truth universally acknowledged, that")
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    reference = make_engine(model, 1).run_to_completion([Request("x", tuple(prompt), sp)])["x"]
    free = TextStream(tokenizer, prompt)
    free.push(reference.token_ids, final=True)
    stop = free.text.split()[3]  # a word from the middle of the continuation
    expect = TextStream(tokenizer, prompt, [stop])
    expect.push(reference.token_ids)
    assert expect.stopped and expect.num_tokens < len(reference.token_ids)

    engine = make_engine(model, 8)
    engine.add_request(Request("x", tuple(prompt), SamplingParams(max_tokens=24, ignore_eos=True,
                                                                  stop=(stop,))))
    stream = TextStream(tokenizer, prompt, [stop])
    produced, texts, done = [], [], []
    step = engine.step
    engine.step = lambda: [produced.append(len(o.token_ids)) or o for o in step()]
    drive_engine(engine, {"x": stream}, lambda o, s, text: (texts.append(text),
                                                            o.finished and done.append(o)))
    (out,) = done
    assert list(out.token_ids) == list(reference.token_ids[:expect.num_tokens])
    assert out.finish_reason == "stop" and stream.matched_stop == stop
    assert "".join(texts) == free.text[:free.text.index(stop)]
    assert max(produced) > expect.num_tokens  # the block went past the match
    assert all_free(engine) and not engine.has_unfinished()


@pytest.mark.slow
@pytest.mark.parametrize("k", ["1", "4"])
def test_generate_decode_steps_flag(capsys, k):
    exp = expected("llama")
    assert main(["generate", "--checkpoint", str(HF_FIXTURES / "llama"), "--max-tokens", "12",
                 "--temperature", "0", "--decode-steps", k, "--json",
                 "--prompt-ids", ",".join(map(str, exp["prompts"][0]))]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == exp["greedy"][0]


def test_a_request_finishing_in_its_first_dispatch_is_reported_once(llama):
    """Prefill and a whole decode block can land in one engine step: one output for it, or
    drivers would write it (and push its text) twice."""
    engine = make_engine(llama, 8)
    p = prompts(1, seed=8)[0]
    engine.add_request(Request("once", p, SamplingParams(max_tokens=5, ignore_eos=True)))
    outputs = []
    while engine.has_work():
        step = engine.step()
        assert len({o.id for o in step}) == len(step)
        outputs += step
    assert [list(o.token_ids) for o in outputs if o.finished] == [naive_greedy(llama, p, 5)]


def test_while_decoding_runs_with_the_decode_call_on_the_device(llama):
    """The hook a decode worker answers reservations from runs once per decode call, after the
    call was dispatched and before its tokens are fetched; a request reserved there (host
    bookkeeping only) takes pages the call in flight does not use."""
    from jaxpd.engine.request import Request as R

    engine = make_engine(llama, 4, **DISAGG)
    seen = []

    def hook(wait):
        seen.append(len(engine.decode.pending))
        if len(seen) == 1:
            seen.append(engine.reserve_remote(R("remote", tuple(range(3, 20))), 0) is not None)
        wait()  # returns once the call's tokens are on the device

    engine.while_decoding = hook
    final = engine.run_to_completion([Request("r0", prompts(1)[0], SamplingParams(
        max_tokens=9, ignore_eos=True))])
    assert seen[:2] == [1, True] and all(n == 1 for n in seen[2:])
    assert list(final["r0"].token_ids) == naive_greedy(llama, prompts(1)[0], 9)
    assert "remote" in engine.receiving
    engine.abort("remote")
    assert all_free(engine)
