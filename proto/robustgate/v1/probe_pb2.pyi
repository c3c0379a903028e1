from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProbePlan(_message.Message):
    __slots__ = ("version", "seed", "noise", "squeeze", "views", "occlusion", "shuffle", "return_features", "jitter")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    SQUEEZE_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_FIELD_NUMBER: _ClassVar[int]
    SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    RETURN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    JITTER_FIELD_NUMBER: _ClassVar[int]
    version: int
    seed: int
    noise: NoiseProbe
    squeeze: SqueezeProbe
    views: _containers.RepeatedCompositeFieldContainer[ViewTransform]
    occlusion: OcclusionProbe
    shuffle: ShuffleProbe
    return_features: bool
    jitter: NoiseProbe
    def __init__(self, version: _Optional[int] = ..., seed: _Optional[int] = ..., noise: _Optional[_Union[NoiseProbe, _Mapping]] = ..., squeeze: _Optional[_Union[SqueezeProbe, _Mapping]] = ..., views: _Optional[_Iterable[_Union[ViewTransform, _Mapping]]] = ..., occlusion: _Optional[_Union[OcclusionProbe, _Mapping]] = ..., shuffle: _Optional[_Union[ShuffleProbe, _Mapping]] = ..., return_features: _Optional[bool] = ..., jitter: _Optional[_Union[NoiseProbe, _Mapping]] = ...) -> None: ...

class NoiseProbe(_message.Message):
    __slots__ = ("sigma", "count", "offset")
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    sigma: float
    count: int
    offset: int
    def __init__(self, sigma: _Optional[float] = ..., count: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class SqueezeProbe(_message.Message):
    __slots__ = ("bit_depths", "median_sizes")
    BIT_DEPTHS_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_SIZES_FIELD_NUMBER: _ClassVar[int]
    bit_depths: _containers.RepeatedScalarFieldContainer[int]
    median_sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, bit_depths: _Optional[_Iterable[int]] = ..., median_sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class ViewTransform(_message.Message):
    __slots__ = ("rotate_deg", "shift_x", "shift_y", "scale", "hflip", "vflip")
    ROTATE_DEG_FIELD_NUMBER: _ClassVar[int]
    SHIFT_X_FIELD_NUMBER: _ClassVar[int]
    SHIFT_Y_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    HFLIP_FIELD_NUMBER: _ClassVar[int]
    VFLIP_FIELD_NUMBER: _ClassVar[int]
    rotate_deg: float
    shift_x: float
    shift_y: float
    scale: float
    hflip: bool
    vflip: bool
    def __init__(self, rotate_deg: _Optional[float] = ..., shift_x: _Optional[float] = ..., shift_y: _Optional[float] = ..., scale: _Optional[float] = ..., hflip: _Optional[bool] = ..., vflip: _Optional[bool] = ...) -> None: ...

class OcclusionProbe(_message.Message):
    __slots__ = ("grid", "fill")
    GRID_FIELD_NUMBER: _ClassVar[int]
    FILL_FIELD_NUMBER: _ClassVar[int]
    grid: int
    fill: float
    def __init__(self, grid: _Optional[int] = ..., fill: _Optional[float] = ...) -> None: ...

class ShuffleProbe(_message.Message):
    __slots__ = ("grid", "count")
    GRID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    grid: int
    count: int
    def __init__(self, grid: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ProbeResult(_message.Message):
    __slots__ = ("plan_version", "rows", "classes", "logits", "features", "feature_dim", "device", "runtime", "error", "batch_requests", "worker_seconds")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WORKER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    rows: int
    classes: int
    logits: bytes
    features: bytes
    feature_dim: int
    device: str
    runtime: str
    error: ProbeError
    batch_requests: int
    worker_seconds: float
    def __init__(self, plan_version: _Optional[int] = ..., rows: _Optional[int] = ..., classes: _Optional[int] = ..., logits: _Optional[bytes] = ..., features: _Optional[bytes] = ..., feature_dim: _Optional[int] = ..., device: _Optional[str] = ..., runtime: _Optional[str] = ..., error: _Optional[_Union[ProbeError, _Mapping]] = ..., batch_requests: _Optional[int] = ..., worker_seconds: _Optional[float] = ...) -> None: ...

class ProbeError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ProbeBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ProbeItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ProbeItem, _Mapping]]] = ...) -> None: ...

class ProbeItem(_message.Message):
    __slots__ = ("tensor", "plan")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    plan: ProbePlan
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., plan: _Optional[_Union[ProbePlan, _Mapping]] = ...) -> None: ...

class ProbeBatchResult(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ProbeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ProbeResult, _Mapping]]] = ...) -> None: ...
