"""The `jaxpd` CLI contract: `generate ... --json` prints one object per prompt."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HF_FIXTURES, checkpoint_with_tokenizer_eos, expected
from jaxpd.cli import main
from jaxpd.model.checkpoint import default_checkpoint, load_config
from jaxpd.tokenizer import ByteTokenizer, merge_tokenizer_eos, tokenizer_for_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _ids(prompt):
    return ",".join(map(str, prompt))


def test_generate_json_matches_transformers_greedy(capsys):
    exp = expected("llama")
    args = ["generate", "--checkpoint", str(HF_FIXTURES / "llama"), "--max-tokens", "12",
            "--temperature", "0", "--tp", "2", "--json"]
    for prompt in exp["prompts"]:
        args += ["--prompt-ids", _ids(prompt)]
    records = _run_json(capsys, *args)
    assert [r["token_ids"] for r in records] == exp["greedy"]
    assert [r["prompt_token_ids"] for r in records] == exp["prompts"]
    assert all(r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 12 for r in records)
    assert all(isinstance(r["text"], str) for r in records)


@pytest.mark.slow
def test_convert_then_generate_from_orbax(capsys, tmp_path):
    exp = expected("qwen2")
    assert main(["convert", "--checkpoint", str(HF_FIXTURES / "qwen2"), "--tp", "2",
                 "--out", str(tmp_path / "orbax")]) == 0
    assert "saved" in capsys.readouterr().out
    records = _run_json(capsys, "generate", "--checkpoint", str(tmp_path / "orbax"), "--tp", "4",
                        "--prompt-ids", _ids(exp["prompts"][1]), "--max-tokens", "12", "--json")
    assert records[0]["token_ids"] == exp["greedy"][1]


@pytest.mark.slow
def test_sampling_is_reproducible_with_a_seed(capsys):
    args = ["generate", "--checkpoint", str(HF_FIXTURES / "mistral"), "--prompt-ids", "5,6,7",
            "--max-tokens", "8", "--temperature", "1.0", "--json"]
    first = _run_json(capsys, *args, "--seed", "3")[0]["token_ids"]
    assert _run_json(capsys, *args, "--seed", "3")[0]["token_ids"] == first
    others = {tuple(_run_json(capsys, *args, "--seed", str(s))[0]["token_ids"]) for s in range(4, 8)}
    assert others != {tuple(first)}


@pytest.mark.parametrize("argv, message", [
    (["--tp", "3"], "tp=3 must divide num_heads=8"),
    (["--tp", "16"], "the deployment needs 16 devices but only 8 are visible"),
    (["--prompt", "hello"], "--prompt: this model has no tokenizer.json"),
    (["--prompt-ids", "1,99999"], "--prompt-ids: token id 99999 (at 1) is outside the vocabulary [0, 320)"),
    (["--max-tokens", "5000"], "--max-tokens: the prompt (2 tokens) + max_tokens (5000) exceeds the "
                               "model's context of 1024 tokens"),
])
def test_user_errors_are_one_line(capsys, argv, message):
    base = ["generate", "--checkpoint", str(HF_FIXTURES / "llama"), "--max-tokens", "2"]
    if not any(a.startswith("--prompt") for a in argv):
        base += ["--prompt-ids", "1,2"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_flags_are_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt-ids", "1,x"])
    assert exc.value.code == 2
    assert "--prompt-ids takes comma-separated integers" in capsys.readouterr().err


def test_help_reads_well():
    out = subprocess.run([sys.executable, "-m", "jaxpd.cli", "generate", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--checkpoint DIR", "--prompt TEXT", "--prompt-ids IDS", "--max-tokens N",
                 "--temperature T", "--tp N", "--json"):
        assert flag in out


@pytest.mark.slow
def test_console_script_on_the_embedded_default():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([str(Path(sys.executable).parent / "jaxpd"), "generate", "--prompt",
                           "It is a truth universally acknowledged, that", "--max-tokens", "24",
                           "--temperature", "0", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert 0 < len(record["token_ids"]) <= 24
    assert record["text"].strip()


def test_a_request_no_pool_can_hold_is_a_one_line_error(capsys, monkeypatch):
    from jaxpd.engine.prefill import PrefillEngine

    monkeypatch.setattr(PrefillEngine, "admit", lambda self, seq, keep_free=0: False)
    assert main(["generate", "--checkpoint", str(HF_FIXTURES / "llama"), "--prompt-ids", "1,2",
                 "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: request '0' (2 tokens) does not fit") and err.count("\n") == 1
    assert "raise kv.num_pages" in err


def test_tokenizer_for_checkpoint_and_eos_merging():
    assert tokenizer_for_checkpoint(HF_FIXTURES / "llama") is None  # no tokenizer.json: no guess
    assert tokenizer_for_checkpoint(None) is None
    tok = tokenizer_for_checkpoint(default_checkpoint())
    assert tok is not None and tok.encode("Mr. Darcy")
    config = load_config(HF_FIXTURES / "llama")
    assert merge_tokenizer_eos(config, None) is config
    merged = merge_tokenizer_eos(config.replace(eos_token_ids=(5, 257)), ByteTokenizer())
    assert merged.eos_token_ids == (5, 257)  # config's first, no duplicates
    assert merge_tokenizer_eos(config.replace(eos_token_ids=(5,)), ByteTokenizer()).eos_token_ids == (5, 257)


@pytest.mark.slow
def test_the_tokenizers_eos_ends_generation_unless_ignored(capsys, tmp_path):
    prompt = "It is a truth universally acknowledged, that"
    args = ["generate", "--prompt", prompt, "--max-tokens", "12", "--json"]
    greedy = _run_json(capsys, *args, "--ignore-eos")[0]["token_ids"]
    k = next(i for i in range(2, 12) if greedy[i] not in greedy[:i])
    folder = checkpoint_with_tokenizer_eos(tmp_path / "ckpt", greedy[k])  # e.g. Llama-3's <|eot_id|>
    stopped = _run_json(capsys, *args, "--checkpoint", str(folder))[0]
    assert stopped["token_ids"] == greedy[:k + 1] and stopped["finish_reason"] == "stop"
    ignored = _run_json(capsys, *args, "--checkpoint", str(folder), "--ignore-eos")[0]
    assert ignored["token_ids"] == greedy and ignored["finish_reason"] == "length"
