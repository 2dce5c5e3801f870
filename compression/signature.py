"""Tensor signatures in Open Inference Protocol terms (datatype names, -1 for dynamic dims)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gearbox.compression.errors import InvalidArgumentError

# OIP v2 datatype name -> numpy dtype. BYTES is not a numeric tensor and is not served here.
OIP_TO_NUMPY: Mapping[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}

NUMPY_TO_OIP: Mapping[np.dtype, str] = {dtype: name for name, dtype in OIP_TO_NUMPY.items()}


def oip_datatype(dtype: np.dtype) -> str:
    """The OIP name of a numpy dtype, or the numpy name where OIP has none."""
    if np.dtype(dtype) == object:
        return "BYTES"  # how OIP's variable-length strings arrive
    return NUMPY_TO_OIP.get(np.dtype(dtype), str(dtype))


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: OIP datatype and shape, -1 marking a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidArgumentError("tensor name must not be empty")
        if self.datatype not in OIP_TO_NUMPY:
            known = ", ".join(OIP_TO_NUMPY)
            raise InvalidArgumentError(
                f"tensor '{self.name}': unknown datatype '{self.datatype}' (known: {known})"
            )
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d < -1 or d == 0 for d in self.shape):
            raise InvalidArgumentError(
                f"tensor '{self.name}': shape {list(self.shape)} may hold only positive sizes or -1"
            )

    @property
    def numpy_dtype(self) -> np.dtype:
        return OIP_TO_NUMPY[self.datatype]

    def accepts(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.shape) and all(
            want == -1 or want == got for want, got in zip(self.shape, shape, strict=True)
        )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(name=data["name"], datatype=data["datatype"], shape=tuple(data["shape"]))


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        if not self.inputs or not self.outputs:
            raise InvalidArgumentError("a signature needs at least one input and one output")
        names = [t.name for t in (*self.inputs, *self.outputs)]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidArgumentError(f"signature repeats tensor names: {', '.join(duplicates)}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def check_inputs(self, inputs: Mapping[str, np.ndarray], where: str) -> int:
        """Raise a clear error unless ``inputs`` match this signature exactly; returns the rows.

        The one validator of tensors against a signature (data splits at registration,
        requests at serving): messages speak OIP datatypes, as clients do.
        """
        missing = [t.name for t in self.inputs if t.name not in inputs]
        if missing:
            given = f" (given: {', '.join(sorted(inputs))})" if inputs else ""
            raise InvalidArgumentError(f"{where}: missing input(s) {', '.join(missing)}{given}")
        extra = sorted(set(inputs) - set(self.input_names))
        if extra:
            raise InvalidArgumentError(
                f"{where}: unexpected input(s) {', '.join(extra)} "
                f"(inputs: {', '.join(self.input_names)})"
            )
        for spec in self.inputs:
            array = inputs[spec.name]
            if array.dtype != spec.numpy_dtype:
                raise InvalidArgumentError(
                    f"{where}: input '{spec.name}' has datatype {oip_datatype(array.dtype)}, "
                    f"the model expects {spec.datatype}"
                )
            if not spec.accepts(array.shape):
                raise InvalidArgumentError(
                    f"{where}: input '{spec.name}' has shape {list(array.shape)}, "
                    f"the model expects {list(spec.shape)} (-1: any size)"
                )
        rows = {inputs[spec.name].shape[0] for spec in self.inputs}
        if len(rows) > 1:
            raise InvalidArgumentError(
                f"{where}: inputs disagree on the batch size: {sorted(rows)}"
            )
        if 0 in rows:
            raise InvalidArgumentError(f"{where}: the batch is empty (first dimension 0)")
        return rows.pop()

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Signature:
        return cls(
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
        )


@dataclass(frozen=True)
class TextInput:
    """A text model's BYTES input: UTF-8 sentences the gateway tokenizes with the model's own
    tokenizer into the graph's token-id inputs (which clients that tokenize may send instead).

    ``max_tokens`` is the longest token sequence the model was trained for: a longer sentence is
    cut to it (the response says how many were), and one beyond ``refuse_factor`` times it is
    refused as a mistake rather than silently reduced to its first few words.
    """

    name: str = "text"
    max_tokens: int = 256
    ids_input: str = "input_ids"
    mask_input: str = "attention_mask"
    refuse_factor: int = 4

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidArgumentError("text input name must not be empty")
        if self.max_tokens < 2 or self.refuse_factor < 1:
            raise InvalidArgumentError(
                f"text input '{self.name}': max_tokens must be at least 2 and refuse_factor at "
                "least 1"
            )

    def check_against(self, signature: Signature) -> None:
        """Raise unless the graph takes this input's token ids and mask as INT64 [-1, -1]."""
        if self.name in signature.input_names:
            raise InvalidArgumentError(
                f"text input '{self.name}' clashes with a graph input of the same name"
            )
        by_name = {t.name: t for t in signature.inputs}
        for name in (self.ids_input, self.mask_input):
            spec = by_name.get(name)
            if spec is None or spec.datatype != "INT64" or spec.shape != (-1, -1):
                raise InvalidArgumentError(
                    f"text input '{self.name}' needs a graph input '{name}' of INT64 [-1, -1]"
                )
        extra = sorted(set(by_name) - {self.ids_input, self.mask_input})
        if extra:
            raise InvalidArgumentError(
                f"text input '{self.name}': the graph takes inputs the tokenizer does not make: "
                f"{', '.join(extra)}"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_tokens": self.max_tokens,
            "ids_input": self.ids_input,
            "mask_input": self.mask_input,
            "refuse_factor": self.refuse_factor,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TextInput:
        return cls(
            name=data["name"],
            max_tokens=int(data["max_tokens"]),
            ids_input=data.get("ids_input", "input_ids"),
            mask_input=data.get("mask_input", "attention_mask"),
            refuse_factor=int(data.get("refuse_factor", 4)),
        )
