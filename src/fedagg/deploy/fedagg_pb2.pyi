from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

DESCRIPTOR: _descriptor.FileDescriptor

class Auth(_message.Message):
    __slots__ = ("client", "nonce", "signature", "timestamp_ms")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    client: str
    timestamp_ms: int
    nonce: bytes
    signature: bytes
    def __init__(
        self,
        client: str | None = ...,
        timestamp_ms: int | None = ...,
        nonce: bytes | None = ...,
        signature: bytes | None = ...,
    ) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("auth", "protocol")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    protocol: int
    def __init__(self, auth: Auth | _Mapping | None = ..., protocol: int | None = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("chunk_bytes", "client_index", "model_bytes", "protocol", "spec_json")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    client_index: int
    spec_json: str
    model_bytes: int
    chunk_bytes: int
    def __init__(
        self,
        protocol: int | None = ...,
        client_index: int | None = ...,
        spec_json: str | None = ...,
        model_bytes: int | None = ...,
        chunk_bytes: int | None = ...,
    ) -> None: ...

class TasksRequest(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    def __init__(self, auth: Auth | _Mapping | None = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("epochs", "finished", "heartbeat", "seed", "task", "version")
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    task: int
    version: int
    epochs: int
    heartbeat: bool
    finished: bool
    seed: int
    def __init__(
        self,
        task: int | None = ...,
        version: int | None = ...,
        epochs: int | None = ...,
        heartbeat: bool = ...,
        finished: bool = ...,
        seed: int | None = ...,
    ) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("auth", "task")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    task: int
    def __init__(self, auth: Auth | _Mapping | None = ..., task: int | None = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("data", "offset", "total", "version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    version: int
    offset: int
    data: bytes
    total: int
    def __init__(
        self,
        version: int | None = ...,
        offset: int | None = ...,
        data: bytes | None = ...,
        total: int | None = ...,
    ) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("auth", "metrics", "nbytes", "sha256", "task", "version", "weight")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: str | None = ..., value: float | None = ...) -> None: ...

    AUTH_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    task: int
    version: int
    weight: float
    nbytes: int
    sha256: bytes
    metrics: _containers.ScalarMap[str, float]
    def __init__(
        self,
        auth: Auth | _Mapping | None = ...,
        task: int | None = ...,
        version: int | None = ...,
        weight: float | None = ...,
        nbytes: int | None = ...,
        sha256: bytes | None = ...,
        metrics: _Mapping[str, float] | None = ...,
    ) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("data", "header", "offset")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    offset: int
    data: bytes
    def __init__(
        self,
        header: UploadHeader | _Mapping | None = ...,
        offset: int | None = ...,
        data: bytes | None = ...,
    ) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("duplicate", "task")
    TASK_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    task: int
    duplicate: bool
    def __init__(self, task: int | None = ..., duplicate: bool = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("auth", "tasks")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    tasks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(
        self, auth: Auth | _Mapping | None = ..., tasks: _Iterable[int] | None = ...
    ) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("server_time_ms",)
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    server_time_ms: int
    def __init__(self, server_time_ms: int | None = ...) -> None: ...
