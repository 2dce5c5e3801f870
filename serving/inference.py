"""Protocol-neutral inference values: what the HTTP and gRPC adapters convert to and from.

The data plane (:mod:`gearbox.serving.dataplane`) speaks only these types; each adapter turns its
wire format into them and back, so both protocols share one validated code path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.signature import NUMPY_TO_OIP, OIP_TO_NUMPY

ParameterValue = bool | int | float | str
Protocol = Literal["http", "grpc"]


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


def datatype_of(array: np.ndarray) -> str:
    try:
        return NUMPY_TO_OIP[array.dtype]
    except KeyError:
        raise InvalidArgumentError(f"numpy dtype {array.dtype} has no OIP datatype") from None


def numpy_dtype(name: str, datatype: str) -> np.dtype:
    try:
        return OIP_TO_NUMPY[datatype]
    except KeyError:
        known = ", ".join(OIP_TO_NUMPY)
        raise InvalidArgumentError(
            f"input '{name}': unknown or unsupported datatype '{datatype}' (supported: {known})"
        ) from None


def checked_shape(name: str, shape: object) -> tuple[int, ...]:
    if not isinstance(shape, Sequence) or isinstance(shape, str | bytes):
        raise InvalidArgumentError(f"input '{name}': shape must be a list of integers")
    dims = []
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 0:
            raise InvalidArgumentError(
                f"input '{name}': shape {list(shape)} must hold non-negative integers"
            )
        dims.append(int(dim))
    return tuple(dims)


def _element_count(shape: tuple[int, ...]) -> int:
    # Python integers: a hostile shape must fail the size check, not overflow int64 (to an
    # OverflowError, or to a wrapped count that an empty payload matches).
    return math.prod(shape)


def tensor_from_values(name: str, datatype: str, shape: object, values: object) -> Tensor:
    """A tensor from JSON ``data`` or gRPC typed contents: flat or nested, row-major."""
    dtype = numpy_dtype(name, datatype)
    dims = checked_shape(name, shape)
    if isinstance(values, str | bytes) or values is None:
        raise InvalidArgumentError(f"input '{name}': data must be a list of numbers")
    try:
        array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgumentError(
            f"input '{name}': data must be {datatype} numbers in a (possibly nested) list"
        ) from None
    expected = _element_count(dims)
    if array.size != expected:
        raise InvalidArgumentError(
            f"input '{name}': shape {list(dims)} needs {expected} elements, data has {array.size}"
        )
    return Tensor(name, array.reshape(dims))


def tensor_from_bytes(name: str, datatype: str, shape: object, raw: bytes) -> Tensor:
    """A tensor from raw little-endian bytes (gRPC ``raw_input_contents``, HTTP binary data)."""
    dtype = numpy_dtype(name, datatype)
    dims = checked_shape(name, shape)
    expected = _element_count(dims) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgumentError(
            f"input '{name}': shape {list(dims)} of {datatype} needs {expected} bytes, "
            f"got {len(raw)}"
        )
    array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    return Tensor(name, array.reshape(dims))


def tensor_to_bytes(tensor: Tensor) -> bytes:
    return np.ascontiguousarray(tensor.data, dtype=tensor.data.dtype.newbyteorder("<")).tobytes()
