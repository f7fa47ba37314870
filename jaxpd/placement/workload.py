"""Seeded request workloads for the simulator and for `tools/bench_serving.py`: arrival times
(Poisson, or gamma for burstier or smoother traffic) and prompt/output lengths (the three
DistServe applications, fixed lengths, or a trace file), so simulated and measured runs see the
same requests.

Length distributions (lognormal, clipped to [1, max]; `mean` is the mean before clipping). They
approximate the datasets DistServe (Zhong et al., OSDI '24, section 6.1 and its Figure 7)
evaluated on. DistServe's repository fixes the datasets and the tokenizer
(`evaluation/docs/repro-dataset.md` in LLMServe/DistServe: ShareGPT_V3_unfiltered_cleaned_split,
HumanEval.jsonl, LongBench `data.zip`, tokenized with facebook/opt-13b), but it does not state the
resulting means in text we could retrieve, so the figures below are assumptions:

- `chatbot` (ShareGPT): prompt mean 161 tokens, output mean 338, both heavy-tailed
  (sigma 1.0), clipped to OPT's 2,048-token context. The means are the ShareGPT figures of the
  vLLM paper (Kwon et al., SOSP '23, section 6.1: 8.4x Alpaca's 19.3-token inputs and 5.8x its
  58.5-token outputs), the same dataset and tokenizer family.
- `code` (HumanEval): prompt mean 150 tokens (function signature + docstring; HumanEval prompts
  average roughly 450 characters), output mean 60 tokens (a canonical solution's length),
  narrower spread (sigma 0.5 / 0.6). Assumed from the dataset, not from the paper.
- `summarization` (LongBench summarization tasks): prompt mean 1,800 tokens with sigma 0.35,
  clipped to 2,048 (LongBench documents run to thousands of words; OPT truncates to its context),
  output mean 100 tokens (sigma 0.6). Assumed, not from the paper.

Arrival streams and length streams come from separate children of one `SeedSequence(seed)`, so a
seed gives the same lengths at every rate and cv, and the arrival times at rate r are the times at
rate 1 divided by r: attainment then falls monotonically as the rate rises, which is what the
goodput search needs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

__all__ = ["SimRequest", "LengthDistribution", "DISTRIBUTIONS", "TraceError", "poisson_gaps",
           "gamma_gaps", "arrival_times", "generate", "load_trace", "dump_trace"]


@dataclasses.dataclass(frozen=True)
class SimRequest:
    """One request: when it arrives (seconds from the start) and its token counts.
    `cached_tokens`: leading prompt tokens the serving replicas already hold in their prefix
    caches (a conversation's earlier turns, a shared system prompt): prefill skips them, the
    hand-off does not send them, and they take no new KV pages."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.cached_tokens < self.prompt_tokens:
            raise ValueError(f"cached_tokens must be in [0, prompt_tokens), got "
                             f"{self.cached_tokens} of {self.prompt_tokens}")


@dataclasses.dataclass(frozen=True)
class LengthDistribution:
    """Lognormal prompt and output lengths (means before clipping to [1, max])."""

    prompt_mean: float
    prompt_sigma: float
    prompt_max: int
    output_mean: float
    output_sigma: float
    output_max: int

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return (_lognormal(self.prompt_mean, self.prompt_sigma, self.prompt_max, n, rng),
                _lognormal(self.output_mean, self.output_sigma, self.output_max, n, rng))


DISTRIBUTIONS: dict[str, LengthDistribution] = {
    "chatbot": LengthDistribution(161, 1.0, 2048, 338, 1.0, 2048),
    "code": LengthDistribution(150, 0.5, 1024, 60, 0.6, 512),
    "summarization": LengthDistribution(1800, 0.35, 2048, 100, 0.6, 512),
}


class TraceError(ValueError):
    """A trace file row that cannot be read; the message starts with `FILE:LINE:`."""


def _lognormal(mean: float, sigma: float, upper: int, n: int,
               rng: np.random.Generator) -> np.ndarray:
    """Integers from a lognormal with this mean (mu = ln(mean) - sigma^2 / 2), in [1, upper]."""
    mu = math.log(mean) - sigma * sigma / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), 1, upper).astype(np.int64)


