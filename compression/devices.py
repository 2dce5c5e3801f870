"""Device classes: where and how a variant runs (ONNX Runtime provider, threads, Ray resources).

Latency is profiled per device class at compression time and predicted per device class when
serving. ``cpu`` always exists; other classes are measured only where their execution provider
is present on the evaluating node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import onnxruntime as ort

from gearbox.compression.errors import InvalidArgumentError


@dataclass(frozen=True)
class DeviceClass:
    name: str
    execution_provider: str = "CPUExecutionProvider"
    intra_op_threads: int = 1
    ray_resources: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.intra_op_threads < 1:
            raise InvalidArgumentError(
                f"device class '{self.name}': intra_op_threads must be at least 1"
            )

    def is_available(self) -> bool:
        return self.execution_provider in ort.get_available_providers()

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # A fixed thread count must mean what it says: no spinning threads stealing the core
        # that another replica or variant is measured on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def create_session(self, model: bytes | str) -> ort.InferenceSession:
        return ort.InferenceSession(
            model, self.session_options(), providers=[self.execution_provider]
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "execution_provider": self.execution_provider,
            "intra_op_threads": self.intra_op_threads,
            "ray_resources": dict(self.ray_resources),
        }


CPU = DeviceClass("cpu")
GPU = DeviceClass("gpu", execution_provider="CUDAExecutionProvider", ray_resources={"GPU": 1})

DEFAULT_DEVICE_CLASSES: tuple[DeviceClass, ...] = (CPU, GPU)
