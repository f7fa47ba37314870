"""Step programs compiled ahead of time: the table, the background thread, and an engine that
serves shapes it never compiled by padding up or trimming to ready programs."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import count_compilations, deployment, first_programs_only
from jaxpd.engine.builder import build_engine
from jaxpd.engine.programs import StepPrograms, StepShape
from jaxpd.engine.request import Request
from jaxpd.engine.sampling import SamplingParams


def _toy_lowerer(calls: list):
    """Lowers a tiny program whose shape follows the StepShape (cheap to compile)."""
    def lower(shape: StepShape):
        calls.append(shape)
        x = jax.ShapeDtypeStruct((shape.batch, shape.tokens), jnp.float32)
        return jax.jit(lambda a: a * 2 + 1).lower(x)
    return lower


def test_covers_needs_every_dimension_and_the_same_kind():
    s = StepShape("step", 4, 64, 8)
    assert s.covers(StepShape("step", 1, 16, 8)) and s.covers(s)
    assert not s.covers(StepShape("step", 8, 16, 8))
    assert not s.covers(StepShape("step", 1, 128, 8))
    assert not s.covers(StepShape("step", 1, 16, 16))
    d = StepShape("steps", 4, 8, 8, 8)
    assert d.covers(StepShape("steps", 2, 8, 8, 8))
    assert not d.covers(StepShape("steps", 2, 4, 8, 8))  # steps per call is not padded
    assert not d.covers(StepShape("steps", 2, 8, 8, 16))  # more stop ids than columns
    assert not s.covers(StepShape("steps", 1, 1, 8, 8)) and not d.covers(StepShape("step", 1, 8, 8))


def test_a_shape_compiles_once_even_when_two_threads_want_it():
    calls = []
    programs = StepPrograms(_toy_lowerer(calls))
    shape = StepShape("step", 2, 3, 1)
    results = []
    threads = [threading.Thread(target=lambda: results.append(programs.compile(shape)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [shape] and len({id(r) for r in results}) == 1
    np.testing.assert_array_equal(results[0](np.ones((2, 3), np.float32)), np.full((2, 3), 3.0))
    assert programs.compile_all([shape, StepShape("step", 1, 1, 1)]) == 1


def test_background_compiles_in_order_and_a_preferred_shape_jumps_the_queue():
    calls = []
    entered, gate = threading.Event(), threading.Event()
    lower = _toy_lowerer(calls)

    def slow_first(shape):
        if not entered.is_set():  # hold the thread on the first shape while the queue changes
            entered.set()
            gate.wait(10)
        return lower(shape)

    programs = StepPrograms(slow_first)
    shapes = [StepShape("step", b, 1, 1) for b in (1, 2, 4, 8)]
    seen = []
    programs.plan(shapes)  # as a worker does, so its progress counts them all from the start
    assert programs.progress().total == 4 and programs.progress().done == 0
    programs.compile_in_background(shapes, on_progress=seen.append)
    assert entered.wait(10)
    programs.prefer(shapes[3])
    gate.set()
    assert programs.wait(30)
    assert calls == [shapes[0], shapes[3], shapes[1], shapes[2]]
    assert [p.done for p in seen] == [1, 2, 3, 4] and seen[-1].total == 4
    assert not programs.progress().compiling and programs.progress().seconds > 0


def test_a_shape_that_fails_to_compile_in_the_background_is_not_retried():
    calls = []
    lower = _toy_lowerer(calls)
    bad = StepShape("step", 3, 1, 1)

    def failing(shape):
        if shape == bad:
            calls.append(shape)
            raise RuntimeError("XLA says no")
        return lower(shape)

    programs = StepPrograms(failing)
    programs.compile_in_background([bad, StepShape("step", 1, 1, 1)], on_demand=True)
    assert programs.wait(30)
    programs.prefer(bad)  # a step wants it again: the failure stands, nothing is queued
    assert programs.wait(30)
    assert calls.count(bad) == 1 and StepShape("step", 1, 1, 1) in programs


SMALL = dict(page_size=4, num_pages=96, chunk_size=32, max_prefill_tokens=64,
             max_decode_batch=4, decode_steps_per_dispatch=4)


def _greedy(engine, prompts, max_tokens=5):
    return {k: list(v.token_ids) for k, v in engine.run_to_completion(
        [Request(f"r{i}", p, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
         for i, p in enumerate(prompts)]).items()}


@pytest.fixture(scope="module")
def prompts(llama):
    rng = np.random.default_rng(5)
    return [tuple(int(t) for t in rng.integers(3, llama.config.vocab_size, n))
            for n in (40, 7, 23)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_an_engine_serves_shapes_it_never_compiled_without_compiling(llama, prompts, mode):
    """Only the first prefill and decode programs are compiled (batch 1, the smallest chunk),
    as a worker has them when it opens its port; three prompts of up to 40 tokens arrive at
    once. Prefill is trimmed to one 16-token chunk per step and decode to one row per call;
    no step program is compiled on this (the request) thread, the tokens equal an engine that
    compiles every shape it wants, and every page comes back."""
    extra = dict(devices=(0, 1), tp=2, decode_devices=(4,), decode_tp=1) \
        if mode == "disaggregated" else dict(devices=(0, 1), tp=2)
    reference = _greedy(build_engine(llama.config, llama.params, deployment(**SMALL, **extra)),
                        prompts)
    engine = first_programs_only(build_engine(llama.config, llama.params,
                                              deployment(**SMALL, **extra)))
    first = {runner: set(runner.programs.ready()) for runner, _ in engine.shapes()}
    assert all(len(shapes) <= 2 for shapes in first.values())
    with count_compilations() as compiles:
        assert _greedy(engine, prompts) == reference
    assert [n for n in compiles if "step" in n] == []
    for runner, ready in first.items():
        assert set(runner.programs.ready()) == ready and runner.request_path_compiles == 0
    assert engine.prefill.manager.all_free and engine.decode.manager.all_free


@pytest.mark.slow
def test_a_step_pads_up_to_the_smallest_ready_program_that_covers_it(llama, prompts):
    reference = _greedy(build_engine(llama.config, llama.params, deployment(**SMALL, devices=(0,))),
                        prompts[1:2], max_tokens=1)
    engine = build_engine(llama.config, llama.params, deployment(**SMALL, devices=(0,)))
    runner = engine.prefill.runner
    width = runner.table_widths()[0]
    big, bigger = StepShape("step", 4, 32, width), StepShape("step", 4, 64, width)
    runner.programs.compile_all([big, bigger])
    runner.compile_on_demand = False
    wanted = StepShape("step", 2, 16, width)
    assert runner._choose(wanted) == big  # the least padding
    runner.programs.compile_in_background([wanted])  # a planned shape: the wanted one jumps
    assert runner.programs.wait(60) and runner._choose(wanted) == wanted
    with count_compilations() as compiles:
        out = _greedy(engine, prompts[1:2], max_tokens=1)  # a 7-token prompt: [1, 16] padded
    assert [n for n in compiles if "step" in n] == [] and out == reference


def test_a_short_chunk_waits_rather_than_pad_a_long_one_past_the_budget(llama):
    """A 60-token prompt and a 10-token one, budget 64: together they would run as 2 x 64
    rows (the long chunk's bucket), twice the budget; the short one takes the next step. Two
    short ones (2 x 16) share a step."""
    from jaxpd.engine.request import Sequence

    engine = build_engine(llama.config, llama.params,
                          deployment(page_size=4, num_pages=64, chunk_size=64,
                                     max_prefill_tokens=64, devices=(0,)))
    prefill = engine.prefill
    assert prefill.padded_tokens(2, 60) == 128 and prefill.padded_tokens(2, 10) == 32
    seqs = [Sequence(Request(f"s{i}", tuple(range(3, 3 + n))), seed=0)
            for i, n in enumerate((60, 10, 12))]
    assert all(prefill.admit(seq) for seq in seqs)
    assert [s.id for s in prefill.step(seqs)] == ["s0"]
    assert [s.num_computed for s in seqs] == [60, 0, 0]
    assert [s.id for s in prefill.step(seqs[1:])] == ["s1", "s2"]


@pytest.mark.slow
def test_trimmed_decode_rows_take_turns(llama, prompts):
    """With only a one-row decode program, three running sequences share it in turns rather than
    the oldest running to its end first: each has tokens before any finishes."""
    engine = first_programs_only(build_engine(llama.config, llama.params,
                                              deployment(**SMALL, devices=(0,))))
    for i, p in enumerate(prompts):
        engine.add_request(Request(f"t{i}", p[:8], SamplingParams(max_tokens=12, ignore_eos=True)))
    produced = {}
    while engine.has_work():
        outs = engine.step()
        produced.update((o.id, len(o.token_ids)) for o in outs)
        if any(o.finished for o in outs):
            break
    assert len(produced) == 3 and min(produced.values()) > 1, produced


def test_generate_says_what_compiling_cost_before_the_first_token():
    """Off a terminal `CompileStatus` prints one line when the first token arrives, and only
    when compiling took longer than its delay."""
    import io
    import types

    from jaxpd.compile_status import CompileStatus

    table = types.SimpleNamespace(programs=type("P", (), {
        "seconds": 0.0, "compiling": lambda self: [], "__len__": lambda self: self.n, "n": 0})())
    out = io.StringIO()
    with CompileStatus([table], out, delay_s=0.05) as status:
        table.programs.seconds, table.programs.n = 2.5, 3  # compiling happened meanwhile
        status.first_token()
        assert status.done
    assert out.getvalue() == ("jaxpd: compiled 3 step programs in 2.5 s before the first "
                              "token\n")
    quiet = io.StringIO()
    with CompileStatus([table], quiet, delay_s=5.0):
        table.programs.seconds += 1.0  # under the delay: nothing to say
    assert quiet.getvalue() == ""