def poisson_gaps(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Exponential inter-arrival times of a Poisson process with `rate` requests/s."""
    return rng.standard_exponential(n) / rate


def gamma_gaps(rate: float, cv: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Gamma inter-arrival times with mean 1/rate and coefficient of variation `cv`
    (shape 1/cv^2: cv > 1 is burstier than Poisson, cv < 1 smoother, cv = 1 is Poisson)."""
    shape = 1.0 / (cv * cv)
    return rng.standard_gamma(shape, n) / (shape * rate)


def arrival_times(rate: float, n: int, rng: np.random.Generator, cv: float = 1.0) -> np.ndarray:
    """Cumulative arrival times; exactly Poisson when cv == 1."""
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number of requests/s, got {rate}")
    if not (cv > 0 and math.isfinite(cv)):
        raise ValueError(f"cv must be positive, got {cv}")
    gaps = poisson_gaps(rate, n, rng) if cv == 1.0 else gamma_gaps(rate, cv, n, rng)
    return np.cumsum(gaps)


def _lengths(kind: str, n: int, rng: np.random.Generator, isl: int | None,
             osl: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths: the named distribution, with `isl`/`osl` fixing either."""
    for name, value in (("isl", isl), ("osl", osl)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if kind == "fixed":
        if isl is None or osl is None:
            raise ValueError("kind 'fixed' needs both isl and osl")
        prompts, outputs = np.empty(n, np.int64), np.empty(n, np.int64)
    elif kind in DISTRIBUTIONS:
        prompts, outputs = DISTRIBUTIONS[kind].sample(n, rng)
    else:
        known = ", ".join([*DISTRIBUTIONS, "fixed"])
        raise ValueError(f"unknown workload kind {kind!r} (known: {known})")
    if isl is not None:
        prompts[:] = isl
    if osl is not None:
        outputs[:] = osl
    return prompts, outputs


def generate(kind: str, rate: float, num_requests: int, *, seed: int = 0, cv: float = 1.0,
             isl: int | None = None, osl: int | None = None) -> list[SimRequest]:
    """`num_requests` requests of workload `kind` ('chatbot', 'code', 'summarization', or
    'fixed' with both `isl` and `osl`) arriving at `rate`/s; `isl`/`osl` override the sampled
    prompt/output lengths. Deterministic for a seed."""
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    arrivals_seed, lengths_seed = np.random.SeedSequence(seed).spawn(2)
    times = arrival_times(rate, num_requests, np.random.default_rng(arrivals_seed), cv)
    prompts, outputs = _lengths(kind, num_requests, np.random.default_rng(lengths_seed), isl, osl)
    return [SimRequest(float(t), int(p), int(o))
            for t, p, o in zip(times.tolist(), prompts.tolist(), outputs.tolist())]


# -- traces -------------------------------------------------------------------------------------
def _field(row: dict, names: Sequence[str], where: str) -> object:
    for name in names:
        if name in row and row[name] not in (None, ""):
            return row[name]
    raise TraceError(f"{where}: missing field {' or '.join(repr(n) for n in names)}")


def _number(value: object, name: str, where: str, integer: bool) -> float | int:
    """A finite number (an integer >= 1 for token counts), or a TraceError naming the field."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TraceError(f"{where}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise TraceError(f"{where}: {name} must be finite, got {value!r}")
    if not integer:
        if number < 0:
            raise TraceError(f"{where}: {name} must be >= 0, got {value!r}")
        return number
    if number != int(number) or number < 1:
        raise TraceError(f"{where}: {name} must be an integer >= 1, got {value!r}")
    return int(number)


def _request(row: object, where: str) -> SimRequest:
    if not isinstance(row, dict):
        raise TraceError(f"{where}: expected an object with arrival_s, prompt_tokens, "
                         f"output_tokens, got {type(row).__name__}")
    arrival = _number(_field(row, ("arrival_s", "timestamp"), where), "arrival_s", where, False)
    prompt = _number(_field(row, ("prompt_tokens",), where), "prompt_tokens", where, True)
    output = _number(_field(row, ("output_tokens",), where), "output_tokens", where, True)
    cached = row.get("cached_tokens")
    cached = 0 if cached in (None, "") else _number(cached, "cached_tokens", where, False)
    if cached != int(cached) or not 0 <= cached < prompt:
        raise TraceError(f"{where}: cached_tokens must be an integer in [0, prompt_tokens="
                         f"{prompt}), got {row.get('cached_tokens')!r}")
    return SimRequest(float(arrival), int(prompt), int(output), int(cached))


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[object, str]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield json.loads(line), where
        except json.JSONDecodeError as e:
            raise TraceError(f"{where}: not valid JSON ({e.msg})") from None


def _csv_rows(path: Path, text: str) -> Iterator[tuple[object, str]]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames:
        raise TraceError(f"{path}:1: no header row (want arrival_s, prompt_tokens, output_tokens)")
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:
            raise TraceError(f"{where}: more values than header columns")
        yield row, where


def load_trace(path: str | Path) -> list[SimRequest]:
    """Requests from a JSONL (one object a line) or CSV (header row) trace with `arrival_s` (or
    `timestamp`) in seconds, `prompt_tokens` and `output_tokens`, and optionally
    `cached_tokens` (prefix-cache hits); sorted by arrival. A bad row is a TraceError
    `FILE:LINE: what is wrong`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TraceError(f"{path}: cannot read trace ({e.strerror or e})") from None
    is_csv = path.suffix.lower() == ".csv" or (path.suffix.lower() not in (".jsonl", ".json")
                                               and not text.lstrip().startswith("{"))
    rows = _csv_rows(path, text) if is_csv else _jsonl_rows(path, text)
    requests = [_request(row, where) for row, where in rows]
    if not requests:
        raise TraceError(f"{path}: trace holds no requests")
    return sorted(requests, key=lambda r: r.arrival_s)


def dump_trace(requests: Iterable[SimRequest], path: str | Path) -> None:
    """Write requests as a JSONL trace that `load_trace` reads back (for bench_serving runs)."""
    lines = [json.dumps(dataclasses.asdict(r)) for r in requests]
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
