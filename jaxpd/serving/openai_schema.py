"""The OpenAI API's request and response bodies that jaxpd speaks, as pydantic models.

Requests are strict about what jaxpd cannot do: an unknown field, or a known one it cannot
honour set to anything but its neutral value (`presence_penalty: 0`, `echo: false`,
`tools: []`...), is a 400 naming it, never silently dropped. The vLLM extensions its users rely
on are accepted: `top_k`, `ignore_eos`, `stop_token_ids`, `return_token_ids`,
`add_generation_prompt`, `chat_template_kwargs`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_CHOICES = 64  # prompts x n of one request: each is a stream of its own

# Known parameters jaxpd cannot honour, with the values that ask for nothing (accepted).
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "logit_bias": (None, {}), "echo": (None, False),
    "suffix": (None, ""), "best_of": (None, 1), "min_tokens": (None, 0),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "min_p": (None, 0, 0.0), "top_logprobs": (None, 0), "prompt_logprobs": (None,),
    "parallel_tool_calls": (None, True, False), "store": (None, False),
    "metadata": (None, {}), "service_tier": (None, "auto", "default"),
    "reasoning_effort": (None,), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "web_search_options": (None,), "continue_final_message": (None, False),
}
WHY = {
    "presence_penalty": "penalties are not implemented", "frequency_penalty":
    "penalties are not implemented", "repetition_penalty": "penalties are not implemented",
    "logit_bias": "logit biases are not implemented", "echo": "the prompt is not echoed "
    "(return_token_ids gives its token ids)", "suffix": "insertion is not supported",
    "best_of": "best_of is not supported (use n)", "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported", "functions": "function calling is not "
    "supported", "function_call": "function calling is not supported", "response_format":
    "structured output is not supported", "top_logprobs": "only the chosen tokens' logprobs "
    "are returned", "prompt_logprobs": "prompt logprobs are not returned",
}


class _Request(BaseModel):
    """Fields both endpoints share. Unknown fields are refused (see `refused`)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=1 << 32)
    user: str | None = None
    top_k: int | None = Field(None, ge=-1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False

    def refused(self) -> tuple[str, str] | None:
        """(param, why) of the first field this request sets that jaxpd cannot honour."""
        for name, value in (self.model_extra or {}).items():
            if name in NEUTRAL:
                if value not in NEUTRAL[name]:
                    return name, f"{WHY.get(name, 'not supported by jaxpd')} (got {value!r})"
            else:
                return name, "unknown parameter (not part of the API jaxpd serves)"
        return None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=0)  # chosen tokens only: 0

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _not_too_many(self) -> CompletionRequest:
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise ValueError(f"prompt: {len(self.prompts())} prompts x n={self.n} is more than "
                             f"{MAX_CHOICES} choices in one request; send several requests")
        return self

    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def wants_logprobs(self) -> bool:
        return self.logprobs


# -- responses --------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class _Choice(BaseModel):
    """What every choice carries (`prompt_token_ids`/`token_ids` with return_token_ids)."""

    index: int
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class _Envelope(BaseModel):
    """What every response and streamed chunk carries."""

    id: str
    created: int
    model: str


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class Completion(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict[str, Any]] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Choice):
    delta: Delta
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# OpenAI streams completions as the same `text_completion` object, one choice piece at a time
CompletionChunk = Completion


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "jaxpd"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatRequest.model_rebuild()
