"""A small synchronous Python client for jaxpd's public Generation service.

    with Client("127.0.0.1:50051") as client:
        for event in client.generate("It is a truth", max_tokens=32):
            if isinstance(event, Chunk):
                print(event.text, end="", flush=True)
        done = client.complete(prompt_token_ids=[1, 2, 3], max_tokens=8, temperature=0.0)
        print(done.finish_reason, done.usage.completion_tokens, done.ttft_s, done.tpot_s)

Sampling fields left as None are not sent, so the server's defaults apply (proto3 `optional`
keeps "unset" apart from an explicit 0). Every gRPC failure surfaces as `ClientError`, whose
message is `CODE_NAME: the server's details` (the server names the field to fix). Closing a
`generate()` stream early (`close()`, `break` then garbage collection, an exception in the loop)
cancels the call, which makes the server abort the request and free its KV pages.

It depends on grpc and the generated `jaxpd.v1` code only: no JAX, so it loads in milliseconds.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Iterator, Sequence, Union

import grpc

from jaxpd.errors import JaxpdError
from jaxpd.v1 import generation_pb2, generation_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
_MAX_MESSAGE_BYTES = 1 << 30
_UINT32 = 1 << 32


class ClientError(JaxpdError):
    """A call failed. `code` is the gRPC status code, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, message: str | None = None):
        super().__init__(message or f"{code.name}: {details}")
        self.code = code
        self.details = details


class ServerUnreachable(ClientError):
    """No connection could be made before the connect deadline (wrong address, server down)."""

    def __init__(self, address: str):
        sentence = f"cannot reach {address} (is `jaxpd serve` running?)"
        super().__init__(grpc.StatusCode.UNAVAILABLE, sentence, sentence)
        self.address = address


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens whose KV came from the server's prefix cache instead of being computed.
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass(frozen=True)
class Timings:
    """The server's own measurements, in seconds from the router receiving the request."""

    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Tokens generated since the previous chunk, and the text now safe to show."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]  # one per token when logprobs were asked for, else empty
    arrival_s: float  # seconds from sending the request to this chunk arriving (client clock)


@dataclasses.dataclass(frozen=True)
class Finished:
    """The stream's last event: why generation ended, usage and the server's timings."""

    request_id: str
    finish_reason: str  # "stop", "length" or "abort"
    matched_stop: int | str | None  # the stop token id or stop string that ended it, if any
    usage: Usage
    timings: Timings
    arrival_s: float


StreamEvent = Union[Chunk, Finished]


@dataclasses.dataclass(frozen=True)
class Completion:
    """A whole generation, with client-measured latency as vLLM's benchmark defines it."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    finish_reason: str
    matched_stop: int | str | None
    usage: Usage
    timings: Timings
    # Seconds from sending the request to the first token arriving; None if no token came.
    ttft_s: float | None
    # (last token's arrival - first token's arrival) / (tokens - 1); None with fewer than 2.
    tpot_s: float | None
    # Seconds from sending the request to the final message arriving.
    latency_s: float


def _status(error: grpc.RpcError) -> ClientError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return ClientError(code or grpc.StatusCode.UNKNOWN, details or "")


def _sampling(*, max_tokens: int | None, temperature: float | None, top_p: float | None,
              top_k: int | None, seed: int | None, stop: Sequence[str],
              stop_token_ids: Sequence[int], ignore_eos: bool,
              logprobs: bool) -> generation_pb2.SamplingParams:
    """Only the fields the caller gave, so unset ones keep the server's defaults."""
    if isinstance(stop, str):
        raise TypeError("stop takes a sequence of strings, e.g. stop=['\\n'], not one string")
    if seed is not None and not 0 <= seed < _UINT32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    given = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
             "top_k": top_k, "seed": seed}
    params = generation_pb2.SamplingParams(**{k: v for k, v in given.items() if v is not None})
    params.stop.extend(stop)
    params.stop_token_ids.extend(stop_token_ids)
    params.ignore_eos = ignore_eos
    params.logprobs = logprobs
    return params


def make_request(prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                 max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 ignore_eos: bool = False, logprobs: bool = False, request_id: str = "",
                 text: bool = True) -> generation_pb2.GenerateRequest:
    """The GenerateRequest for `Client.generate`'s arguments (exactly one of prompt, ids)."""
    if (prompt is None) == (prompt_token_ids is None):
        raise ValueError("give exactly one of prompt (text) and prompt_token_ids")
    request = generation_pb2.GenerateRequest(
        request_id=request_id,
        sampling=_sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                           top_k=top_k, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
                           ignore_eos=ignore_eos, logprobs=logprobs),
        text_mode=generation_pb2.TEXT_MODE_UNSPECIFIED if text else generation_pb2.TEXT_MODE_NONE)
    if prompt is not None:
        request.prompt = prompt
    else:
        request.prompt_token_ids.ids.extend(prompt_token_ids)
    return request


def _finished(response: generation_pb2.GenerateResponse, arrival_s: float) -> Finished:
    c = response.complete
    which = c.WhichOneof("matched_stop")
    return Finished(
        request_id=response.request_id, finish_reason=c.finish_reason,
        matched_stop=getattr(c, which) if which else None,
        usage=Usage(c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.cached_tokens),
        timings=Timings(c.timings.queue_s, c.timings.prefill_s, c.timings.transfer_s,
                        c.timings.ttft_s, c.timings.total_s),
        arrival_s=arrival_s)


