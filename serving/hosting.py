"""Variant hosting: ONNX Runtime sessions of the ready variants, one set per device class.

A :class:`LocalBackend` holds the sessions in this process (the gateway replica hosts its own
device class this way, so the common path has no second hop). A :class:`RemoteBackend` reaches
the replicas of another device class (a GPU pool, say) through a Ray Serve handle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from gearbox.compression.devices import DeviceClass
from gearbox.compression.errors import GearboxError, NotFoundError, UnavailableError
from gearbox.compression.repository import ModelRepository, VariantManifest
from gearbox.serving.batching import BatchResult, DynamicBatcher
from gearbox.serving.config import BatchingConfig

Arrays = Mapping[str, np.ndarray]


class Backend(Protocol):
    """Runs variants of one device class."""

    device_class: str

    async def infer(self, model: str, variant: str, inputs: Arrays) -> BatchResult: ...

    def depth(self) -> int:
        """Requests admitted on this device class and not yet answered."""
        ...


@dataclass(frozen=True)
class _SessionRunner:
    session: ort.InferenceSession
    output_names: tuple[str, ...]

    def __call__(self, inputs: Arrays) -> dict[str, np.ndarray]:
        results = self.session.run(list(self.output_names), dict(inputs))
        return dict(zip(self.output_names, results, strict=True))


def load_session(
    repository: ModelRepository, manifest: VariantManifest, device: DeviceClass
) -> ort.InferenceSession:
    """The variant's artifact, verified against its sha256, in a session for ``device``."""
    if not manifest.is_ready:
        raise UnavailableError(
            f"variant '{manifest.variant}' of model '{manifest.model}' is rejected "
            f"({manifest.reason}) and is never loaded"
        )
    if not device.is_available():
        raise UnavailableError(
            f"device class '{device.name}' needs {device.execution_provider}, which this "
            f"ONNX Runtime lacks (has: {', '.join(ort.get_available_providers())})"
        )
    return device.create_session(repository.read_artifact(manifest))


class ReplicaLoad:
    """Requests inside this replica, counted from the moment its adapter first sees them."""

    def __init__(self) -> None:
        self.active = 0

    def idle(self) -> bool:
        """True when the request asking is the only one in flight."""
        return self.active <= 1

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class LocalBackend:
    """Every ready variant of the given models, in sessions on this process's device class."""

    def __init__(
        self,
        repository: ModelRepository,
        manifests: Sequence[VariantManifest],
        device: DeviceClass,
        batching: BatchingConfig,
        on_batch: Callable[[str, str, int], None] | None = None,
        load: ReplicaLoad | None = None,
    ) -> None:
        self.device_class = device.name
        self._batchers: dict[tuple[str, str], DynamicBatcher] = {}
        for manifest in manifests:
            session = load_session(repository, manifest, device)
            runner = _SessionRunner(session, tuple(o.name for o in session.get_outputs()))
            key = (manifest.model, manifest.variant)
            self._batchers[key] = DynamicBatcher(
                f"{manifest.model}/{manifest.variant} on {device.name}",
                runner,
                batching,
                on_batch=_bind(on_batch, manifest.model, manifest.variant),
                replica_idle=load.idle if load is not None else None,
            )

    @property
    def hosted(self) -> list[tuple[str, str]]:
        return sorted(self._batchers)

    async def infer(self, model: str, variant: str, inputs: Arrays) -> BatchResult:
        batcher = self._batchers.get((model, variant))
        if batcher is None:
            raise NotFoundError(
                f"variant '{variant}' of model '{model}' is not hosted on {self.device_class}"
            )
        return await batcher.submit(inputs)

    def depth(self) -> int:
        return sum(batcher.depth for batcher in self._batchers.values())


def _bind(
    on_batch: Callable[[str, str, int], None] | None, model: str, variant: str
) -> Callable[[int], None] | None:
    if on_batch is None:
        return None
    return lambda rows: on_batch(model, variant, rows)


class RemoteBackend:
    """A device class served by replicas of its own, reached through a Ray Serve handle."""

    def __init__(self, device_class: str, handle: Any) -> None:
        self.device_class = device_class
        self._handle = handle
        self._inflight = 0

    async def infer(self, model: str, variant: str, inputs: Arrays) -> BatchResult:
        self._inflight += 1
        try:
            return await self._handle.infer.remote(model, variant, dict(inputs))
        except GearboxError:
            raise
        except Exception as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, GearboxError):
                raise type(cause)(cause.message) from None
            raise UnavailableError(
                f"device class '{self.device_class}' failed to answer: {type(error).__name__}"
            ) from error
        finally:
            self._inflight -= 1

    def depth(self) -> int:
        return self._inflight
