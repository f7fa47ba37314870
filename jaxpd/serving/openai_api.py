"""The OpenAI-compatible HTTP API, served by the router process beside gRPC.

    POST /v1/completions        text or token-id prompts (several per request), n choices each
    POST /v1/chat/completions   messages rendered with the checkpoint's chat template
    GET  /v1/models             the served model
    GET  /health                200 while the router serves, 503 otherwise
    GET  /metrics               the router's Prometheus metrics

Why in the router process (not a gateway process): a request takes exactly the path a gRPC
`Generate` takes, `Router.generate`: the same check, routing, queue, migration, cancellation
and metrics, with no second hop, no second client and no second process to supervise. FastAPI
routes, pydantic models check bodies (jaxpd/serving/openai_schema.py), uvicorn serves on the
router's own event loop, and sse-starlette frames the event stream (and notices a client that
goes away, which cancels its request and frees its pages).

Errors come in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a
bad or unsupported parameter (named), 401 without the bearer token when one is configured, 404
for an unknown model or route, 413 for a body over `serving.max_request_bytes`, 429 when the
router's queue is full, 503 while draining or with no worker serving. Nothing a client sends
gives a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

import grpc
import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxpd.request_check import InvalidRequest
from jaxpd.serving import openai_schema as s
from jaxpd.serving.router import RequestFailed, Router
from jaxpd.tokenizer.chat_template import ChatTemplate, ChatTemplateError
from jaxpd.v1 import generation_pb2 as pb

log = logging.getLogger("jaxpd.http")

HTTP_OF = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
           grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.ALREADY_EXISTS: 409,
           grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
           grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.UNAUTHENTICATED: 401}
TYPE_OF = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
           409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
           503: "service_unavailable", 504: "timeout", 500: "internal_error"}
# request-check fields as the OpenAI API names them
PARAM_OF = {"prompt_token_ids": "prompt", "request_id": None}
FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return s.ErrorResponse(error=s.ErrorBody(
            message=self.message, type=TYPE_OF.get(self.status, "invalid_request_error"),
            param=self.param, code=self.code or str(self.status))).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _from_invalid(e: InvalidRequest, prompt_param: str) -> ApiError:
    param = PARAM_OF.get(e.field, e.field)
    if param == "prompt":
        param = prompt_param
    return ApiError(400, f"{param}: {e.reason}" if param else e.reason, param)


def _from_failed(e: RequestFailed) -> ApiError:
    status = HTTP_OF.get(e.code, 500)
    return ApiError(status, str(e), code=e.code.name.lower())


def _pydantic_error(e: pydantic.ValidationError) -> ApiError:
    err = e.errors()[0]
    if err["type"] == "value_error" and not err["loc"]:  # a whole-request check naming its field
        message = err["msg"].removeprefix("Value error, ")
        return ApiError(400, message, message.split(":", 1)[0])
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "constrained-"))]
    # a union's member names (str, list[int]...) are not fields: keep the field path
    path = [p for p in loc if not any(c in p for c in "[]()|") and p not in ("str", "int")]
    param = ".".join(path) or None
    message = err["msg"] if param is None else f"{param}: {err['msg']}"
    return ApiError(400, message, param)


class OpenAIServer:
    """The HTTP front end of one router: request bodies in, `Router.generate` streams out."""

    def __init__(self, router: Router, *, model_name: str, chat_template: ChatTemplate | None,
                 token: str | None, max_body_bytes: int, healthy: Callable[[], bool]):
        self.router, self.model_name, self.template = router, model_name, chat_template
        self.token, self.max_body, self.healthy = token, max_body_bytes, healthy
        self.created = int(time.time())
        self.app = self._app()

    # -- the app ----------------------------------------------------------------------------------
    def _app(self) -> FastAPI:
        app = FastAPI(title="jaxpd", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(ApiError)
        async def api_error(request: Request, e: ApiError):
            return e.response()

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, e: StarletteHTTPException):
            message = "no such route (see /v1/models, /v1/completions, /v1/chat/completions)" \
                if e.status_code == 404 else str(e.detail)
            return ApiError(e.status_code, message).response()

        @app.exception_handler(Exception)
        async def unexpected(request: Request, e: Exception):
            log.exception("HTTP %s %s failed", request.method, request.url.path)
            return ApiError(500, f"internal error ({type(e).__name__}); see the router's "
                                 f"log").response()

        @app.get("/health")
        async def health():
            ok = self.healthy()
            return JSONResponse({"status": "ok" if ok else "unavailable"},
                                status_code=200 if ok else 503)

        @app.get("/metrics")
        async def metrics():
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return Response(generate_latest(self.router.metrics.registry),
                            media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models(request: Request):
            self._authorize(request)
            card = s.ModelCard(id=self.model_name, created=self.created,
                               max_model_len=self.router.config.max_position_embeddings)
            return s.ModelList(data=[card]).model_dump()

        @app.post("/v1/completions")
        async def completions(request: Request):
            self._authorize(request)
            body = self._parse(s.CompletionRequest, await self._body(request))
            return await self._serve(request, body, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            self._authorize(request)
            body = self._parse(s.ChatRequest, await self._body(request))
            return await self._serve(request, body, chat=True)

        return app

    def _authorize(self, request: Request) -> None:
        if not self.token:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise ApiError(401, "missing or wrong API key: send the header "
                                "`Authorization: Bearer TOKEN` (serving.auth_token_file)",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise ApiError(413, f"the body is {declared} bytes; this server takes at most "
                                f"{self.max_body} (serving.max_request_bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, f"the body is over {self.max_body} bytes "
                                    f"(serving.max_request_bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse(self, model: type[pydantic.BaseModel], body: bytes):
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not JSON ({e})") from None
        except RecursionError:
            raise ApiError(400, "the body nests too deeply") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            parsed = model.model_validate(data)
        except pydantic.ValidationError as e:
            raise _pydantic_error(e) from None
        refused = parsed.refused()
        if refused is not None:
            raise ApiError(400, f"{refused[0]}: {refused[1]}", refused[0])
        if parsed.model != self.model_name:
            raise ApiError(404, f"model {parsed.model!r} is not served here; this server serves "
                                f"{self.model_name!r} (GET /v1/models)", "model",
                           "model_not_found")
        return parsed

    # -- one request ------------------------------------------------------------------------------
    async def _serve(self, request: Request, body, *, chat: bool):
        prompts = await self._prompts(body) if chat else body.prompts()
        max_tokens = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        generate = [self._generate_request(rid, prompt, body, max_tokens, j)
                    for prompt in prompts for j in range(body.n)]
        run = _Run(self.router, generate, "messages" if chat else "prompt", body.n)
        await run.start()  # the checks ran: a bad request is an error status, not a stream
        if body.stream:
            return EventSourceResponse(self._events(run, body, rid, chat), sep="\n",
                                       ping=15)
        return await self._whole(request, run, body, rid, chat)

    async def _prompts(self, body: s.ChatRequest) -> list[list[int]]:
        if self.router.tokenizer is None:
            raise ApiError(400, f"{self.model_name!r} has no tokenizer, so chat messages cannot "
                                f"be tokenized: use /v1/completions with token ids", "messages")
        if self.template is None:
            raise ApiError(400, f"{self.model_name!r} has no chat template (its tokenizer_config"
                                f".json has no chat_template and there is no "
                                f"chat_template.jinja): use /v1/completions, or start the "
                                f"server with --chat-template FILE", "messages")
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for k, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise ApiError(400, f"messages[{i}].content[{k}]: only text parts are "
                                            f"supported (got {part.type!r})",
                                       f"messages[{i}].content")
                    texts.append(part.text)
                content = "".join(texts)
            if m.model_extra and m.model_extra.get("tool_calls"):
                raise ApiError(400, f"messages[{i}].tool_calls: tool calling is not supported",
                               "messages")
            message = {"role": m.role, "content": content if content is not None else ""}
            if m.name is not None:
                message["name"] = m.name
            messages.append(message)
        loop = asyncio.get_running_loop()

        def render() -> list[int]:
            text = self.template.render(messages, add_generation_prompt=body.add_generation_prompt,
                                        **(body.chat_template_kwargs or {}))
            return self.router.tokenizer.encode(text, add_special_tokens=False)
        try:
            ids = await loop.run_in_executor(self.router._checker, render)
        except ChatTemplateError as e:
            raise ApiError(400, f"messages: {e}", "messages") from None
        return [ids]

    def _generate_request(self, rid: str, prompt, body, max_tokens: int | None,
                          j: int) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            stop=body.stops(), stop_token_ids=body.stop_token_ids or [],
            ignore_eos=body.ignore_eos, logprobs=body.wants_logprobs())
        if max_tokens is not None:
            sampling.max_tokens = max_tokens
        if body.top_p is not None:
            sampling.top_p = body.top_p
        if body.top_k is not None and body.top_k > 0:
            sampling.top_k = body.top_k
        if body.seed is not None:  # each of n choices its own draw, reproducibly
            sampling.seed = (body.seed + j) % (1 << 32)
        request = pb.GenerateRequest(request_id=f"{rid}-{uuid.uuid4().hex[:8]}",
                                     sampling=sampling)
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids.ids.extend(prompt)
        return request

    # -- answers ----------------------------------------------------------------------------------
    async def _whole(self, request: Request, run: _Run, body, rid: str, chat: bool):
        """Every choice to its end, then one response; a client that leaves cancels it."""
        async def gone() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
        watcher = asyncio.create_task(gone())
        collect = asyncio.create_task(run.collect())
        try:
            done, _ = await asyncio.wait({watcher, collect}, return_when=asyncio.FIRST_COMPLETED)
            if collect not in done:
                collect.cancel()
                await run.close()
                return Response(status_code=499)
            choices = collect.result()
        finally:
            watcher.cancel()
        usage = run.usage()
        if chat:
            return s.ChatCompletion(id=rid, created=int(time.time()), model=self.model_name,
                                    choices=[s.ChatChoice(
                                        index=i, message=s.AssistantMessage(content=c.text),
                                        logprobs=self._chat_logprobs(c)
                                        if body.wants_logprobs() else None,
                                        finish_reason=c.finish, **self._ids(c, body))
                                        for i, c in enumerate(choices)],
                                    usage=usage).model_dump(exclude_none=True)
        return s.Completion(id=rid, created=int(time.time()), model=self.model_name,
                            choices=[s.CompletionChoice(
                                index=i, text=c.text, finish_reason=c.finish,
                                logprobs=self._completion_logprobs(c)
                                if body.wants_logprobs() else None, **self._ids(c, body))
                                for i, c in enumerate(choices)],
                            usage=usage).model_dump(exclude_none=True)

    async def _events(self, run: _Run, body, rid: str, chat: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of a choice, then usage, then [DONE]. When
        the client goes away the stream is cancelled and so are its requests."""
        created, include_usage = int(time.time()), bool(
            body.stream_options and body.stream_options.include_usage)
        usage_field = {"usage": None} if include_usage else {}
        try:
            if chat:
                for i in range(len(run.requests)):
                    first = s.ChatCompletionChunk(
                        id=rid, created=created, model=self.model_name,
                        choices=[s.ChatChunkChoice(index=i, delta=s.Delta(role="assistant",
                                                                          content=""))])
                    yield _json({**first.model_dump(exclude_none=True), **usage_field})
            async for i, piece in run.pieces():
                if chat:
                    choice = s.ChatChunkChoice(
                        index=i, delta=s.Delta(content=piece.text) if piece.text or
                        not piece.finish else s.Delta(),
                        logprobs=self._chat_logprobs(piece)
                        if body.wants_logprobs() and piece.ids else None,
                        finish_reason=piece.finish, **self._ids(piece, body))
                    chunk = s.ChatCompletionChunk(id=rid, created=created,
                                                  model=self.model_name, choices=[choice])
                else:
                    choice = s.CompletionChoice(
                        index=i, text=piece.text, finish_reason=piece.finish,
                        logprobs=self._completion_logprobs(piece)
                        if body.wants_logprobs() and piece.ids else None,
                        **self._ids(piece, body))
                    chunk = s.CompletionChunk(id=rid, created=created, model=self.model_name,
                                              choices=[choice])
                yield _json({**chunk.model_dump(exclude_none=True), **usage_field})
            if include_usage:
                kind = s.ChatCompletionChunk if chat else s.CompletionChunk
                yield _json(kind(id=rid, created=created, model=self.model_name, choices=[],
                                 usage=run.usage()).model_dump(exclude_none=True))
        except RequestFailed as e:  # mid-stream: the status line is gone, say it in the stream
            yield _json(_from_failed(e).body())
        finally:
            await run.close()
        yield "[DONE]"

    def _ids(self, piece: _Choice, body) -> dict:
        if not body.return_token_ids:
            return {}
        return {"prompt_token_ids": piece.prompt_ids if piece.first else None,
                "token_ids": piece.ids}

    def _token_text(self, token_id: int) -> str:
        return self.router.tokenizer.decode([token_id], skip_special_tokens=False) \
            if self.router.tokenizer is not None else str(token_id)

    def _chat_logprobs(self, piece: _Choice) -> s.ChoiceLogprobs:
        out = []
        for t, lp in zip(piece.ids, piece.logprobs):
            text = self._token_text(t)
            out.append(s.TokenLogprob(token=text, logprob=lp, bytes=list(text.encode())))
        return s.ChoiceLogprobs(content=out)

    def _completion_logprobs(self, piece: _Choice) -> s.CompletionLogprobs:
        tokens = [self._token_text(t) for t in piece.ids]
        offsets, at = [], piece.text_offset
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return s.CompletionLogprobs(tokens=tokens, token_logprobs=list(piece.logprobs),
                                    top_logprobs=None, text_offset=offsets)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class _Choice:
    """One choice's output so far (whole), or one piece of it (streaming)."""

    def __init__(self):
        self.text, self.ids, self.logprobs = "", [], []
        self.finish: str | None = None
        self.prompt_ids: list[int] = []
        self.first = True  # the choice's first piece (carries the prompt's ids)
        self.text_offset = 0


