"""One check for every request, whoever receives it: the router, a worker, `jaxpd generate`,
batch mode and the in-process engine all call `check_request`, so the same input gets the same
answer everywhere (one error type, `InvalidRequest`, whose `field` and `reason` say what to fix).

Front ends only translate their own input (a protobuf message, a JSONL record, command-line
flags) into a `RawRequest`, where None means "not given", and render `InvalidRequest` in their
own terms: the router as INVALID_ARGUMENT (ALREADY_EXISTS for `DuplicateRequest`), the CLI as
`error: ...`, batch mode as a `file:LINE: ...` report.

Values that would make sampling degenerate are normalised rather than refused, as vLLM does: a
temperature below 1e-5 is greedy, and a top_p below 1e-6 keeps only the likeliest token (float32
flushes smaller values to zero, which once sampled nothing but token 0). Lists a client controls
are bounded, and a text prompt is measured in bytes before it is tokenized, so a huge prompt is
refused without the cost of tokenizing it.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Sequence

from jaxpd.engine.sampling import SamplingParams
from jaxpd.errors import JaxpdError
from jaxpd.model.config import ModelConfig
from jaxpd.tokenizer import Tokenizer

MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID_CHARS = 256
MAX_SEED = 2**32 - 1
MAX_TOP_K = 2**31 - 1
GREEDY_BELOW_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-6
DEFAULT_MAX_TOKENS = SamplingParams().max_tokens


class InvalidRequest(JaxpdError):
    """A request field is wrong: `field` names it (as in `RawRequest`), `reason` says why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class DuplicateRequest(InvalidRequest):
    """The request id is already in flight where the request arrived."""


@dataclasses.dataclass(frozen=True)
class RawRequest:
    """A request as a front end received it; None = not given (defaults apply)."""

    request_id: str | None = None
    prompt: str | bytes | None = None
    prompt_token_ids: Sequence[int] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool | None = None
    logprobs: bool | None = None

    @classmethod
    def of(cls, request_id: str | None, prompt_ids: Sequence[int], sampling: SamplingParams
           ) -> RawRequest:
        """An engine-level request (already tokenized, every sampling field set) as raw input,
        so a worker or an engine checks exactly what the router checked."""
        s = sampling
        return cls(request_id=request_id, prompt_token_ids=prompt_ids, max_tokens=s.max_tokens,
                   temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
                   stop=s.stop, stop_token_ids=s.stop_token_ids, ignore_eos=s.ignore_eos,
                   logprobs=s.logprobs)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a request is checked against: the model's vocabulary and context, and (where the
    checker knows it) the most tokens of KV one request may hold."""

    vocab_size: int
    max_context: int
    kv_capacity: int | None = None

    @classmethod
    def of(cls, config: ModelConfig, kv_capacity: int | None = None) -> Limits:
        return cls(config.vocab_size, config.max_position_embeddings, kv_capacity)


@dataclasses.dataclass(frozen=True)
class CheckedRequest:
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams


def _int(value, field: str) -> int:
    if isinstance(value, bool):
        raise InvalidRequest(field, f"must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidRequest(field, f"must be an integer, got {value!r}") from None


def _float(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars
        except (TypeError, ValueError):
            raise InvalidRequest(field, f"must be a number, got {value!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise InvalidRequest(field, f"must be a finite number, got {value}")
    return value


def _token_ids(ids: Sequence, vocab: int, field: str, *, limit: int | None = None) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)):
        raise InvalidRequest(field, "must be a list of token ids")
    if limit is not None and len(ids) > limit:
        raise InvalidRequest(field, f"at most {limit} ids, got {len(ids)}")
    out = []
    for i, t in enumerate(ids):
        t = _int(t, f"{field}[{i}]")
        if not 0 <= t < vocab:
            raise InvalidRequest(field, f"token id {t} (at {i}) is outside the vocabulary "
                                        f"[0, {vocab})")
        out.append(t)
    return tuple(out)


def check_request_id(request_id: str | None, *, required: bool = False) -> None:
    if request_id is None or request_id == "":
        if required:
            raise InvalidRequest("request_id", "is required here")
        return
    if not isinstance(request_id, str):
        raise InvalidRequest("request_id", f"must be text, got {type(request_id).__name__}")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters, got "
                                           f"{len(request_id)}")
    _utf8(request_id, "request_id")
    if not request_id.isprintable():
        raise InvalidRequest("request_id", "must be printable text (no control characters)")


def check_sampling(raw: RawRequest, limits: Limits, tokenizer: Tokenizer | None,
                   defaults: SamplingParams = SamplingParams()) -> SamplingParams:
    """The sampling half of `check_request` (flags that set defaults are checked with it)."""
    d = defaults
    max_tokens = d.max_tokens if raw.max_tokens is None else _int(raw.max_tokens, "max_tokens")
    if max_tokens < 1:
        raise InvalidRequest("max_tokens", f"must be >= 1, got {max_tokens}")
    temperature = d.temperature if raw.temperature is None else _float(raw.temperature, "temperature")
    if temperature < 0:
        raise InvalidRequest("temperature", f"must be >= 0 (0 = greedy), got {temperature}")
    if temperature < GREEDY_BELOW_TEMPERATURE:
        temperature = 0.0
    top_p = d.top_p if raw.top_p is None else _float(raw.top_p, "top_p")
    if not 0 < top_p <= 1:
        raise InvalidRequest("top_p", f"must be in (0, 1] (1 = off), got {top_p}")
    top_p = max(top_p, MIN_TOP_P)
    top_k = d.top_k if raw.top_k is None else _int(raw.top_k, "top_k")
    if not 0 <= top_k <= MAX_TOP_K:
        raise InvalidRequest("top_k", f"must be in [0, {MAX_TOP_K}] (0 = off), got {top_k}")
    seed = d.seed if raw.seed is None else _int(raw.seed, "seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InvalidRequest("seed", f"must be in [0, {MAX_SEED}], got {seed}")
    stop = tuple(d.stop) if raw.stop is None else _stop_strings(raw.stop)
    if stop and tokenizer is None:
        raise InvalidRequest("stop", "this model has no tokenizer, so stop strings cannot be "
                                     "matched; use stop_token_ids")
    stop_ids = d.stop_token_ids
    if raw.stop_token_ids is not None:
        stop_ids = _token_ids(raw.stop_token_ids, limits.vocab_size, "stop_token_ids",
                              limit=MAX_STOP_TOKEN_IDS)
        stop_ids = tuple(dict.fromkeys((*d.stop_token_ids, *stop_ids)))
    ignore_eos = d.ignore_eos if raw.ignore_eos is None else _bool(raw.ignore_eos, "ignore_eos")
    logprobs = d.logprobs if raw.logprobs is None else _bool(raw.logprobs, "logprobs")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, stop_token_ids=stop_ids, stop=stop,
                          ignore_eos=ignore_eos, logprobs=logprobs)


def _bool(value, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(field, f"must be true or false, got {value!r}")
    return value


def _stop_strings(stop) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = [stop]
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    out = []
    for i, s in enumerate(stop):
        if isinstance(s, bytes):
            try:
                s = s.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest("stop", f"is not valid UTF-8 (at {i})") from None
        if not isinstance(s, str):
            raise InvalidRequest("stop", f"stop strings must be text, got {s!r} (at {i})")
        _utf8(s, "stop", f", at {i}")
        if not s:
            raise InvalidRequest("stop", f"stop strings must not be empty (at {i})")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidRequest("stop", f"a stop string has at most {MAX_STOP_CHARS} characters, "
                                         f"got {len(s)} (at {i})")
        out.append(s)
    return tuple(out)


def _utf8(text: str, field: str, where: str = "") -> None:
    """Text whose characters UTF-8 can encode (bytes that were not UTF-8 arrive as lone
    surrogates from JSON escapes, command lines and lenient decoders)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(field, f"is not valid UTF-8 (character {e.start}{where})") from None


