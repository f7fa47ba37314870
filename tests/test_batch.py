"""Offline batch generation: JSONL in/out, bad records skipped by line, resumable, stop strings."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HF_FIXTURES, expected
from jaxpd.batch import completed_ids, run_batch
from jaxpd.cli import main
from jaxpd.engine.builder import EngineOptions, build_engine
from jaxpd.engine.sampling import SamplingParams
from jaxpd.model.checkpoint import load_model
from jaxpd.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama():
    return load_model(HF_FIXTURES / "llama")


def write_jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def read_jsonl(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


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
    engine = build_engine(llama.config, llama.params, EngineOptions(page_size=4, num_pages=64, chunk_size=16))
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
    for line_no, text in [(2, "Invalid JSON"), (4, "exactly one of 'prompt' or 'prompt_token_ids'"),
                          (5, "max_tokens: Input should be greater than or equal to 1"),
                          (6, "duplicate id 'p0'"), (8, "outside the vocabulary"), (9, "no tokenizer.json")]:
        assert any(l.startswith(f"{src}:{line_no}: ") and text in l for l in reported), (line_no, reported)
    assert summary.completed == 3 and summary.bad_records == 6
    assert engine.prefill.manager.all_free


def test_resume_skips_done_ids_and_repairs_a_torn_line(llama, tmp_path):
    exp = expected("llama")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"id": f"r{i}", "prompt_token_ids": p} for i, p in enumerate(exp["prompts"])])
    out.write_text(json.dumps({"id": "r0", "token_ids": [1], "text": "", "finish_reason": "length"})
                   + "\n" + '{"id": "r1", "token_')
    assert completed_ids(out) == {"r0"}
    assert out.read_text().endswith("}\n")  # the torn line is gone
    engine = build_engine(llama.config, llama.params, EngineOptions(page_size=4, num_pages=64))
    summary = run_batch(src, out, engine, None, SamplingParams(max_tokens=12, ignore_eos=True), progress=False)
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == ["r0", "r1", "r2"] and summary.skipped_done == 1 and summary.completed == 2
    assert {r["id"]: r["token_ids"] for r in read_jsonl(out)}["r2"] == exp["greedy"][2]


def test_stop_strings_cut_the_text_and_end_the_request(tmp_path):
    model = load_model()
    tok = load_tokenizer(model.folder)
    engine = build_engine(model.config, model.params, EngineOptions())
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
