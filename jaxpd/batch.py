"""Offline batch generation: JSONL prompts in, JSONL completions out, every request in flight.

Input records: {"id": "a1", "prompt": "text"} or {"id": "a2", "prompt_token_ids": [1, 2]}, with
optional max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos, logprobs.
Output records: id, token_ids (generated only), text, finish_reason, usage.

Resumable: ids already in the output are skipped and a half-written last line (an interrupted
run) is cut off before appending. A bad record is reported with its line number and skipped.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tqdm import tqdm

from jaxpd.engine.orchestrator import Engine
from jaxpd.engine.output import TextStream
from jaxpd.engine.request import Request, RequestOutput
from jaxpd.engine.sampling import SamplingParams
from jaxpd.errors import ConfigError, JaxpdError
from jaxpd.tokenizer import Tokenizer


class BatchRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: bool = False

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_prompt(self) -> BatchRecord:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of 'prompt' or 'prompt_token_ids'")
        if self.prompt_token_ids is not None and not self.prompt_token_ids:
            raise ValueError("'prompt_token_ids' is empty")
        return self

    def sampling(self, defaults: SamplingParams) -> SamplingParams:
        d = defaults
        return SamplingParams(
            max_tokens=self.max_tokens or d.max_tokens,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_k=d.top_k if self.top_k is None else self.top_k,
            top_p=d.top_p if self.top_p is None else self.top_p,
            seed=d.seed if self.seed is None else self.seed,
            stop_token_ids=tuple(self.stop_token_ids) or d.stop_token_ids,
            stop=tuple(self.stop) or d.stop, ignore_eos=self.ignore_eos or d.ignore_eos,
            logprobs=self.logprobs or d.logprobs)


@dataclasses.dataclass
class BatchSummary:
    completed: int = 0
    skipped_done: int = 0
    bad_records: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_tokens_per_s"] = round(self.completion_tokens / self.seconds, 2) if self.seconds else None
        return d


def completed_ids(output: Path) -> set[str]:
    """Ids already written; cuts off a half-written last line so appending stays valid JSONL."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    ids, good_end = set(), 0
    for line in data.splitlines(keepends=True):
        try:
            record = json.loads(line)
            if not line.endswith(b"\n"):
                raise ValueError("no newline: the writer was interrupted")
        except ValueError:
            break
        ids.add(str(record["id"]))
        good_end += len(line)
    if good_end < len(data):
        with open(output, "r+b") as f:
            f.truncate(good_end)
    return ids


def read_records(path: Path, done: set[str], report: Callable[[str], None]):
    """Valid, not-yet-done records with their line numbers; bad ones are reported and skipped."""
    seen: set[str] = set()
    records, bad = [], 0
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = BatchRecord.model_validate_json(line)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            report(f"{path}:{number}: {where + ': ' if where else ''}{err['msg'].removeprefix('Value error, ')}")
            bad += 1
            continue
        if record.id in seen:
            report(f"{path}:{number}: duplicate id {record.id!r}")
            bad += 1
            continue
        seen.add(record.id)
        if record.id not in done:
            records.append((number, record))
    return records, bad


def run_batch(input_path: str | Path, output_path: str | Path, engine: Engine,
              tokenizer: Tokenizer | None, defaults: SamplingParams = SamplingParams(), *,
              progress: bool = True, err: TextIO = sys.stderr) -> BatchSummary:
    input_path, output_path = Path(input_path), Path(output_path)
    summary = BatchSummary()

    def report(msg: str) -> None:
        print(msg, file=err)

    done = completed_ids(output_path)
    records, summary.bad_records = read_records(input_path, done, report)
    summary.skipped_done = len(done)
    streams: dict[str, TextStream] = {}
    wanted_logprobs: dict[str, bool] = {}
    for number, rec in records:
        try:
            if rec.prompt is not None:
                if tokenizer is None:
                    raise ConfigError("this checkpoint has no tokenizer.json; use 'prompt_token_ids'")
                ids = tuple(tokenizer.encode(rec.prompt))
            else:
                ids = tuple(rec.prompt_token_ids)
            sampling = rec.sampling(defaults)
            engine.add_request(Request(rec.id, ids, sampling))
        except JaxpdError as e:
            report(f"{input_path}:{number}: {e}")
            summary.bad_records += 1
            continue
        if tokenizer is not None:
            streams[rec.id] = TextStream(tokenizer, ids, sampling.stop)
        wanted_logprobs[rec.id] = sampling.logprobs

    start = time.perf_counter()
    bar = tqdm(total=len(wanted_logprobs), unit="req", desc="generate", disable=not progress,
               file=err, dynamic_ncols=True)
    seen_tokens: dict[str, int] = {}
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "a", encoding="utf-8") as out:
        while engine.has_unfinished():
            for o in engine.step():
                stream = streams.get(o.id)
                new = o.token_ids[seen_tokens.get(o.id, 0):]
                seen_tokens[o.id] = len(o.token_ids)
                summary.completion_tokens += len(new)
                if stream is not None:
                    stream.push(new, final=o.finished)
                    if stream.stopped and not o.finished:
                        o = engine.abort(o.id, reason="stop")
                if o.finished:
                    _write(out, o, stream, wanted_logprobs[o.id])
                    summary.completed += 1
                    summary.prompt_tokens += len(o.prompt_ids)
                    bar.update()
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{summary.completion_tokens / max(elapsed, 1e-9):.1f} tok/s", refresh=False)
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _write(out: TextIO, o: RequestOutput, stream: TextStream | None, logprobs: bool) -> None:
    record = {
        "id": o.id, "token_ids": list(o.token_ids), "text": stream.text if stream else "",
        "finish_reason": o.finish_reason,
        "usage": {"prompt_tokens": len(o.prompt_ids), "completion_tokens": len(o.token_ids),
                  "total_tokens": len(o.prompt_ids) + len(o.token_ids),
                  "cached_prompt_tokens": o.prompt_tokens_cached},
    }
    if logprobs and o.logprobs is not None:
        record["logprobs"] = [round(lp, 6) for lp in o.logprobs]
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()