def prompt_text(prompt: str | bytes, limits: Limits, tokenizer: Tokenizer | None) -> str:
    """A text prompt checked before tokenizing: decoded, non-empty, not longer in bytes than
    any text the context can hold, and a tokenizer to read it."""
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest("prompt", f"is not valid UTF-8 (byte {e.start})") from None
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt", f"must be text, got {type(prompt).__name__}")
    if not prompt:
        raise InvalidRequest("prompt", "is empty")
    _utf8(prompt, "prompt")
    if tokenizer is None:
        raise InvalidRequest("prompt", "this model has no tokenizer.json; send prompt_token_ids "
                                       "instead")
    size = len(prompt.encode("utf-8"))
    most = limits.max_context * max(1, tokenizer.max_token_bytes)
    if size > most:
        raise InvalidRequest("prompt", f"is {size} bytes: no text that long fits the model's "
                                       f"context of {limits.max_context} tokens")
    return prompt


def check_request(raw: RawRequest, limits: Limits, tokenizer: Tokenizer | None,
                  defaults: SamplingParams = SamplingParams(), *,
                  id_required: bool = False) -> CheckedRequest:
    """The request in engine terms, or InvalidRequest naming the first field to fix.

    Tokenizes a text prompt (after checking its size): call it off an event loop."""
    check_request_id(raw.request_id, required=id_required)
    if (raw.prompt is None) == (raw.prompt_token_ids is None):
        raise InvalidRequest("prompt", "give exactly one of prompt (text) or prompt_token_ids")
    sampling = check_sampling(raw, limits, tokenizer, defaults)
    if raw.prompt is not None:
        text = prompt_text(raw.prompt, limits, tokenizer)
        ids = tuple(tokenizer.encode(text))
        if not ids:
            raise InvalidRequest("prompt", "encodes to no tokens")
    else:
        if len(raw.prompt_token_ids) == 0:
            raise InvalidRequest("prompt_token_ids", "is empty")
        if len(raw.prompt_token_ids) >= limits.max_context:
            raise InvalidRequest("prompt_token_ids", f"{len(raw.prompt_token_ids)} tokens leave no "
                                 f"room in the model's context of {limits.max_context}")
        ids = _token_ids(raw.prompt_token_ids, limits.vocab_size, "prompt_token_ids")
    total = len(ids) + sampling.max_tokens
    if total > limits.max_context:
        raise InvalidRequest("max_tokens", f"the prompt ({len(ids)} tokens) + max_tokens "
                             f"({sampling.max_tokens}) exceeds the model's context of "
                             f"{limits.max_context} tokens")
    if limits.kv_capacity is not None and total > limits.kv_capacity:
        raise InvalidRequest("max_tokens", f"the request needs {total} tokens of KV but a page "
                             f"pool here holds at most {limits.kv_capacity}")
    return CheckedRequest(ids, sampling)
