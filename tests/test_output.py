"""The output stage: TextStream (detokenize, hold back, stop strings) and `drive_engine`, the
one loop that `jaxpd generate` and batch mode both run."""

import dataclasses
import json

import pytest

from jaxpd.cli import main
from jaxpd.engine import output as output_mod
from jaxpd.engine.output import TextStream, drive_engine
from jaxpd.engine.request import RequestOutput
from jaxpd.errors import CapacityError
from jaxpd.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
PROMPT = "It is a truth universally acknowledged, that"


def ids(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def push_each(stream: TextStream, text: str) -> str:
    """Push one byte-token at a time; return everything released."""
    return "".join(stream.push([t]) for t in ids(text))


# -- TextStream ----------------------------------------------------------------------------------
def test_matched_stop_names_the_stop_string_and_cuts_before_it():
    s = TextStream(TOK, ids("prompt"), stop=["END", "xy"])
    assert push_each(s, "hello xyz and more") == "hello "
    assert (s.stopped, s.matched_stop, s.text, s.num_tokens) == (True, "xy", "hello ", 8)
    assert s.push(ids("more"), final=True) == ""  # nothing after a stop


def test_the_earliest_match_wins_not_the_first_listed():
    s = TextStream(TOK, (), stop=["cd", "bcd"])
    push_each(s, "abcd")
    assert s.matched_stop == "bcd" and s.text == "a"


def test_no_stop_means_no_match_and_no_hold_back():
    s = TextStream(TOK, (), stop=["zzz"])
    assert s.push(ids("abc"), final=True) == "abc"
    assert not s.stopped and s.matched_stop is None
    plain = TextStream(TOK, ())
    assert push_each(plain, "abc") == "abc"  # no stop strings: nothing is held back


def test_text_that_may_start_a_stop_string_is_held_back():
    s = TextStream(TOK, (), stop=["STOP"])
    assert s.push(ids("abcdef")) == "abc"  # the last len("STOP") - 1 chars wait
    assert s.push(ids("xyST")) == "defx"
    assert s.push(ids("OP!")) == "y"  # "ST" was never shown
    assert s.stopped and s.text == "abcdefxy" and s.num_tokens == 12


def test_held_back_text_is_released_at_the_end():
    s = TextStream(TOK, (), stop=["STOP"])
    assert s.push(ids("abST")) == "a"
    assert s.push([], final=True) == "bST"
    assert not s.stopped and s.text == "abST"


def test_a_stop_string_across_pushes_and_inside_one_push():
    s = TextStream(TOK, (), stop=["STOP"])
    assert s.push(ids("abST")) + s.push(ids("OPcd")) == "ab"
    assert s.num_tokens == 6  # the token that completed the match; "cd" was not consumed
    one = TextStream(TOK, (), stop=["STOP"])
    assert one.push(ids("abSTOPcd")) == "ab" and one.num_tokens == 6


def test_multibyte_characters_wait_for_their_last_byte():
    s = TextStream(TOK, (), stop=["é!"])
    e1, e2 = ids("é")
    assert s.push([e1]) == "" and s.push([e2]) == ""  # held: "é" may start "é!"
    assert s.push(ids("!"), final=True) == "" and s.matched_stop == "é!" and s.text == ""


# -- drive_engine --------------------------------------------------------------------------------
def out(rid, tokens, finish=None, matched=None):
    return RequestOutput(rid, (1,), tuple(tokens), None, finish, matched_token_id=matched)


class ScriptedEngine:
    """Replays a script of step results (lists of outputs, or an exception to raise)."""

    def __init__(self, script):
        self.script, self.aborted, self.last = list(script), [], {}

    def has_work(self):
        return bool(self.script)

    def step(self):
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        outs = [o for o in item if o.id not in {a for a, _ in self.aborted}]
        self.last.update((o.id, o) for o in outs)
        return outs

    def abort(self, rid, reason="abort"):
        self.aborted.append((rid, reason))
        self.script = [s if isinstance(s, Exception) else [o for o in s if o.id != rid]
                       for s in self.script]
        prev = self.last.get(rid, out(rid, ()))
        return dataclasses.replace(prev, finish_reason=reason)


def record(calls):
    return lambda o, stream, text: calls.append((o, stream, text))


def test_driver_pushes_deltas_and_ends_requests_on_a_stop_string():
    a, b = ids("ab"), ids("xySTOPzz")
    engine = ScriptedEngine([
        [out("a", a[:1]), out("b", b[:3])],
        [out("a", a, "stop", matched=257), out("b", b[:6])],  # b's 6th token completes "STOP"
        [out("b", b)],
    ])
    streams = {"b": TextStream(TOK, (), stop=["STOP"])}
    calls = []
    drive_engine(engine, streams, record(calls))
    assert engine.aborted == [("b", "stop")]
    assert [(o.id, o.finish_reason, text) for o, _, text in calls] == [
        ("a", None, ""), ("b", None, ""), ("a", "stop", ""), ("b", "stop", "xy")]
    done_a, done_b = calls[2][0], calls[3][0]
    assert done_a.matched_token_id == 257 and calls[2][1] is None
    assert done_b.token_ids == tuple(b[:6]) and done_b.matched_token_id is None
    assert calls[3][1] is streams["b"] and streams["b"].matched_stop == "STOP"


def test_a_stop_string_on_the_last_token_still_reports_stop():
    engine = ScriptedEngine([[out("a", ids("okEND"), "length")]])
    calls = []
    drive_engine(engine, {"a": TextStream(TOK, (), stop=["END"])}, record(calls))
    (o, stream, text), = calls
    assert (o.finish_reason, text, stream.matched_stop) == ("stop", "ok", "END")
    assert engine.aborted == []  # already finished: nothing to abort


def test_capacity_errors_propagate_unless_handled():
    with pytest.raises(CapacityError):
        drive_engine(ScriptedEngine([CapacityError("too big", request_id="x")]), {}, record([]))
    engine = ScriptedEngine([CapacityError("too big", request_id="x"), [out("y", [5], "length")]])
    calls, dropped = [], []
    drive_engine(engine, {}, record(calls), on_capacity_error=lambda rid, e: dropped.append((rid, str(e))))
    assert dropped == [("x", "too big")] and engine.aborted == [("x", "abort")]
    assert [o.id for o, _, _ in calls] == ["y"]


# -- both entry points run the same driver -------------------------------------------------------
@pytest.fixture
def driver_calls(monkeypatch):
    calls = []

    def spy(engine, streams, on_output, **kw):
        calls.append(sorted(streams))
        return drive_engine(engine, streams, on_output, **kw)

    monkeypatch.setattr(output_mod, "drive_engine", spy)  # `jaxpd generate` imports it per call
    monkeypatch.setattr("jaxpd.batch.drive_engine", spy)
    return calls


@pytest.mark.slow
def test_generate_and_batch_share_the_driver_and_agree_on_stop_strings(driver_calls, tmp_path, capsys):
    common = ["generate", "--max-tokens", "24", "--temperature", "0"]
    assert main([*common, "--prompt", PROMPT, "--json"]) == 0
    free = json.loads(capsys.readouterr().out)
    stop = free["text"].split()[3]  # a word from the middle of the greedy continuation
    assert main([*common, "--prompt", PROMPT, "--stop", stop, "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": "s", "prompt": PROMPT, "stop": [stop]}) + "\n")
    assert main([*common, "--input", str(src), "--output", str(dst), "--no-progress"]) == 0
    batch = json.loads(dst.read_text())
    assert driver_calls == [["0"], ["0"], ["s"]]
    assert single["text"] == batch["text"] == free["text"][:free["text"].index(stop)]
    assert single["token_ids"] == batch["token_ids"] and single["finish_reason"] == batch["finish_reason"] == "stop"
    assert len(single["token_ids"]) < len(free["token_ids"])
