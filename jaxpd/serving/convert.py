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


def engine_request_to_pb(request: Request, seed: int, token: str = "") -> worker_pb2.EngineRequest:
    """`token`: the attempt's request token (see EngineRequest.request_token)."""
    return worker_pb2.EngineRequest(request_id=request.id, prompt_ids=list(request.prompt_ids),
                                    sampling=sampling_to_pb(request.sampling), seed=seed,
                                    sample_offset=request.sample_offset, request_token=token)
