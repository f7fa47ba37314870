"""Requests and the engine's per-sequence state."""

from __future__ import annotations

import dataclasses
import enum
from typing import Literal

from jaxpd.engine.sampling import SamplingParams
from jaxpd.kv.manager import SeqPages

FinishReason = Literal["stop", "length", "abort"]


class RequestStatus(str, enum.Enum):
    """Where a request is in a scheduler (vLLM v1's `RequestStatus`, with the disaggregated
    states): each state says who holds the request's pages, and every way out of a state that
    holds pages frees them."""

    WAITING = "waiting"  # queued for admission; no pages
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # decode pages reserved; KV coming from a prefill worker
    RUNNING = "running"  # prefilling or decoding; holds pages
    PREEMPTED = "preempted"  # pages taken back under pressure; queued to be recomputed
    SENDING_KV = "sending_kv"  # prefilled on a prefill worker; pages held until the KV is acknowledged
    FINISHED = "finished"  # `finish_reason` says why; no pages


@dataclasses.dataclass(frozen=True)
class Request:
    id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    # Tokens generated before this request moved here (request migration): the prompt ends with
    # them, and sampling counters start at this value, so a seeded request draws the tokens an
    # uninterrupted run would have drawn.
    sample_offset: int = 0


@dataclasses.dataclass
class Sequence:
    """A request in flight: its tokens so far, where its KV lives, and its sampling state."""

    request: Request
    seed: int
    pages: SeqPages | None = None
    num_computed: int = 0  # tokens whose KV is written
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens_cached: int = 0  # prompt tokens found in the prefix cache at admission
    matched_token_id: int | None = None  # the stop token / EOS that ended it, if one did
    in_flight: int = 0  # tokens budgeted in decode calls dispatched but not yet collected
    status: RequestStatus = RequestStatus.WAITING

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def tokens(self) -> list[int]:
        return [*self.request.prompt_ids, *self.output_ids]

    @property
    def num_drawn(self) -> int:
        """Tokens drawn for this request so far, here and before it moved (sampling counter)."""
        return self.request.sample_offset + len(self.output_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    def stop_ids(self, eos_ids: tuple[int, ...]) -> tuple[int, ...]:
        """The token ids that end this sequence (after being generated)."""
        sp = self.request.sampling
        return sp.stop_token_ids + (() if sp.ignore_eos else eos_ids)

    @property
    def remaining(self) -> int:
        """Tokens it may still generate before max_tokens."""
        return self.request.sampling.max_tokens - len(self.output_ids)

    @property
    def expected_computed(self) -> int:
        """`num_computed` once the decode calls in flight are collected (unless one of them
        ends it): each runs its full budget when the sequence does not stop in it."""
        return self.num_computed + self.in_flight

    def append(self, token: int, logprob: float, eos_ids: tuple[int, ...]) -> None:
        """Record a generated token and decide whether the sequence is done."""
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        if token in self.stop_ids(eos_ids):
            self.finish_reason = "stop"
            self.matched_token_id = token
        elif self.remaining <= 0:
            self.finish_reason = "length"


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    id: str
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    finish_reason: FinishReason | None
    prompt_tokens_cached: int = 0
    matched_token_id: int | None = None  # the stop token / EOS that ended it (None for stop strings)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
