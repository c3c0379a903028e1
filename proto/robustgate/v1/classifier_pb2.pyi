from robustgate.v1 import probe_pb2 as _probe_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_PASS: _ClassVar[Decision]
    DECISION_FLAG: _ClassVar[Decision]
    DECISION_REJECT: _ClassVar[Decision]
DECISION_UNSPECIFIED: Decision
DECISION_PASS: Decision
DECISION_FLAG: Decision
DECISION_REJECT: Decision

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "version", "image", "tensor", "top_k", "request_id", "certify")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFY_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    image: bytes
    tensor: _probe_pb2.Tensor
    top_k: int
    request_id: str
    certify: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., image: _Optional[bytes] = ..., tensor: _Optional[_Union[_probe_pb2.Tensor, _Mapping]] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ..., certify: _Optional[bool] = ...) -> None: ...

class ClassifyStreamRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: ClassifyRequest
    def __init__(self, request: _Optional[_Union[ClassifyRequest, _Mapping]] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "label", "probability")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    probability: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class CheckResult(_message.Message):
    __slots__ = ("name", "ran", "score", "flag_threshold", "reject_threshold", "verdict", "forward_passes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RAN_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FLAG_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REJECT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    ran: bool
    score: float
    flag_threshold: float
    reject_threshold: float
    verdict: Decision
    forward_passes: int
    def __init__(self, name: _Optional[str] = ..., ran: _Optional[bool] = ..., score: _Optional[float] = ..., flag_threshold: _Optional[float] = ..., reject_threshold: _Optional[float] = ..., verdict: _Optional[_Union[Decision, str]] = ..., forward_passes: _Optional[int] = ...) -> None: ...

class GateReport(_message.Message):
    __slots__ = ("decision", "policy_decision", "mode", "checks", "certified", "certified_radius", "forward_passes", "policy_version")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    POLICY_DECISION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    CERTIFIED_FIELD_NUMBER: _ClassVar[int]
    CERTIFIED_RADIUS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    policy_decision: Decision
    mode: str
    checks: _containers.RepeatedCompositeFieldContainer[CheckResult]
    certified: bool
    certified_radius: float
    forward_passes: int
    policy_version: str
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., policy_decision: _Optional[_Union[Decision, str]] = ..., mode: _Optional[str] = ..., checks: _Optional[_Iterable[_Union[CheckResult, _Mapping]]] = ..., certified: _Optional[bool] = ..., certified_radius: _Optional[float] = ..., forward_passes: _Optional[int] = ..., policy_version: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_seconds", "backend_seconds", "gate_seconds", "total_seconds")
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GATE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    decode_seconds: float
    backend_seconds: float
    gate_seconds: float
    total_seconds: float
    def __init__(self, decode_seconds: _Optional[float] = ..., backend_seconds: _Optional[float] = ..., gate_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("request_id", "model", "version", "classes", "gate", "timings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    version: str
    classes: _containers.RepeatedCompositeFieldContainer[ClassScore]
    gate: GateReport
    timings: Timings
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., classes: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., gate: _Optional[_Union[GateReport, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("request_id", "result", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    result: ClassifyResponse
    error: StreamError
    def __init__(self, request_id: _Optional[str] = ..., result: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "version", "formats", "ready")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    formats: _containers.RepeatedScalarFieldContainer[str]
    ready: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., formats: _Optional[_Iterable[str]] = ..., ready: _Optional[bool] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("shape", "dtype", "mode", "encodings", "max_image_bytes", "tensor_dtypes")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_DTYPES_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    mode: str
    encodings: _containers.RepeatedScalarFieldContainer[str]
    max_image_bytes: int
    tensor_dtypes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., mode: _Optional[str] = ..., encodings: _Optional[_Iterable[str]] = ..., max_image_bytes: _Optional[int] = ..., tensor_dtypes: _Optional[_Iterable[str]] = ...) -> None: ...

class PolicySummary(_message.Message):
    __slots__ = ("version", "mode", "enabled_checks", "max_forward_passes", "noise_sigma", "model_sha256", "certify_default", "certify_refused")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ENABLED_CHECKS_FIELD_NUMBER: _ClassVar[int]
    MAX_FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    NOISE_SIGMA_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    CERTIFY_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    CERTIFY_REFUSED_FIELD_NUMBER: _ClassVar[int]
    version: str
    mode: str
    enabled_checks: _containers.RepeatedScalarFieldContainer[str]
    max_forward_passes: int
    noise_sigma: float
    model_sha256: str
    certify_default: bool
    certify_refused: bool
    def __init__(self, version: _Optional[str] = ..., mode: _Optional[str] = ..., enabled_checks: _Optional[_Iterable[str]] = ..., max_forward_passes: _Optional[int] = ..., noise_sigma: _Optional[float] = ..., model_sha256: _Optional[str] = ..., certify_default: _Optional[bool] = ..., certify_refused: _Optional[bool] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("name", "version", "labels", "input", "policy", "formats")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    input: InputSpec
    policy: PolicySummary
    formats: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., policy: _Optional[_Union[PolicySummary, _Mapping]] = ..., formats: _Optional[_Iterable[str]] = ...) -> None: ...
