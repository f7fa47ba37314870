"""Offline batch generation: JSONL in/out, bad records skipped by line, resumable, stop strings."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import checkpoint_with_tokenizer_eos, expected
from jaxpd.batch import completed_ids, run_batch
from jaxpd.cli import main
from jaxpd.config import parse_config
from jaxpd.engine.builder import build_engine
from jaxpd.engine.request import Request
from jaxpd.engine.sampling import SamplingParams
from jaxpd.model.checkpoint import load_model
from jaxpd.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SMALL_POOL = parse_config({"kv": {"page_size": 4, "num_pages": 64}, "scheduler": {"chunk_size": 16}})


def write_jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def read_jsonl(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


@pytest.mark.slow
def test_batch_outputs_bad_records_and_pages(llama, tmp_path):
    exp = expected("llama")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [
        {"id": "p0", "prompt_token_ids": exp["prompts"][0]},
        "{not json",
        {"id": "p1", "prompt_token_ids": exp["prompts"][1], "max_tokens": 5},
        {"id": "both", "prompt": "x", "prompt_token_ids": [1]},
        {"id": "zero", "prompt_token_ids": [1], "max_tokens": 0},
        {"id": "p0", "prompt_token_ids": [4]},
        {"id": 7, "prompt_token_ids": exp["prompts"][2]},
        {"id": "oov", "prompt_token_ids": [1, 100000]},
        {"id": "text", "prompt": "no tokenizer here"},
    ])
    engine = build_engine(llama.config, llama.params, SMALL_POOL)
    err = io.StringIO()
    summary = run_batch(src, out, engine, None, SamplingParams(max_tokens=12, ignore_eos=True),
                        progress=False, err=err)
    records = {r["id"]: r for r in read_jsonl(out)}
    assert records["p0"]["token_ids"] == exp["greedy"][0]
    assert records["p1"]["token_ids"] == exp["greedy"][1][:5] and records["p1"]["finish_reason"] == "length"
    assert records["7"]["token_ids"] == exp["greedy"][2]
    assert records["7"]["usage"] == {"prompt_tokens": 23, "completion_tokens": 12, "total_tokens": 35,
                                     "cached_prompt_tokens": 0}
    reported = err.getvalue().splitlines()
    for line_no, text in [(2, "Invalid JSON"), (4, "give exactly one of prompt (text) or prompt_token_ids"),
                          (5, "max_tokens: must be >= 1"),
                          (6, "duplicate id 'p0'"), (8, "outside the vocabulary"), (9, "no tokenizer.json")]:
        assert any(l.startswith(f"{src}:{line_no}: ") and text in l for l in reported), (line_no, reported)
    assert summary.completed == 3 and summary.bad_records == 6
    assert engine.prefill.manager.all_free


@pytest.mark.slow
def test_resume_skips_done_ids_and_repairs_a_torn_line(llama, tmp_path):
    exp = expected("llama")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"id": f"r{i}", "prompt_token_ids": p} for i, p in enumerate(exp["prompts"])])
    out.write_text(json.dumps({"id": "r0", "token_ids": [1], "text": "", "finish_reason": "length"})
                   + "\n" + '{"id": "r1", "token_')
    assert completed_ids(out) == {"r0"}
    assert out.read_text().endswith("}\n")  # the torn line is gone
    engine = build_engine(llama.config, llama.params, parse_config({"kv": {"page_size": 4, "num_pages": 64}}))
    summary = run_batch(src, out, engine, None, SamplingParams(max_tokens=12, ignore_eos=True), progress=False)
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == ["r0", "r1", "r2"] and summary.skipped_done == 1 and summary.completed == 2
    assert {r["id"]: r["token_ids"] for r in read_jsonl(out)}["r2"] == exp["greedy"][2]


@pytest.mark.slow
def test_stop_strings_cut_the_text_and_end_the_request(tmp_path):
    model = load_model()
    tok = load_tokenizer(model.folder)
    engine = build_engine(model.config, model.params, parse_config({"kv": {"num_pages": 512}}))
    prompt = "It is a truth universally acknowledged, that"
    write_jsonl(tmp_path / "free.jsonl", [{"id": "free", "prompt": prompt, "max_tokens": 30}])
    run_batch(tmp_path / "free.jsonl", tmp_path / "free.out", engine, tok, SamplingParams(), progress=False)
    full = read_jsonl(tmp_path / "free.out")[0]["text"]
    stop = full.split()[4]  # a word from the middle of the greedy continuation
    write_jsonl(tmp_path / "stop.jsonl", [{"id": "stopped", "prompt": prompt, "max_tokens": 30, "stop": [stop]}])
    run_batch(tmp_path / "stop.jsonl", tmp_path / "stop.out", engine, tok, SamplingParams(), progress=False)
    stopped = read_jsonl(tmp_path / "stop.out")[0]
    assert stopped["text"] == full[:full.index(stop)]
    assert stopped["finish_reason"] == "stop"
    assert len(stopped["token_ids"]) < 30
    assert engine.prefill.manager.all_free


@pytest.mark.slow
def test_cli_batch_on_the_embedded_default_disaggregated(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"id": "a1", "prompt": "Mr. Darcy"}, {"id": "a2", "prompt_token_ids": [5, 6, 7]},
                      {"id": "a3", "prompt": "She", "temperature": 0.8, "seed": 3, "max_tokens": 4}])
    assert main(["generate", "--config", str(REPO / "configs" / "cpu-disaggregated.yaml"),
                 "--input", str(src), "--output", str(out), "--max-tokens", "8", "--no-progress"]) == 0
    records = {r["id"]: r for r in read_jsonl(out)}
    assert set(records) == {"a1", "a2", "a3"}
    assert len(records["a3"]["token_ids"]) <= 4 and records["a1"]["text"]
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["completed"] == 3


def test_tool_script_shows_usage():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "batch_generate.py")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--input IN.jsonl --output OUT.jsonl" in proc.stderr


def test_a_corrupt_middle_output_line_is_reported_not_truncated(tmp_path):
    out = tmp_path / "out.jsonl"
    good = lambda rid: json.dumps({"id": rid, "token_ids": [1], "finish_reason": "length"})  # noqa: E731
    out.write_text("\n".join([good("r0"), '{"id": "r1", "tok', good("r2"), "[1, 2]", '{"text": "x"}',
                              "", good("r3"), '{"id": "r4"']))
    err = []
    assert completed_ids(out, err.append) == {"r0", "r2", "r3"}
    assert [e.split(": ")[0] for e in err] == [f"{out}:2", f"{out}:4", f"{out}:5"]
    assert "not valid JSON" in err[0] and "expected a JSON object" in err[1] and "no 'id'" in err[2]
    assert out.read_text().endswith(good("r3") + "\n")  # only the torn last line is cut
    assert '{"id": "r1", "tok' in out.read_text()


def test_a_newline_terminated_but_unparsable_last_line_is_cut(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "a"}) + "\n" + '{"id": "b", "te\n')
    err = []
    assert completed_ids(out, err.append) == {"a"} and not err
    assert out.read_text() == json.dumps({"id": "a"}) + "\n"


def test_records_that_are_not_objects_or_lack_an_id_are_reported(llama, tmp_path):
    exp = expected("llama")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b"\n".join([
        b"[1, 2]", b'"text"', json.dumps({"prompt_token_ids": [1, 2]}).encode(),
        json.dumps({"id": "", "prompt_token_ids": [1, 2]}).encode(), b'{"id": "u", "prompt": "\xff"}',
        json.dumps({"id": "k", "prompt_token_ids": [1, 2], "top_k": 2**40}).encode(),
        json.dumps({"id": "ok", "prompt_token_ids": exp["prompts"][0]}).encode()]) + b"\n")
    out.write_text('"just a string"\n')
    engine = build_engine(llama.config, llama.params, SMALL_POOL)
    err = io.StringIO()
    summary = run_batch(src, out, engine, None, SamplingParams(max_tokens=12, ignore_eos=True),
                        progress=False, err=err)
    reported = err.getvalue().splitlines()
    assert reported[0].startswith(f"{out}:1: expected a JSON object")
    for line_no, text in [(1, "expected a JSON object like"), (2, "expected a JSON object like"),
                          (3, "missing 'id'"), (4, "request_id: is required here"),
                          (5, "prompt: is not valid UTF-8"), (6, "top_k: must be in [0, 2147483647]")]:
        assert any(l.startswith(f"{src}:{line_no}: ") and text in l for l in reported), (line_no, reported)
    assert summary.bad_records == 6 and summary.completed == 1
    assert read_jsonl(out)[1]["token_ids"] == exp["greedy"][0]


def test_a_record_no_pool_can_hold_is_reported_and_the_rest_finish(llama, tmp_path):
    exp = expected("llama")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"id": "a", "prompt_token_ids": exp["prompts"][0]},
                      {"id": "big", "prompt_token_ids": [7] * 60, "max_tokens": 4},
                      {"id": "b", "prompt_token_ids": exp["prompts"][1]}])
    engine = build_engine(llama.config, llama.params, SMALL_POOL)
    held = engine.prefill.manager.allocate(50 * 4)  # pages held elsewhere: 13 of 63 stay free
    err = io.StringIO()
    summary = run_batch(src, out, engine, None, SamplingParams(max_tokens=12, ignore_eos=True),
                        progress=False, err=err)
    assert err.getvalue().startswith(f"{src}:2: request 'big' (60 tokens) does not fit")
    records = {r["id"]: r for r in read_jsonl(out)}
    assert set(records) == {"a", "b"} and records["b"]["token_ids"] == exp["greedy"][1]
    assert summary.completed == 2 and summary.bad_records == 1
    engine.prefill.manager.release(held)
    assert engine.prefill.manager.all_free


PROMPT = "It is a truth universally acknowledged, that"


@pytest.fixture(scope="module")
def eos_checkpoint(tmp_path_factory):
    """(folder, greedy tokens, k): the default model with a tokenizer-only EOS id that greedy
    decoding of PROMPT produces as its k-th token (k >= 2, its first occurrence)."""
    model = load_model()
    tok = load_tokenizer(model.folder)
    engine = build_engine(model.config, model.params, parse_config({"kv": {"num_pages": 256}}))
    greedy = list(engine.run_to_completion([Request("g", tuple(tok.encode(PROMPT)),
                                                    SamplingParams(max_tokens=12, ignore_eos=True))])["g"].token_ids)
    k = next(i for i in range(2, 12) if greedy[i] not in greedy[:i])
    assert not set(greedy[:k + 1]) & set(model.config.eos_token_ids)
    folder = checkpoint_with_tokenizer_eos(tmp_path_factory.mktemp("eos") / "ckpt", greedy[k])
    return folder, greedy, k


@pytest.mark.slow
def test_record_stop_token_ids_add_to_the_tokenizers_eos(eos_checkpoint, tmp_path):
    folder, greedy, k = eos_checkpoint
    unused = next(t for t in range(2, 4096) if t not in greedy)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"id": "plain", "prompt": PROMPT},
                      {"id": "user_stop", "prompt": PROMPT, "stop_token_ids": [unused]},
                      {"id": "ignore", "prompt": PROMPT, "ignore_eos": True}])
    assert main(["generate", "--checkpoint", str(folder), "--input", str(src), "--output", str(out),
                 "--max-tokens", "12", "--no-progress"]) == 0
    records = {r["id"]: r for r in read_jsonl(out)}
    for rid in ("plain", "user_stop"):  # the tokenizer's EOS still ends it
        assert records[rid]["token_ids"] == greedy[:k + 1] and records[rid]["finish_reason"] == "stop", rid
    assert records["ignore"]["token_ids"] == greedy and records["ignore"]["finish_reason"] == "length"


