"""The bad-input table every entry point is checked against (`jaxpd.request_check`): the same
input must get the same answer from the CLI, batch mode, the router and a worker.

Each row: (label, RawRequest fields, the field refused, part of the reason, entry points that
cannot express the input). The model is the embedded default (vocab 4096, context 1024, a
tokenizer whose longest entry bounds a prompt's bytes).
"""

from __future__ import annotations

import math

CONTEXT = 1024
ALL = ("cli", "batch", "router", "worker")

ROWS = [
    ("empty ids", dict(prompt_token_ids=[]), "prompt_token_ids", "is empty", {"cli"}),
    ("empty text", dict(prompt=""), "prompt", "is empty", {"worker"}),
    ("no prompt", dict(), "prompt", "give exactly one of", {"cli", "worker"}),
    ("both prompts", dict(prompt="hi", prompt_token_ids=[5]), "prompt", "give exactly one of",
     {"cli", "router", "worker"}),
    ("max_tokens 0", dict(max_tokens=0), "max_tokens", "must be >= 1", set()),
    ("max_tokens -5", dict(max_tokens=-5), "max_tokens", "must be >= 1", set()),
    ("past the context", dict(max_tokens=CONTEXT), "max_tokens",
     f"exceeds the model's context of {CONTEXT} tokens", set()),
    ("long prompt past the context", dict(prompt_token_ids=[5] * 1000, max_tokens=100),
     "max_tokens", "the prompt (1000 tokens) + max_tokens (100) exceeds", set()),
    ("ids fill the context", dict(prompt_token_ids=[5] * CONTEXT), "prompt_token_ids",
     "leave no room", set()),
    ("temperature -0.5", dict(temperature=-0.5), "temperature", "must be >= 0", set()),
    ("temperature nan", dict(temperature=math.nan), "temperature", "must be a finite number", set()),
    ("temperature inf", dict(temperature=math.inf), "temperature", "must be a finite number", set()),
    ("top_p 0", dict(top_p=0.0), "top_p", "must be in (0, 1]", set()),
    ("top_p 1.5", dict(top_p=1.5), "top_p", "must be in (0, 1]", set()),
    ("top_p nan", dict(top_p=math.nan), "top_p", "must be a finite number", set()),
    ("top_p negative", dict(top_p=-1e-3), "top_p", "must be in (0, 1]", set()),
    ("top_k -1", dict(top_k=-1), "top_k", "must be in [0, 2147483647]", set()),
    ("seed -1", dict(seed=-1), "seed", "must be in [0, 4294967295]", {"router", "worker"}),
    ("seed 2**32", dict(seed=2**32), "seed", "must be in [0, 4294967295]", {"router", "worker"}),
    ("stop id past vocab", dict(stop_token_ids=[99999]), "stop_token_ids",
     "token id 99999 (at 0) is outside the vocabulary [0, 4096)", {"cli"}),
    ("stop id negative", dict(stop_token_ids=[-1]), "stop_token_ids",
     "token id -1 (at 0) is outside the vocabulary", {"cli"}),
    ("65 stop ids", dict(stop_token_ids=list(range(65))), "stop_token_ids", "at most 64 ids", {"cli"}),
    ("empty stop", dict(stop=[""]), "stop", "must not be empty (at 0)", set()),
    ("10,000 stops", dict(stop=["a"] * 10_000), "stop", "at most 32 stop strings, got 10000", set()),
    ("long stop", dict(stop=["x" * 257]), "stop", "at most 256 characters", set()),
    ("id past vocab", dict(prompt_token_ids=[5, 4096]), "prompt_token_ids",
     "token id 4096 (at 1) is outside the vocabulary [0, 4096)", set()),
    ("negative id", dict(prompt_token_ids=[-3]), "prompt_token_ids", "token id -3 (at 0)", set()),
    ("huge text", dict(prompt="x" * (3 << 20)), "prompt", "no text that long fits", {"worker"}),
    ("bad utf-8", dict(prompt="ab\udc80"), "prompt", "is not valid UTF-8", {"router", "worker"}),
    ("long id", dict(request_id="r" * 300), "request_id", "at most 256 characters", {"cli"}),
    ("id with newline", dict(request_id="a\nb"), "request_id", "must be printable", {"cli"}),
]


def raw_fields(row) -> dict:
    """The row's fields with a valid prompt filled in where the row is about something else."""
    _, fields, *_ = row
    if "prompt" not in fields and "prompt_token_ids" not in fields and row[0] != "no prompt":
        fields = {**fields, "prompt_token_ids": [5, 6, 7]}
    return fields


def rows_for(entry: str) -> list:
    return [r for r in ROWS if entry not in r[4]]