def to_event(response: generation_pb2.GenerateResponse, arrival_s: float) -> StreamEvent:
    """The typed event for one GenerateResponse."""
    if response.WhichOneof("response") == "complete":
        return _finished(response, arrival_s)
    chunk = response.chunk
    return Chunk(response.request_id, tuple(chunk.token_ids), chunk.text, tuple(chunk.logprobs),
                 arrival_s)


def collect(events: Iterable[StreamEvent]) -> Completion:
    """Gather a stream into one Completion; TTFT/TPOT come from the chunks' arrival times."""
    ids: list[int] = []
    text: list[str] = []
    logprobs: list[float] = []
    first = last = None
    for event in events:
        if isinstance(event, Finished):
            tpot = (last - first) / (len(ids) - 1) if len(ids) > 1 else None
            return Completion(
                request_id=event.request_id, token_ids=tuple(ids), text="".join(text),
                logprobs=tuple(logprobs), finish_reason=event.finish_reason,
                matched_stop=event.matched_stop, usage=event.usage, timings=event.timings,
                ttft_s=first, tpot_s=tpot, latency_s=event.arrival_s)
        ids.extend(event.token_ids)
        text.append(event.text)
        logprobs.extend(event.logprobs)
        if event.token_ids:
            first = event.arrival_s if first is None else first
            last = event.arrival_s
    raise ClientError(grpc.StatusCode.UNKNOWN, "the stream ended without a Complete message")


class Client:
    """A connection to a jaxpd router (`jaxpd serve`); use it as a context manager.

    `timeout` is the default deadline, in seconds, of every call (for `generate`, of the whole
    stream); each method's own `timeout` overrides it. None = no deadline. The client is safe to
    share between threads: gRPC multiplexes concurrent calls over one channel.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = None,
                 tls_ca: str | bytes | None = None, tls: bool = False, token: str | None = None):
        """`tls` (or `tls_ca`: a CA certificate, PEM path or bytes, for a private CA) talks TLS;
        `token` is sent as `authorization: Bearer TOKEN` on every call."""
        self.address = address
        self.timeout = timeout
        options = [("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES)]
        if tls or tls_ca is not None:
            ca = tls_ca if isinstance(tls_ca, (bytes, type(None))) else open(tls_ca, "rb").read()
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca), options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls still in flight are cancelled."""
        self._channel.close()

    def wait_ready(self, timeout: float = 5.0) -> None:
        """Connect now, so a wrong address fails fast with ServerUnreachable, not mid-call."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ServerUnreachable(self.address) from None

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _unary(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise _status(e) from None

    def generate(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                 max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 ignore_eos: bool = False, logprobs: bool = False, request_id: str = "",
                 text: bool = True, timeout: float | None = None) -> Iterator[StreamEvent]:
        """Stream a completion: `Chunk`s as tokens arrive, then one `Finished`.

        Give exactly one of `prompt` (the server tokenizes it) and `prompt_token_ids`. None
        leaves a sampling field to the server (max_tokens 16, greedy, top_p 1, top_k off,
        random seed). `text=False` asks for token ids only. The request is sent when iteration
        starts; closing the iterator before the end cancels it on the server.
        """
        request = make_request(prompt, prompt_token_ids=prompt_token_ids, max_tokens=max_tokens,
                               temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                               stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                               logprobs=logprobs, request_id=request_id, text=text)
        return self.stream(request, timeout=timeout)

    def stream(self, request: generation_pb2.GenerateRequest, *,
               timeout: float | None = None) -> Iterator[StreamEvent]:
        """`generate` for a ready-made GenerateRequest."""
        start = time.perf_counter()
        call = self._stub.Generate(request, timeout=self._deadline(timeout), metadata=self._metadata)
        try:
            for response in call:
                yield to_event(response, time.perf_counter() - start)
        except grpc.RpcError as e:
            raise _status(e) from None
        finally:
            call.cancel()  # a no-op once the stream has ended; aborts the request otherwise

    def complete(self, prompt: str | None = None, *,
                 prompt_token_ids: Sequence[int] | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None, stop: Sequence[str] = (),
                 stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                 logprobs: bool = False, request_id: str = "", text: bool = True,
                 timeout: float | None = None) -> Completion:
        """`generate`, collected into one Completion (with client-measured TTFT and TPOT)."""
        return collect(self.generate(
            prompt, prompt_token_ids=prompt_token_ids, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, logprobs=logprobs,
            request_id=request_id, text=text, timeout=timeout))

    def abort(self, request_ids: str | Iterable[str], *, timeout: float | None = None) -> list[str]:
        """End requests in flight (their streams finish with "abort"); returns those that were."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        reply = self._unary(self._stub.Abort, generation_pb2.AbortRequest(request_ids=ids), timeout)
        return list(reply.aborted)

    def tokenize(self, text: str, *, timeout: float | None = None) -> list[int]:
        """The token ids the server would use for `text` as a prompt."""
        reply = self._unary(self._stub.Tokenize, generation_pb2.TokenizeRequest(text=text), timeout)
        return list(reply.token_ids)

    def model_info(self, *, timeout: float | None = None) -> generation_pb2.ModelInfo:
        return self._unary(self._stub.GetModelInfo, generation_pb2.GetModelInfoRequest(), timeout)

    def server_info(self, *, timeout: float | None = None) -> generation_pb2.ServerInfo:
        return self._unary(self._stub.GetServerInfo, generation_pb2.GetServerInfoRequest(), timeout)

    def loads(self, *, timeout: float | None = None) -> generation_pb2.Loads:
        return self._unary(self._stub.GetLoads, generation_pb2.GetLoadsRequest(), timeout)
