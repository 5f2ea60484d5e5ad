from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Auth(_message.Message):
    __slots__ = ("client", "timestamp_ms", "nonce", "signature")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    client: str
    timestamp_ms: int
    nonce: bytes
    signature: bytes
    def __init__(self, client: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("auth", "protocol", "serves")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    SERVES_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    protocol: int
    serves: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, auth: _Optional[_Union[Auth, _Mapping]] = ..., protocol: _Optional[int] = ..., serves: _Optional[_Iterable[int]] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("protocol", "client_index", "spec_json", "model_bytes", "chunk_bytes", "digest", "digest_algorithm", "max_streams", "retained", "data_port")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DIGEST_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    RETAINED_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    client_index: int
    spec_json: str
    model_bytes: int
    chunk_bytes: int
    digest: bool
    digest_algorithm: str
    max_streams: int
    retained: bool
    data_port: int
    def __init__(self, protocol: _Optional[int] = ..., client_index: _Optional[int] = ..., spec_json: _Optional[str] = ..., model_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., digest: bool = ..., digest_algorithm: _Optional[str] = ..., max_streams: _Optional[int] = ..., retained: bool = ..., data_port: _Optional[int] = ...) -> None: ...

class TasksRequest(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    def __init__(self, auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task", "version", "epochs", "heartbeat", "finished", "seed", "client", "config", "kind", "secagg", "watermark")
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    task: int
    version: int
    epochs: int
    heartbeat: bool
    finished: bool
    seed: int
    client: int
    config: str
    kind: str
    secagg: SecureStage
    watermark: int
    def __init__(self, task: _Optional[int] = ..., version: _Optional[int] = ..., epochs: _Optional[int] = ..., heartbeat: bool = ..., finished: bool = ..., seed: _Optional[int] = ..., client: _Optional[int] = ..., config: _Optional[str] = ..., kind: _Optional[str] = ..., secagg: _Optional[_Union[SecureStage, _Mapping]] = ..., watermark: _Optional[int] = ...) -> None: ...

class SecureStage(_message.Message):
    __slots__ = ("round", "stage", "payload")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    round: int
    stage: int
    payload: bytes
    def __init__(self, round: _Optional[int] = ..., stage: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("auth", "task")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    task: int
    def __init__(self, auth: _Optional[_Union[Auth, _Mapping]] = ..., task: _Optional[int] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("version", "offset", "data", "total")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    version: int
    offset: int
    data: bytes
    total: int
    def __init__(self, version: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total: _Optional[int] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("auth", "task", "version", "weight", "nbytes", "metrics", "relay", "on_behalf", "partial", "origin", "shard", "shards")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    AUTH_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    RELAY_FIELD_NUMBER: _ClassVar[int]
    ON_BEHALF_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    task: int
    version: int
    weight: float
    nbytes: int
    metrics: _containers.ScalarMap[str, float]
    relay: bool
    on_behalf: int
    partial: Partial
    origin: Origin
    shard: int
    shards: int
    def __init__(self, auth: _Optional[_Union[Auth, _Mapping]] = ..., task: _Optional[int] = ..., version: _Optional[int] = ..., weight: _Optional[float] = ..., nbytes: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., relay: bool = ..., on_behalf: _Optional[int] = ..., partial: _Optional[_Union[Partial, _Mapping]] = ..., origin: _Optional[_Union[Origin, _Mapping]] = ..., shard: _Optional[int] = ..., shards: _Optional[int] = ...) -> None: ...

class Origin(_message.Message):
    __slots__ = ("auth", "sha256", "trailer_signature", "metrics", "digest_algorithm")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    AUTH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TRAILER_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    sha256: bytes
    trailer_signature: bytes
    metrics: _containers.ScalarMap[str, float]
    digest_algorithm: str
    def __init__(self, auth: _Optional[_Union[Auth, _Mapping]] = ..., sha256: _Optional[bytes] = ..., trailer_signature: _Optional[bytes] = ..., metrics: _Optional[_Mapping[str, float]] = ..., digest_algorithm: _Optional[str] = ...) -> None: ...

class PartialJob(_message.Message):
    __slots__ = ("task", "client", "weight", "train_loss", "origin")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    task: int
    client: int
    weight: float
    train_loss: float
    origin: Origin
    def __init__(self, task: _Optional[int] = ..., client: _Optional[int] = ..., weight: _Optional[float] = ..., train_loss: _Optional[float] = ..., origin: _Optional[_Union[Origin, _Mapping]] = ...) -> None: ...

class Partial(_message.Message):
    __slots__ = ("jobs", "weight", "weight_comp", "accumulator_bits", "dropped")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_COMP_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATOR_BITS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[PartialJob]
    weight: float
    weight_comp: float
    accumulator_bits: int
    dropped: _containers.RepeatedCompositeFieldContainer[PartialJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[PartialJob, _Mapping]]] = ..., weight: _Optional[float] = ..., weight_comp: _Optional[float] = ..., accumulator_bits: _Optional[int] = ..., dropped: _Optional[_Iterable[_Union[PartialJob, _Mapping]]] = ...) -> None: ...

class UploadTrailer(_message.Message):
    __slots__ = ("sha256", "signature")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    sha256: bytes
    signature: bytes
    def __init__(self, sha256: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("header", "offset", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    offset: int
    data: bytes
    trailer: UploadTrailer
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[UploadTrailer, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("task", "duplicate", "retain", "watermark")
    TASK_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    RETAIN_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    task: int
    duplicate: bool
    retain: bool
    watermark: int
    def __init__(self, task: _Optional[int] = ..., duplicate: bool = ..., retain: bool = ..., watermark: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("auth", "tasks")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    tasks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, auth: _Optional[_Union[Auth, _Mapping]] = ..., tasks: _Optional[_Iterable[int]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("server_time_ms", "watermark")
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    server_time_ms: int
    watermark: int
    def __init__(self, server_time_ms: _Optional[int] = ..., watermark: _Optional[int] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("auth", "task", "version", "num_examples", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    AUTH_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    task: int
    version: int
    num_examples: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, auth: _Optional[_Union[Auth, _Mapping]] = ..., task: _Optional[int] = ..., version: _Optional[int] = ..., num_examples: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ReportReply(_message.Message):
    __slots__ = ("task", "duplicate")
    TASK_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    task: int
    duplicate: bool
    def __init__(self, task: _Optional[int] = ..., duplicate: bool = ...) -> None: ...

class SecureRequest(_message.Message):
    __slots__ = ("auth", "task", "round", "stage", "payload", "on_behalf", "origin")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ON_BEHALF_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    auth: Auth
    task: int
    round: int
    stage: int
    payload: bytes
    on_behalf: int
    origin: Auth
    def __init__(self, auth: _Optional[_Union[Auth, _Mapping]] = ..., task: _Optional[int] = ..., round: _Optional[int] = ..., stage: _Optional[int] = ..., payload: _Optional[bytes] = ..., on_behalf: _Optional[int] = ..., origin: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class SecureReply(_message.Message):
    __slots__ = ("task", "duplicate")
    TASK_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    task: int
    duplicate: bool
    def __init__(self, task: _Optional[int] = ..., duplicate: bool = ...) -> None: ...
