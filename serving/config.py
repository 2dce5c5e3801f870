"""How a Gearbox gateway is configured: repository, device classes, batching, replicas."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from gearbox.compression.devices import CPU, DeviceClass, load_device_classes
from gearbox.compression.errors import InvalidArgumentError
from gearbox.serving.experiments import Experiment
from gearbox.serving.inference import DEFAULT_LIMITS, TensorLimits
from gearbox.serving.metrics import metrics_directory
from gearbox.serving.tls import TlsFiles

HTTP_PORT = 8000
GRPC_PORT = 9000
METRICS_PORT = 8080
MAX_NICENESS = 19
"""The lowest priority Linux gives a thread: how far below the replica workers may run."""
APP_NAME = "gearbox"
MIN_TOKEN_LENGTH = 16
"""A shorter admin token is refused: it could be guessed."""
ADMIN_TOKEN_VARIABLE = "GEARBOX_ADMIN_TOKEN"
"""Where ``gearbox serve`` and a Serve config's application read the admin token from."""
ANSWER_TIMEOUT_S = 30.0
"""The default bound on a caller's wait for a worker (:attr:`BatchingConfig.answer_timeout_s`)."""
REMOTE_ANSWER_TIMEOUT_S = 45.0
"""The default bound on a call to another device class (``remote_answer_timeout_s``)."""


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching per variant x device class, and the queue bound behind backpressure."""

    max_batch_size: int = 8
    """The most rows run together in one ONNX Runtime call (a batch holds fewer where that
    answers its waiting requests sooner: :func:`~gearbox.serving.queue_model.batch_limit`)."""
    max_wait_ms: float = 0.0
    """How long a batch may wait for more requests once the first has arrived. Zero batches
    only what queued while the previous batch ran, so an idle gateway adds no delay."""
    max_queue: int = 64
    """Requests admitted per variant x device class (running or waiting); beyond it callers get
    429 / RESOURCE_EXHAUSTED instead of an ever longer queue."""
    inline_max_ms: float = 1.0
    """A batch predicted to run at most this long (or less than the measured worker hop) runs
    on the event loop when nothing is queued, instead of on a worker: a health probe or another
    request then waits at most this long, while the hop to a worker and back cost a request
    0.3-1 ms on the development VM (a 0.34 ms `digits` variant answered in 0.76 ms inline
    against 1.43 ms on a worker, in-process). Zero leaves only the hop rule."""
    priority_lane: bool = True
    """Whether each hosted device class has a priority lane: one more worker that runs the
    fastest variant for requests whose budget the standard workers cannot meet just then
    (see :mod:`gearbox.serving.executor`)."""
    standard_niceness: int = 10
    """How many steps below the replica's own priority the standard workers run, so that the
    priority worker, the event loop and the ingress take a core from them whenever they need
    one (0 keeps them level; 10 leaves them about a tenth of a contended core on Linux)."""
    answer_timeout_s: float = ANSWER_TIMEOUT_S
    """How long a caller waits for a worker to answer its request before it gets 503 /
    UNAVAILABLE and its place in the queue is freed: a session that hangs (a stuck driver,
    say) then costs each caller this long, never forever. Far above any queue a healthy
    variant builds (``max_queue`` batches of a slow transformer take a few seconds)."""

    def __post_init__(self) -> None:
        if self.answer_timeout_s <= 0:
            raise InvalidArgumentError("answer_timeout_s must be positive")
        if self.max_batch_size < 1:
            raise InvalidArgumentError("max_batch_size must be at least 1")
        if self.max_wait_ms < 0:
            raise InvalidArgumentError("max_wait_ms must not be negative")
        if self.max_queue < 1:
            raise InvalidArgumentError("max_queue must be at least 1")
        if self.inline_max_ms < 0:
            raise InvalidArgumentError("inline_max_ms must not be negative")
        if not 0 <= self.standard_niceness <= MAX_NICENESS:
            raise InvalidArgumentError(f"standard_niceness must lie in [0, {MAX_NICENESS}]")


@dataclass(frozen=True)
class GatewayConfig:
    repository: str
    device_classes: tuple[DeviceClass, ...] = (CPU,)
    """The first class is hosted inside the gateway replicas themselves (the common path, no
    second hop); every other class gets replicas of its own, reached through a handle."""
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    replicas: int = 1
    shadow_fraction: float = 0.05
    """Share of requests served by a non-reference variant that are also run, off the response
    path, on the reference variant to measure live agreement."""
    max_ongoing_requests: int = 256
    max_request_bytes: int = 64 * 1024 * 1024
    """The largest HTTP request body a replica reads; a larger one is refused with 413 before
    it is read (by its Content-Length, or as soon as a streamed body passes the limit)."""
    max_request_rows: int = DEFAULT_LIMITS.max_rows
    """The most rows (a tensor's first dimension) one inference request may carry; more is
    refused with 400 / INVALID_ARGUMENT before any tensor is built."""
    max_tensor_elements: int = DEFAULT_LIMITS.max_elements
    """The most elements one tensor of a request may hold; more is refused with 413 /
    RESOURCE_EXHAUSTED before any tensor is built."""
    access_log: bool = False
    """Ray Serve's access log: a line per request in each replica's log. Off by default: it
    is written on the response path and cost 0.05-0.1 ms per request on the development
    machine (docs/BENCHMARKS.md); the metrics count every request either way."""

    prediction_quantile: float = 0.95
    """A budget is met by the best variant whose typical prediction plus this quantile of its
    recent prediction errors fits: 0.5 would aim at the typical answer and miss half the time."""
    transport_allowance_ms: float = 0.0
    """Time each caller's budget also spends outside the gateway's clock (the ingress in front,
    the network, the client's own stack), left free when a variant is chosen. The budget's
    clock itself does not change: ``latency_ms`` and ``budget_met`` stay the gateway's span."""
    remote_answer_timeout_s: float = REMOTE_ANSWER_TIMEOUT_S
    """How long the gateway waits for another device class's replicas to answer a request
    before it gets 503 / UNAVAILABLE (the call is cancelled there). Longer than
    ``batching.answer_timeout_s``, so that a stuck session there is reported by its own
    replica, which names the variant."""

    metrics_port: int | None = METRICS_PORT
    """Where each machine's replicas serve their metrics (``/metrics``); None: not served,
    figures only written to :attr:`metrics_directory` (in-process use, tests)."""
    metrics_host: str = "127.0.0.1"
    experiments: tuple[Experiment, ...] = ()
    """A/B experiments running from the start (more are created through the admin API)."""
    tls: TlsFiles | None = None
    """The certificate and key the HTTP and gRPC ports serve TLS with, from Gearbox's own TLS
    terminator in front of the ingress (None: plaintext; see ``tls_terminator``)."""
    admin_token: str | None = field(default=None, repr=False)
    """The bearer token every admin call must carry; None turns the admin API off."""
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    """Names this deployment of the gateway: its replicas share metrics under it, and a new
    deployment starts its counters from zero rather than adding to an old one's."""

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise InvalidArgumentError("metrics_port must lie in [1, 65535]")
        if not 0 < self.prediction_quantile < 1:
            raise InvalidArgumentError("prediction_quantile must lie in (0, 1)")
        if self.transport_allowance_ms < 0:
            raise InvalidArgumentError("transport_allowance_ms must not be negative")
        if self.remote_answer_timeout_s <= 0:
            raise InvalidArgumentError("remote_answer_timeout_s must be positive")
        if not self.device_classes:
            raise InvalidArgumentError("at least one device class is needed")
        if self.replicas < 1:
            raise InvalidArgumentError("replicas must be at least 1")
        if self.max_request_bytes < 1:
            raise InvalidArgumentError("max_request_bytes must be at least 1")
        if self.max_request_rows < 1:
            raise InvalidArgumentError("max_request_rows must be at least 1")
        if self.max_tensor_elements < 1:
            raise InvalidArgumentError("max_tensor_elements must be at least 1")
        if not 0.0 <= self.shadow_fraction <= 1.0:
            raise InvalidArgumentError("shadow_fraction must lie in [0, 1]")
        if self.admin_token is not None and len(self.admin_token) < MIN_TOKEN_LENGTH:
            raise InvalidArgumentError(
                f"the admin token must be at least {MIN_TOKEN_LENGTH} characters long"
            )
        names = [experiment.name for experiment in self.experiments]
        if len(names) != len(set(names)):
            raise InvalidArgumentError(f"experiment names repeat: {', '.join(names)}")

    @property
    def metrics_directory(self) -> Path:
        return metrics_directory(self.instance)

    @property
    def tensor_limits(self) -> TensorLimits:
        return TensorLimits(self.max_request_rows, self.max_tensor_elements)

    @property
    def gateway_device_class(self) -> DeviceClass:
        return self.device_classes[0]

    @classmethod
    def create(
        cls,
        repository: str | Path,
        device_classes_file: str | Path | None = None,
        **options: object,
    ) -> GatewayConfig:
        classes = load_device_classes(device_classes_file) if device_classes_file else (CPU,)
        # The gateway hosts cpu itself: it is the class every deployment has.
        ordered = tuple(sorted(classes, key=lambda device: device.name != "cpu"))
        return cls(repository=str(Path(repository).resolve()), device_classes=ordered, **options)
