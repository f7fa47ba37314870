"""One request check for every entry point: the bad-input table (tests/bad_requests.py) gives
the same field and reason from `check_request`, `jaxpd generate` and batch mode (the router and
a worker are checked against the same table in test_serving.py)."""

from __future__ import annotations

import io
import json

import pytest

from bad_requests import ROWS, raw_fields, rows_for
from jaxpd.cli import main
from jaxpd.engine.sampling import SamplingParams
from jaxpd.model.checkpoint import default_checkpoint, load_config
from jaxpd.request_check import (GREEDY_BELOW_TEMPERATURE, MIN_TOP_P, InvalidRequest, Limits,
                                 RawRequest, check_request)
from jaxpd.tokenizer import tokenizer_for_checkpoint

TOKENIZER = tokenizer_for_checkpoint(default_checkpoint())
LIMITS = Limits.of(load_config(default_checkpoint()))


def test_the_table_has_at_least_25_inputs():
    assert len(ROWS) >= 25 and all(len(rows_for(e)) >= 20 for e in ("cli", "batch", "router"))


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_check_request_names_the_field(row):
    _, _, field, reason, _ = row
    with pytest.raises(InvalidRequest) as e:
        check_request(RawRequest(**raw_fields(row)), LIMITS, TOKENIZER)
    assert e.value.field == field and reason in e.value.reason, str(e.value)


def _cli_argv(fields: dict) -> list[str]:
    argv = ["generate"]
    if "prompt" in fields:
        argv += ["--prompt", fields["prompt"]]
    if "prompt_token_ids" in fields:
        argv += ["--prompt-ids", ",".join(map(str, fields["prompt_token_ids"]))]
    for key in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        if key in fields:
            argv += [f"--{key.replace('_', '-')}", str(fields[key])]
    for stop in fields.get("stop", []):
        argv += ["--stop", stop]
    return argv


@pytest.mark.parametrize("row", rows_for("cli"), ids=[r[0] for r in rows_for("cli")])
def test_jaxpd_generate_gives_the_same_answer(row, capsys):
    """Refused before any weight is loaded: the flag is named, the reason is the table's."""
    _, _, field, reason, _ = row
    assert main(_cli_argv(raw_fields(row))) == 2
    err = capsys.readouterr().err
    flag = {"prompt_token_ids": "--prompt-ids"}.get(field, "--" + field.replace("_", "-"))
    assert err.startswith(f"error: {flag}: ") and reason in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_batch_mode_gives_the_same_answers(tmp_path):
    from jaxpd.config import parse_config
    from jaxpd.engine.builder import build_engine
    from jaxpd.model.checkpoint import load_model
    from jaxpd.batch import run_batch

    rows = rows_for("batch")
    lines = []
    for i, row in enumerate(rows):
        fields = raw_fields(row)
        record = {"id": fields.pop("request_id", f"r{i}"), **fields}
        lines.append(json.dumps(record))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    model = load_model()
    engine = build_engine(model.config, model.params,
                          parse_config({"kv": {"page_size": 16, "num_pages": 80}}))
    err = io.StringIO()
    summary = run_batch(src, out, engine, TOKENIZER, SamplingParams(), progress=False, err=err)
    reported = {int(line.split(":")[1]): line.split(": ", 1)[1]
                for line in err.getvalue().splitlines() if line.startswith(str(src))}
    assert summary.bad_records == len(rows) and summary.completed == 0
    for number, (label, _, field, reason, _) in enumerate(rows, 1):
        assert reported[number].startswith(f"{field}: ") and reason in reported[number], (label, reported[number])


def test_degenerate_sampling_values_are_normalised_not_silently_wrong():
    """top_p 1e-45 used to flush to zero in float32 and sample token 0 forever."""
    checked = check_request(RawRequest(prompt_token_ids=[5], top_p=1e-45, temperature=1e-9),
                            LIMITS, TOKENIZER)
    assert checked.sampling.top_p == MIN_TOP_P and checked.sampling.temperature == 0.0
    assert GREEDY_BELOW_TEMPERATURE > 1e-9


def test_the_sampler_keeps_the_likeliest_token_whatever_top_p():
    import jax.numpy as jnp
    import numpy as np

    from jaxpd.engine.sampling import sample, sampling_arrays

    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 50)), jnp.float32)
    arrays = sampling_arrays([SamplingParams(temperature=1.0, top_p=1e-45)] * 2, [1, 2], [0, 0], 2)
    tokens, _ = sample(logits, arrays._replace(top_p=jnp.zeros(2)))
    assert list(np.asarray(tokens)) == list(np.argmax(np.asarray(logits), axis=-1))
