"""GenerateRequest -> the one request check (`jaxpd.request_check`), and its answer as gRPC.

The router runs `check_generate` off its event loop (it tokenizes); a worker runs
`check_engine_request` on what the router sent. Both end in `check_request`, so a request the
router accepts is one every worker accepts, and `jaxpd generate` or batch mode answer the same
input the same way. Messages name fields as the proto spells them (`sampling.top_p`).
"""

from __future__ import annotations

import dataclasses

import grpc

from jaxpd.engine.request import Request
from jaxpd.engine.sampling import SamplingParams
from jaxpd.request_check import (DuplicateRequest, InvalidRequest, Limits, RawRequest,
                                 check_request)
from jaxpd.tokenizer import Tokenizer
from jaxpd.v1 import generation_pb2, worker_pb2

_SAMPLING_FIELDS = {f.name for f in generation_pb2.SamplingParams.DESCRIPTOR.fields}


@dataclasses.dataclass(frozen=True)
class ValidRequest:
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    text: bool  # chunks carry text


def proto_field(field: str) -> str:
    """A `RawRequest` field as the proto spells it."""
    base = field.split("[")[0]
    return f"sampling.{field}" if base in _SAMPLING_FIELDS else field


def status_of(e: InvalidRequest) -> tuple[grpc.StatusCode, str]:
    """(status code, message) for a refused request: ALREADY_EXISTS for a reused id."""
    code = (grpc.StatusCode.ALREADY_EXISTS if isinstance(e, DuplicateRequest)
            else grpc.StatusCode.INVALID_ARGUMENT)
    return code, f"{proto_field(e.field)}: {e.reason}"


def _opt(message, field: str):
    return getattr(message, field) if message.HasField(field) else None


def raw_from_generate(request: generation_pb2.GenerateRequest) -> RawRequest:
    s, which = request.sampling, request.WhichOneof("input")
    return RawRequest(
        request_id=request.request_id or None,
        prompt=request.prompt if which == "prompt" else None,
        prompt_token_ids=list(request.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
        max_tokens=_opt(s, "max_tokens"), temperature=_opt(s, "temperature"),
        top_p=_opt(s, "top_p"), top_k=_opt(s, "top_k"), seed=_opt(s, "seed"),
        stop=list(s.stop) or None, stop_token_ids=list(s.stop_token_ids) or None,
        ignore_eos=s.ignore_eos, logprobs=s.logprobs)


def check_generate(request: generation_pb2.GenerateRequest, limits: Limits,
                   tokenizer: Tokenizer | None) -> ValidRequest:
    """Raises InvalidRequest; tokenizes a text prompt, so run it off the event loop."""
    if request.text_mode not in generation_pb2.TextMode.values():
        names = ", ".join(n for n in generation_pb2.TextMode.keys() if n != "TEXT_MODE_UNSPECIFIED")
        raise InvalidRequest("text_mode", f"unknown value {request.text_mode} (use {names})")
    checked = check_request(raw_from_generate(request), limits, tokenizer)
    text = request.text_mode != generation_pb2.TEXT_MODE_NONE and tokenizer is not None
    return ValidRequest(checked.prompt_ids, checked.sampling, text)


def check_engine_request(pb: worker_pb2.EngineRequest, limits: Limits,
                         tokenizer: Tokenizer | None) -> tuple[Request, int]:
    """(request, seed) from the router's EngineRequest, through the same check."""
    s = pb.sampling
    raw = RawRequest(request_id=pb.request_id, prompt_token_ids=list(pb.prompt_ids),
                     max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                     top_k=s.top_k, seed=pb.seed, stop=list(s.stop),
                     stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
                     logprobs=s.logprobs)
    checked = check_request(raw, limits, tokenizer, id_required=True)
    return Request(pb.request_id, checked.prompt_ids, checked.sampling,
                   sample_offset=pb.sample_offset), pb.seed
