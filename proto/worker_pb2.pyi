from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StartBackendRequest(_message.Message):
    __slots__ = ("model_name", "backend_type", "replica_index")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_TYPE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_INDEX_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    backend_type: str
    replica_index: int
    def __init__(self, model_name: _Optional[str] = ..., backend_type: _Optional[str] = ..., replica_index: _Optional[int] = ...) -> None: ...

class StartBackendResponse(_message.Message):
    __slots__ = ("address", "reused", "pid")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    address: str
    reused: bool
    pid: int
    def __init__(self, address: _Optional[str] = ..., reused: _Optional[bool] = ..., pid: _Optional[int] = ...) -> None: ...

class StopBackendRequest(_message.Message):
    __slots__ = ("model_name", "replica_index")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_INDEX_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    replica_index: int
    def __init__(self, model_name: _Optional[str] = ..., replica_index: _Optional[int] = ...) -> None: ...

class StopBackendResponse(_message.Message):
    __slots__ = ("stopped",)
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    stopped: bool
    def __init__(self, stopped: _Optional[bool] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("stopped",)
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    stopped: int
    def __init__(self, stopped: _Optional[int] = ...) -> None: ...

class ListBackendsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackendProcess(_message.Message):
    __slots__ = ("model_name", "backend_type", "replica_index", "address", "state", "pid", "exit_code", "last_stderr", "started_at_unix_ms", "memory_bytes")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[BackendProcess.State]
        STARTING: _ClassVar[BackendProcess.State]
        RUNNING: _ClassVar[BackendProcess.State]
        EXITED: _ClassVar[BackendProcess.State]
    STATE_UNSPECIFIED: BackendProcess.State
    STARTING: BackendProcess.State
    RUNNING: BackendProcess.State
    EXITED: BackendProcess.State
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_TYPE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    LAST_STDERR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    backend_type: str
    replica_index: int
    address: str
    state: BackendProcess.State
    pid: int
    exit_code: int
    last_stderr: str
    started_at_unix_ms: int
    memory_bytes: int
    def __init__(self, model_name: _Optional[str] = ..., backend_type: _Optional[str] = ..., replica_index: _Optional[int] = ..., address: _Optional[str] = ..., state: _Optional[_Union[BackendProcess.State, str]] = ..., pid: _Optional[int] = ..., exit_code: _Optional[int] = ..., last_stderr: _Optional[str] = ..., started_at_unix_ms: _Optional[int] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class ListBackendsResponse(_message.Message):
    __slots__ = ("node_id", "backends")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    backends: _containers.RepeatedCompositeFieldContainer[BackendProcess]
    def __init__(self, node_id: _Optional[str] = ..., backends: _Optional[_Iterable[_Union[BackendProcess, _Mapping]]] = ...) -> None: ...