class _Run:
    """The generate streams of one HTTP request (each prompt x n), run concurrently."""

    def __init__(self, router: Router, requests: list[pb.GenerateRequest], prompt_param: str,
                 n: int):
        self.router, self.requests, self.prompt_param, self.n = router, requests, prompt_param, n
        self._streams: list = []
        self._firsts: list = []
        self._prompt_ids: dict[int, list[int]] = {}
        self._complete: dict[int, pb.Complete] = {}
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Open every stream up to its first response, together, so a refused request (a bad
        parameter, a full queue, draining) is an error status before any byte of a 200."""
        for i, request in enumerate(self.requests):
            self._streams.append(self.router.generate(
                request, on_valid=lambda v, i=i: self._prompt_ids.__setitem__(
                    i, list(v.prompt_ids))))

        async def first(stream):
            try:
                return await stream.__anext__()
            except StopAsyncIteration:
                return None
        self._firsts = await asyncio.gather(*(first(st) for st in self._streams),
                                            return_exceptions=True)
        for result in self._firsts:
            if isinstance(result, BaseException):
                await self.close()
                if isinstance(result, InvalidRequest):
                    raise _from_invalid(result, self.prompt_param) from None
                if isinstance(result, RequestFailed):
                    raise _from_failed(result) from None
                raise result

    async def pieces(self) -> AsyncIterator[tuple[int, _Choice]]:
        """(choice index, piece) as they come from every stream."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                if self._firsts[i] is not None:
                    await queue.put((i, self._firsts[i]))
                    async for response in self._streams[i]:
                        await queue.put((i, response))
                await queue.put((i, None))
            except (RequestFailed, InvalidRequest) as e:
                await queue.put((i, e))
        self._tasks = [asyncio.create_task(pump(i)) for i in range(len(self.requests))]
        open_, started, offsets = len(self.requests), set(), [0] * len(self.requests)
        while open_:
            i, item = await queue.get()
            if item is None:
                open_ -= 1
                continue
            if isinstance(item, InvalidRequest):
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(item))
            if isinstance(item, Exception):
                raise item
            piece = _Choice()
            piece.first, piece.prompt_ids = i not in started, self._prompt_ids.get(i, [])
            piece.text_offset = offsets[i]
            started.add(i)
            if item.HasField("chunk"):
                piece.text, piece.ids = item.chunk.text, list(item.chunk.token_ids)
                piece.logprobs = list(item.chunk.logprobs)
                offsets[i] += len(piece.text)
            else:
                self._complete[i] = item.complete
                piece.finish = FINISH.get(item.complete.finish_reason,
                                          item.complete.finish_reason)
            yield i, piece

    async def collect(self) -> list[_Choice]:
        choices = [_Choice() for _ in self.requests]
        for i, c in enumerate(choices):
            c.prompt_ids = self._prompt_ids.get(i, [])
        try:
            async for i, piece in self.pieces():
                c = choices[i]
                c.text += piece.text
                c.ids += piece.ids
                c.logprobs += piece.logprobs
                c.finish = piece.finish or c.finish
        except RequestFailed as e:
            raise _from_failed(e) from None
        return choices

    def usage(self) -> s.Usage:
        """Each prompt counted once (its n choices share it), every choice's completion."""
        prompt = sum(len(ids) for i, ids in self._prompt_ids.items() if i % self.n == 0)
        completion = sum(c.usage.completion_tokens for c in self._complete.values())
        cached = sum(c.usage.cached_tokens for i, c in self._complete.items() if i % self.n == 0)
        return s.Usage(prompt_tokens=prompt, completion_tokens=completion,
                       total_tokens=prompt + completion,
                       prompt_tokens_details={"cached_tokens": cached})

    async def close(self) -> None:
        """Cancel whatever still runs: its requests end and their pages are freed."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for stream in self._streams:
            with contextlib.suppress(Exception):
                await stream.aclose()
