"""Protobuf <-> engine types, in one place, so servicers only translate and delegate."""

from __future__ import annotations

from jaxpd.engine.request import Request
from jaxpd.engine.sampling import SamplingParams
from jaxpd.v1 import generation_pb2, worker_pb2


def sampling_to_pb(sp: SamplingParams) -> generation_pb2.SamplingParams:
    """Every field set (workers never apply defaults of their own)."""
    return generation_pb2.SamplingParams(
        max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
        stop=list(sp.stop), stop_token_ids=list(sp.stop_token_ids), ignore_eos=sp.ignore_eos,
        logprobs=sp.logprobs)


def engine_request_to_pb(request: Request, seed: int) -> worker_pb2.EngineRequest:
    return worker_pb2.EngineRequest(request_id=request.id, prompt_ids=list(request.prompt_ids),
                                    sampling=sampling_to_pb(request.sampling), seed=seed)


def engine_request_from_pb(pb: worker_pb2.EngineRequest) -> tuple[Request, int]:
    """(request, seed). Raises ConfigError (from SamplingParams) on values out of range."""
    s = pb.sampling
    sampling = SamplingParams(
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        seed=pb.seed, stop_token_ids=tuple(s.stop_token_ids), stop=tuple(s.stop),
        ignore_eos=s.ignore_eos, logprobs=s.logprobs)
    return Request(pb.request_id, tuple(pb.prompt_ids), sampling), pb.seed
