"""Offline batch generation: JSONL prompts in, JSONL completions out, every request in flight.

Input records: {"id": "a1", "prompt": "text"} or {"id": "a2", "prompt_token_ids": [1, 2]}, with
optional max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos, logprobs.
Output records: id, token_ids (generated only), text, finish_reason, usage.

Resumable: ids already in the output are skipped and a half-written last line (an interrupted
run) is cut off before appending; any other unreadable output line is reported and left alone.
A bad input record (or one that fits no page pool) is reported as `file:LINE: ...` and skipped.
EOS ids are the model's (the tokenizer's merged in at load time): `stop_token_ids` adds to them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from tqdm import tqdm

from jaxpd.compile_status import CompileStatus
from jaxpd.engine.orchestrator import Engine
from jaxpd.engine.output import TextStream, drive_engine
from jaxpd.engine.request import Request, RequestOutput
from jaxpd.engine.sampling import SamplingParams
from jaxpd.errors import CapacityError, ConfigError, JaxpdError
from jaxpd.request_check import RawRequest, check_request
from jaxpd.tokenizer import Tokenizer


class BatchRecord(BaseModel):
    """One input line's shape; its values are checked by `check_request`, as the router's are."""

    model_config = ConfigDict(extra="forbid")

    id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    logprobs: bool | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    def raw(self) -> RawRequest:
        return RawRequest(**self.model_dump(exclude={"id"}), request_id=self.id)


@dataclasses.dataclass
class BatchSummary:
    completed: int = 0
    skipped_done: int = 0
    bad_records: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0  # steps waiting for a program to compile, inside `seconds`
    background_compile_seconds: float = 0.0  # compiling on a background thread meanwhile
    programs_compiled: int = 0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_tokens_per_s"] = round(self.completion_tokens / self.seconds, 2) if self.seconds else None
        d["compile_share"] = round(self.compile_seconds / self.seconds, 4) if self.seconds else None
        return d


Report = Callable[[str], None]


def _to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _output_line(line: bytes) -> tuple[str | None, str | None]:
    """(id, None) for a good output line, else (None, what is wrong with it)."""
    try:
        record = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        return None, f"not valid JSON ({e})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if "id" not in record:
        return None, "the record has no 'id'"
    return str(record["id"]), None


def _torn(line: bytes) -> bool:
    """What an interrupted writer leaves: a line with no newline yet, or not JSON at all."""
    if not line.endswith(b"\n"):
        return True
    try:
        json.loads(line)
    except ValueError:
        return True
    return False


def completed_ids(output: Path, report: Report = _to_stderr) -> set[str]:
    """Ids already written.

    Only the last line may be torn; it is cut off so appending stays valid JSONL. Any other bad
    line is reported and left in place, and the records after it still count as done.
    """
    if not output.exists():
        return set()
    data = output.read_bytes()
    lines = io.BytesIO(data).readlines()  # split on "\n" only, as the writer does
    ids, end = set(), 0
    for number, line in enumerate(lines, 1):
        if number == len(lines) and _torn(line):
            break
        end += len(line)
        if not line.strip():
            continue
        record_id, problem = _output_line(line)
        if record_id is not None:
            ids.add(record_id)
        else:
            report(f"{output}:{number}: {problem}; line ignored (its record, if any, is generated again)")
    if end < len(data):
        with open(output, "r+b") as f:
            f.truncate(end)
    return ids


def _record_problem(e: ValidationError) -> str:
    """The first validation error, phrased for a person editing the JSONL file."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "model_type":
        return 'expected a JSON object like {"id": "a1", "prompt": "..."}'
    if err["type"] == "missing" and where == "id":
        return "missing 'id' (every record needs a unique id)"
    return f"{where + ': ' if where else ''}{err['msg'].removeprefix('Value error, ')}"


def read_records(path: Path, done: set[str], report: Report):
    """Valid, not-yet-done records with their line numbers; bad ones are reported and skipped."""
    seen: set[str] = set()
    records, bad = [], 0
    try:
        lines = path.read_bytes().split(b"\n")  # "\n" only: JSON text may hold U+2028 etc.
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:  # bytes that are not UTF-8 survive as surrogates: the request check names them
            record = BatchRecord.model_validate(
                json.loads(line.decode("utf-8", "surrogateescape")))
        except json.JSONDecodeError as e:
            report(f"{path}:{number}: Invalid JSON: {e.msg} at column {e.colno}")
            bad += 1
            continue
        except ValidationError as e:
            report(f"{path}:{number}: {_record_problem(e)}")
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
              progress: bool = True, err: TextIO | None = None) -> BatchSummary:
    err = sys.stderr if err is None else err  # as it is now, not at import
    input_path, output_path = Path(input_path), Path(output_path)
    summary = BatchSummary()

    def report(msg: str) -> None:
        print(msg, file=err)

    done = completed_ids(output_path, report)
    records, summary.bad_records = read_records(input_path, done, report)
    summary.skipped_done = len(done)
    streams: dict[str, TextStream] = {}
    wanted_logprobs: dict[str, bool] = {}
    line_of: dict[str, int] = {}
    limits = engine.limits()
    for number, rec in records:
        try:
            checked = check_request(rec.raw(), limits, tokenizer, defaults, id_required=True)
            ids, sampling = checked.prompt_ids, checked.sampling
            engine.add_request(Request(rec.id, ids, sampling))
        except JaxpdError as e:
            report(f"{input_path}:{number}: {e}")
            summary.bad_records += 1
            continue
        if tokenizer is not None:
            streams[rec.id] = TextStream(tokenizer, ids, sampling.stop)
        wanted_logprobs[rec.id] = sampling.logprobs
        line_of[rec.id] = number

    start = time.perf_counter()
    # the bar starts with the first output; until then a status line says what is compiling
    status = CompileStatus((runner for runner, _ in engine.shapes()), err)
    bars: list[tqdm] = []

    def bar() -> tqdm:
        status.first_token()
        if not bars:
            bars.append(tqdm(total=len(wanted_logprobs), unit="req", desc="generate",
                             disable=not progress, file=err, dynamic_ncols=True))
        return bars[0]

    produced: dict[str, int] = {}  # tokens so far per request, for the live tok/s figure
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "a", encoding="utf-8") as out, status:

        def on_output(o: RequestOutput, stream: TextStream | None, text: str) -> None:
            bar()
            summary.completion_tokens += len(o.token_ids) - produced.get(o.id, 0)
            produced[o.id] = len(o.token_ids)
            if o.finished:
                produced.pop(o.id)
                _write(out, o, stream, wanted_logprobs[o.id])
                summary.completed += 1
                summary.prompt_tokens += len(o.prompt_ids)
                bar().update()
            elapsed = time.perf_counter() - start
            rate = summary.completion_tokens / max(elapsed, 1e-9)
            bar().set_postfix_str(f"{rate:.1f} tok/s", refresh=False)

        def on_capacity_error(request_id: str, e: CapacityError) -> None:
            report(f"{input_path}:{line_of[request_id]}: {e}")
            summary.bad_records += 1
            bar().update()

        drive_engine(engine, streams, on_output, on_capacity_error=on_capacity_error)
    bar().close()
    summary.seconds = time.perf_counter() - start
    for runner, _ in engine.shapes():
        summary.compile_seconds += runner.seconds["compile"]
        summary.background_compile_seconds += max(0.0, runner.programs.seconds - runner.seconds["compile"])
        summary.programs_compiled += len(runner.programs)
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
