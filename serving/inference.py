"""Protocol-neutral inference values: what the HTTP and gRPC adapters convert to and from.

The data plane (:mod:`gearbox.serving.dataplane`) speaks only these types; each adapter turns its
wire format into them and back, so both protocols share one validated code path.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gearbox.compression.errors import InvalidArgumentError, PayloadTooLargeError
from gearbox.compression.signature import NUMPY_TO_OIP, OIP_TO_NUMPY

ParameterValue = bool | int | float | str
Protocol = Literal["http", "grpc"]

BYTES = "BYTES"
"""OIP's variable-length datatype (text): numpy object arrays of ``bytes`` or ``str`` here."""
_LENGTH_PREFIX = struct.Struct("<I")
MAX_DIMENSIONS = 32
"""The most dimensions a request's tensor may have (numpy itself stops at 64)."""
_NUMERIC_KINDS = frozenset("biuf")
"""numpy's kinds of booleans, integers and floats: what numeric data may hold."""


@dataclass(frozen=True)
class TensorLimits:
    """How large a request's tensors may be: checked from each tensor's declared shape as it is
    decoded, before any array is built (the gateway's configuration sets them)."""

    max_rows: int = 4096
    """The most rows (first dimension) a request's tensor may have. The executor runs a large
    request in batches, but all of them ahead of the requests that arrive after it."""
    max_elements: int = 16 * 1024 * 1024
    """The most elements one tensor may hold (64 MiB of FP32, the default body limit)."""

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise InvalidArgumentError("max_rows must be at least 1")
        if self.max_elements < 1:
            raise InvalidArgumentError("max_elements must be at least 1")


DEFAULT_LIMITS = TensorLimits()


@dataclass(frozen=True)
class Tensor:
    """A named tensor: OIP datatype plus a numpy array already in the request's shape."""

    name: str
    data: np.ndarray

    @property
    def datatype(self) -> str:
        return datatype_of(self.data)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.data.shape)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool = False
    """HTTP binary-data extension: return this output as raw bytes after the JSON header."""


@dataclass(frozen=True)
class InferRequest:
    model: str
    inputs: tuple[Tensor, ...]
    version: str = ""
    """``model_version``: the variant to pin; empty lets the router choose."""
    id: str = ""
    outputs: tuple[RequestedOutput, ...] = ()
    """Empty: every output of the signature."""
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)
    protocol: Protocol = "http"
    all_outputs_binary: bool = False
    """HTTP binary-data extension: every output as raw bytes when ``outputs`` is empty."""


@dataclass(frozen=True)
class InferResponse:
    model: str
    version: str
    id: str
    outputs: tuple[Tensor, ...]
    parameters: Mapping[str, ParameterValue]
    binary_outputs: frozenset[str] = frozenset()
    all_outputs_binary: bool = False
    answer: Any = None
    """The data plane's record of how it answered (its ``Answer``): the adapter hands the
    response back to ``DataPlane.answered`` once the outputs are encoded."""


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True)
class ConfigTensor:
    """One input or output of Triton's model configuration."""

    name: str
    data_type: str
    """Triton's name of the datatype: ``TYPE_FP32``, ``TYPE_STRING`` (OIP's BYTES), ..."""
    dims: tuple[int, ...]
    optional: bool = False
    """An input a request may leave out (a text model takes sentences or token ids)."""


@dataclass(frozen=True)
class ModelConfig:
    """Triton's model configuration, reduced to the fields Gearbox can fill truthfully."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    inputs: tuple[ConfigTensor, ...]
    outputs: tuple[ConfigTensor, ...]
    parameters: Mapping[str, str] = field(default_factory=dict)
    """Triton's parameters are strings only."""


@dataclass(frozen=True)
class RepositoryEntry:
    """One row of Triton's repository index: a model version (a Gearbox variant)."""

    name: str
    version: str
    state: str
    reason: str = ""


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == object:
        return BYTES
    try:
        return NUMPY_TO_OIP[array.dtype]
    except KeyError:
        raise InvalidArgumentError(f"numpy dtype {array.dtype} has no OIP datatype") from None


def numpy_dtype(name: str, datatype: str) -> np.dtype:
    try:
        return OIP_TO_NUMPY[datatype]
    except (KeyError, TypeError):  # TypeError: a datatype that is no string (a JSON list)
        known = ", ".join([*OIP_TO_NUMPY, BYTES])
        raise InvalidArgumentError(
            f"input '{name}': unknown or unsupported datatype '{datatype}' (supported: {known})"
        ) from None


def checked_shape(
    name: str, shape: object, limits: TensorLimits = DEFAULT_LIMITS
) -> tuple[int, ...]:
    """``shape`` as integers, refused unless every array of it could be built within
    ``limits``: too many rows is 400, too many elements 413."""
    if not isinstance(shape, Sequence) or isinstance(shape, str | bytes):
        raise InvalidArgumentError(f"input '{name}': shape must be a list of integers")
    dims = []
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 0:
            raise InvalidArgumentError(
                f"input '{name}': shape {list(shape)} must hold non-negative integers"
            )
        dims.append(int(dim))
    if len(dims) > MAX_DIMENSIONS:
        raise InvalidArgumentError(
            f"input '{name}': shape has {len(dims)} dimensions, at most {MAX_DIMENSIONS} are read"
        )
    if dims and dims[0] > limits.max_rows:
        raise InvalidArgumentError(
            f"input '{name}': {dims[0]} rows (the shape's first dimension) exceed the gateway's "
            f"limit of {limits.max_rows} rows per request"
        )
    # Zero dimensions left out: [0, 10**30] holds no element, yet numpy can build no array of
    # that shape either (and the count is in Python integers, which never overflow).
    if math.prod(dim for dim in dims if dim) > limits.max_elements:
        raise PayloadTooLargeError(
            f"input '{name}': shape {dims} exceeds the gateway's limit of "
            f"{limits.max_elements} elements per tensor"
        )
    return tuple(dims)


