from jaxpd.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EngineRequest(_message.Message):
    __slots__ = ("request_id", "prompt_ids", "sampling", "seed", "sample_offset", "request_token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generation_pb2.SamplingParams
    seed: int
    sample_offset: int
    request_token: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., sample_offset: _Optional[int] = ..., request_token: _Optional[str] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request", "kv_target", "kv_target_name", "kv_skip_tokens")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    KV_TARGET_FIELD_NUMBER: _ClassVar[int]
    KV_TARGET_NAME_FIELD_NUMBER: _ClassVar[int]
    KV_SKIP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request: EngineRequest
    kv_target: str
    kv_target_name: str
    kv_skip_tokens: int
    def __init__(self, request: _Optional[_Union[EngineRequest, _Mapping]] = ..., kv_target: _Optional[str] = ..., kv_target_name: _Optional[str] = ..., kv_skip_tokens: _Optional[int] = ...) -> None: ...

class FirstToken(_message.Message):
    __slots__ = ("token_id", "logprob", "finish_reason", "cached_tokens", "queue_s", "prefill_s")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    finish_reason: str
    cached_tokens: int
    queue_s: float
    prefill_s: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., finish_reason: _Optional[str] = ..., cached_tokens: _Optional[int] = ..., queue_s: _Optional[float] = ..., prefill_s: _Optional[float] = ...) -> None: ...

class KVSent(_message.Message):
    __slots__ = ("bytes", "messages")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    messages: int
    def __init__(self, bytes: _Optional[int] = ..., messages: _Optional[int] = ...) -> None: ...

class PrefillEvent(_message.Message):
    __slots__ = ("first_token", "kv_sent")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KV_SENT_FIELD_NUMBER: _ClassVar[int]
    first_token: FirstToken
    kv_sent: KVSent
    def __init__(self, first_token: _Optional[_Union[FirstToken, _Mapping]] = ..., kv_sent: _Optional[_Union[KVSent, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request", "local_prefill")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_FIELD_NUMBER: _ClassVar[int]
    request: EngineRequest
    local_prefill: bool
    def __init__(self, request: _Optional[_Union[EngineRequest, _Mapping]] = ..., local_prefill: _Optional[bool] = ...) -> None: ...

class Reserved(_message.Message):
    __slots__ = ("pages", "data_address", "cached_tokens")
    PAGES_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    pages: int
    data_address: str
    cached_tokens: int
    def __init__(self, pages: _Optional[int] = ..., data_address: _Optional[str] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class Prefilled(_message.Message):
    __slots__ = ("cached_tokens", "queue_s", "prefill_s")
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    cached_tokens: int
    queue_s: float
    prefill_s: float
    def __init__(self, cached_tokens: _Optional[int] = ..., queue_s: _Optional[float] = ..., prefill_s: _Optional[float] = ...) -> None: ...

class KVReceived(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class Tokens(_message.Message):
    __slots__ = ("token_ids", "logprobs", "finish_reason", "matched_token_id")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MATCHED_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: str
    matched_token_id: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[str] = ..., matched_token_id: _Optional[int] = ...) -> None: ...

class DecodeEvent(_message.Message):
    __slots__ = ("reserved", "prefilled", "kv_received", "tokens")
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_FIELD_NUMBER: _ClassVar[int]
    KV_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    reserved: Reserved
    prefilled: Prefilled
    kv_received: KVReceived
    tokens: Tokens
    def __init__(self, reserved: _Optional[_Union[Reserved, _Mapping]] = ..., prefilled: _Optional[_Union[Prefilled, _Mapping]] = ..., kv_received: _Optional[_Union[KVReceived, _Mapping]] = ..., tokens: _Optional[_Union[Tokens, _Mapping]] = ...) -> None: ...

class KVHeader(_message.Message):
    __slots__ = ("request_id", "layer_start", "layer_end", "token_start", "token_end", "head_start", "head_end", "dtype", "shape", "model_fingerprint", "crc32c", "finish", "request_token", "pull")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    HEAD_START_FIELD_NUMBER: _ClassVar[int]
    HEAD_END_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int
    head_start: int
    head_end: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    model_fingerprint: bytes
    crc32c: int
    finish: KVFinish
    request_token: str
    pull: KVPull
    def __init__(self, request_id: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., head_start: _Optional[int] = ..., head_end: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., model_fingerprint: _Optional[bytes] = ..., crc32c: _Optional[int] = ..., finish: _Optional[_Union[KVFinish, _Mapping]] = ..., request_token: _Optional[str] = ..., pull: _Optional[_Union[KVPull, _Mapping]] = ...) -> None: ...

class KVPull(_message.Message):
    __slots__ = ("address", "uuid", "offset")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    address: str
    uuid: int
    offset: int
    def __init__(self, address: _Optional[str] = ..., uuid: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class KVFinish(_message.Message):
    __slots__ = ("num_tokens", "first_token", "first_logprob")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    first_token: int
    first_logprob: float
    def __init__(self, num_tokens: _Optional[int] = ..., first_token: _Optional[int] = ..., first_logprob: _Optional[float] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class KVAck(_message.Message):
    __slots__ = ("request_id", "bytes", "messages")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    bytes: int
    messages: int
    def __init__(self, request_id: _Optional[str] = ..., bytes: _Optional[int] = ..., messages: _Optional[int] = ...) -> None: ...

class GetWorkerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVDigestsRequest(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class KVDigest(_message.Message):
    __slots__ = ("crc32c", "bytes", "num_tokens")
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    crc32c: int
    bytes: int
    num_tokens: int
    def __init__(self, crc32c: _Optional[int] = ..., bytes: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class KVDigests(_message.Message):
    __slots__ = ("digests",)
    class DigestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: KVDigest
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[KVDigest, _Mapping]] = ...) -> None: ...
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.MessageMap[str, KVDigest]
    def __init__(self, digests: _Optional[_Mapping[str, KVDigest]] = ...) -> None: ...
