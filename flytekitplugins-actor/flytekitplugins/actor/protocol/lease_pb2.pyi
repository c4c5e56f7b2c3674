from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_PHASE_UNSPECIFIED: _ClassVar[TaskPhase]
    SUCCEEDED: _ClassVar[TaskPhase]
    FAILED: _ClassVar[TaskPhase]
    LOST: _ClassVar[TaskPhase]
    CANCELLED: _ClassVar[TaskPhase]
TASK_PHASE_UNSPECIFIED: TaskPhase
SUCCEEDED: TaskPhase
FAILED: TaskPhase
LOST: TaskPhase
CANCELLED: TaskPhase

class ReplicaMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "status", "statuses")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    status: TaskStatus
    statuses: StatusBatch
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., status: _Optional[_Union[TaskStatus, _Mapping]] = ..., statuses: _Optional[_Union[StatusBatch, _Mapping]] = ...) -> None: ...

class StatusBatch(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[TaskStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[TaskStatus, _Mapping]]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "environment_key", "replica_id", "token", "capacity", "running_lease_ids", "worker_version", "queue_depth")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_KEY_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    RUNNING_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    WORKER_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    environment_key: str
    replica_id: str
    token: str
    capacity: int
    running_lease_ids: _containers.RepeatedScalarFieldContainer[str]
    worker_version: str
    queue_depth: int
    def __init__(self, protocol_version: _Optional[int] = ..., environment_key: _Optional[str] = ..., replica_id: _Optional[str] = ..., token: _Optional[str] = ..., capacity: _Optional[int] = ..., running_lease_ids: _Optional[_Iterable[str]] = ..., worker_version: _Optional[str] = ..., queue_depth: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("running_lease_ids",)
    RUNNING_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    running_lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, running_lease_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class TaskStatus(_message.Message):
    __slots__ = ("lease_id", "phase", "outputs", "error", "message", "retryable", "run_seconds", "outputs_in_prefix", "outputs_size", "system_error", "outputs_group")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    RUN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_IN_PREFIX_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_SIZE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_ERROR_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_GROUP_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    phase: TaskPhase
    outputs: bytes
    error: bytes
    message: str
    retryable: bool
    run_seconds: float
    outputs_in_prefix: bool
    outputs_size: int
    system_error: bool
    outputs_group: str
    def __init__(self, lease_id: _Optional[str] = ..., phase: _Optional[_Union[TaskPhase, str]] = ..., outputs: _Optional[bytes] = ..., error: _Optional[bytes] = ..., message: _Optional[str] = ..., retryable: bool = ..., run_seconds: _Optional[float] = ..., outputs_in_prefix: bool = ..., outputs_size: _Optional[int] = ..., system_error: bool = ..., outputs_group: _Optional[str] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("welcome", "assignment", "ack", "cancel", "drain", "assignments", "recall")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    assignment: Assignment
    ack: Ack
    cancel: Cancel
    drain: Drain
    assignments: Assignments
    recall: Recall
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ..., assignments: _Optional[_Union[Assignments, _Mapping]] = ..., recall: _Optional[_Union[Recall, _Mapping]] = ...) -> None: ...

class Assignments(_message.Message):
    __slots__ = ("assignments",)
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    def __init__(self, assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("heartbeat_interval_seconds", "abandoned_lease_ids", "batches")
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ABANDONED_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_seconds: float
    abandoned_lease_ids: _containers.RepeatedScalarFieldContainer[str]
    batches: bool
    def __init__(self, heartbeat_interval_seconds: _Optional[float] = ..., abandoned_lease_ids: _Optional[_Iterable[str]] = ..., batches: bool = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("lease_id", "task")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    task: TaskRun
    def __init__(self, lease_id: _Optional[str] = ..., task: _Optional[_Union[TaskRun, _Mapping]] = ...) -> None: ...

class TaskRun(_message.Message):
    __slots__ = ("task_name", "resolver", "resolver_args", "inputs", "inputs_uri", "output_prefix", "raw_output_data_prefix", "checkpoint_path", "prev_checkpoint", "distribution", "dest_dir", "env", "timeout_seconds", "outputs_to_prefix", "batch_key", "outputs_group_prefix", "element_index")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_NAME_FIELD_NUMBER: _ClassVar[int]
    RESOLVER_FIELD_NUMBER: _ClassVar[int]
    RESOLVER_ARGS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_URI_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    RAW_OUTPUT_DATA_PREFIX_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    PREV_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    DEST_DIR_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_TO_PREFIX_FIELD_NUMBER: _ClassVar[int]
    BATCH_KEY_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_GROUP_PREFIX_FIELD_NUMBER: _ClassVar[int]
    ELEMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    task_name: str
    resolver: str
    resolver_args: _containers.RepeatedScalarFieldContainer[str]
    inputs: bytes
    inputs_uri: str
    output_prefix: str
    raw_output_data_prefix: str
    checkpoint_path: str
    prev_checkpoint: str
    distribution: str
    dest_dir: str
    env: _containers.ScalarMap[str, str]
    timeout_seconds: float
    outputs_to_prefix: bool
    batch_key: str
    outputs_group_prefix: str
    element_index: int
    def __init__(self, task_name: _Optional[str] = ..., resolver: _Optional[str] = ..., resolver_args: _Optional[_Iterable[str]] = ..., inputs: _Optional[bytes] = ..., inputs_uri: _Optional[str] = ..., output_prefix: _Optional[str] = ..., raw_output_data_prefix: _Optional[str] = ..., checkpoint_path: _Optional[str] = ..., prev_checkpoint: _Optional[str] = ..., distribution: _Optional[str] = ..., dest_dir: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., timeout_seconds: _Optional[float] = ..., outputs_to_prefix: bool = ..., batch_key: _Optional[str] = ..., outputs_group_prefix: _Optional[str] = ..., element_index: _Optional[int] = ...) -> None: ...

class ElementOutputsGroup(_message.Message):
    __slots__ = ("elements",)
    ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    elements: _containers.RepeatedCompositeFieldContainer[ElementOutputs]
    def __init__(self, elements: _Optional[_Iterable[_Union[ElementOutputs, _Mapping]]] = ...) -> None: ...

class ElementOutputs(_message.Message):
    __slots__ = ("index", "outputs")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    outputs: bytes
    def __init__(self, index: _Optional[int] = ..., outputs: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("lease_id", "lease_ids")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lease_id: _Optional[str] = ..., lease_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("lease_id", "reason")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reason: str
    def __init__(self, lease_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Recall(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...
