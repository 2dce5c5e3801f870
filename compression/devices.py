"""Device classes: where and how a variant runs (ONNX Runtime provider, threads, Ray resources).

Latency is profiled per device class at compression time and predicted per device class when
serving. ``cpu`` always exists; other classes are measured only where their execution provider
is present on the evaluating node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
import yaml

from gearbox.compression.errors import InvalidArgumentError

DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
"""ONNX Runtime session optimisers every session runs without. SkipLayerNormFusion would undo,
at session creation, the Add + LayerNormalization that fusion leaves unfused on purpose (see
:func:`gearbox.compression.onnx_export.fuse_transformer`): with it, minilm's twelve
SkipLayerNormalization nodes took 2.7 ms of a 20.5 ms fp32 call (1 thread, 64 tokens) and 2.8
of 11.8 ms in int8; without it, the calls took 18.4 and 9.8 ms, timed in alternating rounds."""


@dataclass(frozen=True)
class DeviceClass:
    name: str
    execution_provider: str = "CPUExecutionProvider"
    intra_op_threads: int = 1
    ray_resources: Mapping[str, float] = field(default_factory=dict)
    workers: int | None = None
    """Worker threads that each run one batch at a time when serving; by default as many as
    the reserved CPUs hold ``intra_op_threads`` (at least one)."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise InvalidArgumentError(
                f"device class name {self.name!r} must be letters, digits, '-' or '_'"
            )
        for resource, amount in self.ray_resources.items():
            if isinstance(amount, bool) or not isinstance(amount, int | float) or amount < 0:
                raise InvalidArgumentError(
                    f"device class '{self.name}': ray resource {resource} must be a "
                    f"non-negative number, got {amount!r}"
                )
        if self.intra_op_threads < 1:
            raise InvalidArgumentError(
                f"device class '{self.name}': intra_op_threads must be at least 1"
            )
        if self.workers is not None:
            if isinstance(self.workers, bool) or not isinstance(self.workers, int):
                raise InvalidArgumentError(
                    f"device class '{self.name}': workers must be an integer"
                )
            if self.workers < 1:
                raise InvalidArgumentError(
                    f"device class '{self.name}': workers must be at least 1"
                )
            cpus = self._reserved_cpu_threads()
            if cpus is not None and self.workers * self.intra_op_threads > cpus:
                raise InvalidArgumentError(
                    f"device class '{self.name}': {self.workers} workers x "
                    f"{self.intra_op_threads} intra-op threads need "
                    f"{self.workers * self.intra_op_threads} CPUs, but it reserves "
                    f"{self.ray_resources['CPU']:g}"
                )

    def _reserved_cpu_threads(self) -> int | None:
        """Threads the reserved CPUs hold (a fraction of a CPU still runs one); None if the
        class reserves no CPU (an accelerator class drives its device from any core)."""
        cpu = self.ray_resources.get("CPU")
        if not cpu:
            return None
        return max(1, math.ceil(cpu - 1e-9))

    @property
    def worker_threads(self) -> int:
        """Batches this class runs at once in one replica (see ``workers``)."""
        if self.workers is not None:
            return self.workers
        cpus = self._reserved_cpu_threads()
        return max(1, (cpus or 1) // self.intra_op_threads)

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

    def create_session(
        self, model: bytes | str, save_optimized_to: Path | None = None
    ) -> ort.InferenceSession:
        """A session of this class for ``model``; ``save_optimized_to`` also writes the graph
        as the session optimised it, to see what runs."""
        options = self.session_options()
        if save_optimized_to is not None:
            options.optimized_model_filepath = str(save_optimized_to)
        return ort.InferenceSession(
            model,
            options,
            providers=[self.execution_provider],
            disabled_optimizers=list(DISABLED_OPTIMIZERS),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "execution_provider": self.execution_provider,
            "intra_op_threads": self.intra_op_threads,
            "ray_resources": dict(self.ray_resources),
            **({"workers": self.workers} if self.workers is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceClass:
        if not isinstance(data, Mapping) or "name" not in data:
            raise InvalidArgumentError(f"a device class needs at least a name, got {data!r}")
        unknown = sorted(set(data) - _DEVICE_CLASS_KEYS)
        if unknown:
            raise InvalidArgumentError(
                f"device class '{data['name']}': unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(_DEVICE_CLASS_KEYS))})"
            )
        threads = data.get("intra_op_threads", 1)
        if isinstance(threads, bool) or not isinstance(threads, int):
            raise InvalidArgumentError(
                f"device class '{data['name']}': intra_op_threads must be an integer"
            )
        resources = data.get("ray_resources", {})
        if not isinstance(resources, Mapping):
            raise InvalidArgumentError(
                f"device class '{data['name']}': ray_resources must be a mapping"
            )
        return cls(
            name=str(data["name"]),
            execution_provider=str(data.get("execution_provider", "CPUExecutionProvider")),
            intra_op_threads=threads,
            ray_resources=dict(resources),
            workers=data.get("workers"),
        )


_DEVICE_CLASS_KEYS = {"name", "execution_provider", "intra_op_threads", "ray_resources", "workers"}


# One intra-op thread on one reserved core: the figures the manifests record.
CPU = DeviceClass("cpu", ray_resources={"CPU": 1})
GPU = DeviceClass("gpu", execution_provider="CUDAExecutionProvider", ray_resources={"GPU": 1})

DEFAULT_DEVICE_CLASSES: tuple[DeviceClass, ...] = (CPU, GPU)


def load_device_classes(path: str | Path) -> tuple[DeviceClass, ...]:
    """Device classes from a YAML file (``device_classes: [{name, execution_provider, ...}]``).

    ``cpu`` always exists: a file that does not define it gets the built-in one first.
    """
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InvalidArgumentError(f"device class file {path} does not exist") from None
    except (OSError, yaml.YAMLError) as error:
        raise InvalidArgumentError(f"device class file {path} cannot be read: {error}") from None
    entries = document.get("device_classes") if isinstance(document, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise InvalidArgumentError(
            f"device class file {path} must hold a non-empty list under 'device_classes'"
        )
    classes = [DeviceClass.from_json(entry) for entry in entries]
    names = [device.name for device in classes]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidArgumentError(
            f"device class file {path} defines {', '.join(repeated)} more than once"
        )
    if "cpu" not in names:
        classes.insert(0, CPU)
    return tuple(classes)
