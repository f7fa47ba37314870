"""Checks a GenerateRequest before any worker sees it; each error names the field to fix.

The router answers INVALID_ARGUMENT with these messages, so a client learns what to change
(`sampling.top_p: must be in (0, 1], got 1.5`) instead of a worker failing later.
"""

from __future__ import annotations

import dataclasses
import math

from jaxpd.engine.sampling import SamplingParams
from jaxpd.errors import JaxpdError
from jaxpd.model.config import ModelConfig
from jaxpd.tokenizer import Tokenizer
from jaxpd.v1 import generation_pb2

DEFAULT_MAX_TOKENS = 16


class InvalidRequest(JaxpdError):
    """A request field is wrong; the message starts with the field's name."""


@dataclasses.dataclass(frozen=True)
class ValidRequest:
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    text: bool  # chunks carry text


def _ids_in_vocab(ids, vocab: int, field: str) -> None:
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise InvalidRequest(f"{field}[{i}]: token id {t} is outside the vocabulary [0, {vocab})")


def _sampling(s: generation_pb2.SamplingParams, vocab: int) -> SamplingParams:
    max_tokens = s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        raise InvalidRequest(f"sampling.max_tokens: must be >= 1, got {max_tokens}")
    temperature = s.temperature if s.HasField("temperature") else 0.0
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise InvalidRequest(f"sampling.temperature: must be >= 0 (0 = greedy), got {temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidRequest(f"sampling.top_p: must be in (0, 1] (1 = off), got {top_p}")
    top_k = s.top_k if s.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidRequest(f"sampling.top_k: must be >= 0 (0 = off), got {top_k}")
    _ids_in_vocab(s.stop_token_ids, vocab, "sampling.stop_token_ids")
    if any(not x for x in s.stop):
        raise InvalidRequest("sampling.stop: stop strings must not be empty")
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=s.seed if s.HasField("seed") else None, stop_token_ids=tuple(s.stop_token_ids),
        stop=tuple(s.stop), ignore_eos=s.ignore_eos, logprobs=s.logprobs)


def validate(request: generation_pb2.GenerateRequest, config: ModelConfig,
             tokenizer: Tokenizer | None) -> ValidRequest:
    """Raises InvalidRequest naming the field; returns the request in engine terms."""
    if request.text_mode not in generation_pb2.TextMode.values():
        names = ", ".join(n for n in generation_pb2.TextMode.keys() if n != "TEXT_MODE_UNSPECIFIED")
        raise InvalidRequest(f"text_mode: unknown value {request.text_mode} (use {names})")
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidRequest("input: give either 'prompt' (text) or 'prompt_token_ids'")
    if which == "prompt":
        if not request.prompt:
            raise InvalidRequest("prompt: is empty")
        if tokenizer is None:
            raise InvalidRequest("prompt: this model has no tokenizer.json; send "
                                 "'prompt_token_ids' instead")
        ids = tuple(tokenizer.encode(request.prompt))
        if not ids:
            raise InvalidRequest("prompt: encodes to no tokens")
    else:
        ids = tuple(request.prompt_token_ids.ids)
        if not ids:
            raise InvalidRequest("prompt_token_ids.ids: is empty")
        _ids_in_vocab(ids, config.vocab_size, "prompt_token_ids.ids")
    sampling = _sampling(request.sampling, config.vocab_size)
    if sampling.stop and tokenizer is None:
        raise InvalidRequest("sampling.stop: this model has no tokenizer, so stop strings cannot be "
                             "matched; use sampling.stop_token_ids")
    if len(ids) + sampling.max_tokens > config.max_position_embeddings:
        raise InvalidRequest(
            f"sampling.max_tokens: the prompt ({len(ids)} tokens) + max_tokens "
            f"({sampling.max_tokens}) exceeds the model's context of "
            f"{config.max_position_embeddings} tokens")
    text = request.text_mode != generation_pb2.TEXT_MODE_NONE and tokenizer is not None
    return ValidRequest(ids, sampling, text)