def _element_count(shape: tuple[int, ...]) -> int:
    # Python integers: a hostile shape must fail the size check, not overflow int64 (to an
    # OverflowError, or to a wrapped count that an empty payload matches).
    return math.prod(shape)


def tensor_from_values(
    name: str,
    datatype: str,
    shape: object,
    values: object,
    limits: TensorLimits = DEFAULT_LIMITS,
) -> Tensor:
    """A tensor from JSON ``data`` or gRPC typed contents: flat or nested, row-major."""
    if datatype == BYTES:
        return _bytes_from_values(name, checked_shape(name, shape, limits), values)
    dtype = numpy_dtype(name, datatype)
    dims = checked_shape(name, shape, limits)
    if not isinstance(values, list | tuple):
        raise InvalidArgumentError(f"input '{name}': data must be a list of numbers")
    try:
        # The kind numpy reads first: told the datatype, it would take "1.5" or "NaN" strings
        # for numbers.
        array = np.asarray(values)
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"numpy reads the data as {array.dtype}")
        if dtype.kind == "f" or _holds_every_value(dtype, array):
            array = array.astype(dtype, copy=False)
        else:  # converted again from the values: numpy refuses the one out of range
            array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgumentError(
            f"input '{name}': data must be {datatype} numbers in a (possibly nested) list of "
            "equal-length lists"
        ) from None
    expected = _element_count(dims)
    if array.size != expected:
        raise InvalidArgumentError(
            f"input '{name}': shape {list(dims)} needs {expected} elements, data has {array.size}"
        )
    return Tensor(name, array.reshape(dims))


def _holds_every_value(dtype: np.dtype, array: np.ndarray) -> bool:
    """Whether casting ``array`` (integers or booleans) to the integer or boolean ``dtype``
    changes no value; floats are left to numpy's own conversion, which refuses NaN."""
    if array.dtype.kind not in "biu":
        return False
    if dtype.kind == "b" or array.size == 0:
        return True
    bounds = np.iinfo(dtype)
    return bool(array.min() >= bounds.min and array.max() <= bounds.max)


def tensor_from_bytes(
    name: str, datatype: str, shape: object, raw: bytes, limits: TensorLimits = DEFAULT_LIMITS
) -> Tensor:
    """A tensor from raw little-endian bytes (gRPC ``raw_input_contents``, HTTP binary data)."""
    if datatype == BYTES:
        return _bytes_from_raw(name, checked_shape(name, shape, limits), raw)
    dtype = numpy_dtype(name, datatype)
    dims = checked_shape(name, shape, limits)
    expected = _element_count(dims) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgumentError(
            f"input '{name}': shape {list(dims)} of {datatype} needs {expected} bytes, "
            f"got {len(raw)}"
        )
    array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    return Tensor(name, array.reshape(dims))


def _bytes_from_values(name: str, dims: tuple[int, ...], values: object) -> Tensor:
    """BYTES elements from JSON strings or gRPC ``bytes_contents``, flat or nested."""
    if not isinstance(values, list | tuple):
        raise InvalidArgumentError(f"input '{name}': BYTES data must be a list of strings")
    flat: list[object] = []
    pending: list[object] = [values]
    while pending:  # iterative: a deeply nested body must not exhaust the stack
        item = pending.pop()
        if isinstance(item, list | tuple):
            pending.extend(reversed(item))
        elif isinstance(item, str | bytes):
            flat.append(item)
        else:
            raise InvalidArgumentError(
                f"input '{name}': BYTES element {len(flat)} is a {type(item).__name__}, "
                "not a string"
            )
    expected = _element_count(dims)
    if len(flat) != expected:
        raise InvalidArgumentError(
            f"input '{name}': shape {list(dims)} needs {expected} elements, data has {len(flat)}"
        )
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
    return Tensor(name, array.reshape(dims))


def _bytes_from_raw(name: str, dims: tuple[int, ...], raw: bytes) -> Tensor:
    """BYTES elements serialised as Triton does: each a 4-byte little-endian length, then it."""
    expected = _element_count(dims)
    elements: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw) and len(elements) < expected:
        if offset + _LENGTH_PREFIX.size > len(raw):
            break
        (length,) = _LENGTH_PREFIX.unpack_from(raw, offset)
        offset += _LENGTH_PREFIX.size
        if offset + length > len(raw):
            raise InvalidArgumentError(
                f"input '{name}': BYTES element {len(elements)} claims {length} bytes, only "
                f"{len(raw) - offset} remain"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if len(elements) != expected or offset != len(raw):
        raise InvalidArgumentError(
            f"input '{name}': shape {list(dims)} needs {expected} length-prefixed BYTES "
            f"elements; the {len(raw)} bytes hold {len(elements)}"
            + ("" if offset == len(raw) else f" and {len(raw) - offset} bytes more")
        )
    array = np.empty(expected, dtype=object)
    array[:] = elements
    return Tensor(name, array.reshape(dims))


def tensor_to_bytes(tensor: Tensor) -> bytes:
    if tensor.data.dtype == object:
        return b"".join(
            _LENGTH_PREFIX.pack(len(element)) + element
            for element in (
                e.encode("utf-8") if isinstance(e, str) else bytes(e) for e in tensor.data.flat
            )
        )
    return np.ascontiguousarray(tensor.data, dtype=tensor.data.dtype.newbyteorder("<")).tobytes()
