"""Which ingress sits in front of the gateway, and the Ray environment that selects it.

``haproxy`` (the default): Ray Serve's HAProxy ingress over direct ingress. HAProxy listens on
the HTTP and gRPC ports and forwards each request straight to a gateway replica's own HTTP or
gRPC server: one hop, about a third of the classic proxy's cost. ``proxy``: Ray Serve's classic
Python proxies, which reach the replica through a second Ray hop.

Ray reads these settings from the environment of every Ray process (controller, proxies,
replicas), so they must be in place before the cluster starts: ``gearbox serve`` and
``gearbox demo`` set them for the local Ray they start; a cluster started with ``ray start``
or KubeRay gets them from :func:`ray_environment` through its own environment (see
``deploy/``). Values already set in the environment win, so an operator can override any.
"""

from __future__ import annotations

import contextlib
import enum
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from gearbox.compression.errors import InvalidArgumentError, UnavailableError
from gearbox.serving.haproxy_launcher import LAUNCHER, RAY_BINARY_ENV
from gearbox.serving.processes import process_running

INGRESS_SWITCH = "RAY_SERVE_ENABLE_HA_PROXY"
"""The Ray variable that selects the HAProxy ingress ("1") or the classic proxy."""

INGRESS_ENV = "GEARBOX_INGRESS"
"""Chooses the ingress when the command line does not: ``haproxy`` or ``proxy``."""

DRAIN_PERIOD_S = 2.0
"""How long a stopping gateway replica keeps accepting requests so HAProxy can take it out of
rotation (Ray's default is 30 s, made for cloud load balancers; HAProxy here learns of the stop
from Serve directly and retries a refused connection on another replica)."""


HAPROXY_PORT_RANGE = range(20000, 22500)
"""Where HAProxy's exporter and stats ports are picked: above Ray's worker ports (10002-19999),
below Serve's direct-ingress ports (30000 up) and the kernel's ephemeral range (32768 up on
Linux), where Ray's processes bind ports of their own while the cluster starts, after the
pick and before HAProxy binds."""

TLS_UPSTREAM_PORT_RANGE = range(22500, 25000)
"""Where Serve's plaintext HTTP and gRPC ingress ports are picked when Gearbox's TLS terminator
holds the user's ports (:mod:`gearbox.serving.tls_terminator`): clear of the ranges above, and
of the HAProxy pages, which a starting Serve binds after the pick."""


HAPROXY_BUFFER_BYTES = 64 * 1024
"""HAProxy's buffer: the largest request it can retry on another replica."""


def haproxy_launcher() -> Path | None:
    """Where ``gearbox-haproxy`` is installed (beside this Python, else on PATH), if it is."""
    beside = Path(sys.executable).with_name(LAUNCHER)
    if beside.is_file():
        return beside
    found = shutil.which(LAUNCHER)
    return Path(found) if found else None


class Ingress(enum.StrEnum):
    HAPROXY = "haproxy"
    PROXY = "proxy"

    @classmethod
    def parse(cls, value: str | None) -> Ingress:
        text = value or os.environ.get(INGRESS_ENV) or cls.HAPROXY.value
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise InvalidArgumentError(
                f"unknown ingress {text!r} (choose {', '.join(i.value for i in cls)})"
            ) from None


WORKER_NICENESS = "RAY_worker_niceness"
RETRY_ON = "conn-failure empty-response junk-response"
"""HAProxy's ``retry-on``: what a request is sent to another replica after."""


def ray_environment(ingress: Ingress, state_dir: str | Path | None = None) -> dict[str, str]:
    """The environment variables Ray needs for ``ingress``.

    ``state_dir`` gives HAProxy's socket, configuration and state files a directory of their
    own, and its exporter and stats pages free ports, so that two clusters on one machine
    (a test cluster beside a demo, say) do not share Ray's fixed defaults.
    """
    env = {
        # ONNX Runtime runs on the gateway's worker threads, never on the event loop, so the
        # user code can share the server's loop: this saves a thread hop on every request.
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        # Ray starts its workers at nice 15, below everything else on the machine; a gateway
        # replica (and the HAProxy it spawns) then loses the CPU to any busy neighbour, the
        # caller's own client included, while requests wait.
        WORKER_NICENESS: "0",
    }
    if ingress is Ingress.PROXY:
        env[INGRESS_SWITCH] = "0"
        return env
    env.update(
        {
            INGRESS_SWITCH: "1",
            "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "gearbox.serving.clock:http_middlewares",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{DRAIN_PERIOD_S:g}",
            # HAProxy otherwise logs a line per request to a socket that a Python actor reads
            # and parses into Ray's own request metrics: 0.1 of a core at 700 requests/s on
            # the 2-core VM, for figures Gearbox's metrics already give.
            "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
            # One HAProxy thread forwards far more requests than a node's Python replicas
            # answer; Ray's default of four contends with them for the cores of a small node.
            "RAY_SERVE_HAPROXY_NBTHREAD": "1",
            # Inference is idempotent: a request whose replica died before answering (the
            # connection closed with no answer, or half of one) goes to another replica
            # rather than being lost. Ray retries only failed connections by default.
            "RAY_SERVE_HAPROXY_RETRY_ON": RETRY_ON,
            # HAProxy can only send a request again if it holds all of it: Gearbox's launcher
            # makes it wait for the whole body first (see gearbox.serving.haproxy_launcher),
            # and a 64 KiB buffer holds a batch of dozens of rows (Ray's default, 16 KiB, few).
            "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(HAPROXY_BUFFER_BYTES),
        }
    )
    launcher = haproxy_launcher()
    if launcher is not None:
        env[RAY_BINARY_ENV] = str(launcher)
    if state_dir is not None:
        state = Path(state_dir)
        state.mkdir(parents=True, exist_ok=True)
        metrics_port = free_port(HAPROXY_PORT_RANGE)
        env.update(
            {
                "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state / "haproxy.cfg"),
                "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state / "admin.sock"),
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state / "server-state"),
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(state / "metrics.sock"),
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
                "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port(HAPROXY_PORT_RANGE, metrics_port)),
            }
        )
    return env


def ingress_in_effect() -> Ingress:
    """The ingress this process's environment selects for a Ray it starts."""
    enabled = os.environ.get(INGRESS_SWITCH, "0") == "1"
    return Ingress.HAPROXY if enabled else Ingress.PROXY


def session_state_dir() -> Path:
    """A fresh directory for one local cluster's HAProxy files (short: HAProxy limits socket
    paths to 97 bytes, and Ray nests them one hash deeper)."""
    return Path(tempfile.mkdtemp(prefix="gbx-", dir="/tmp"))


@contextlib.contextmanager
def local_state_dir() -> Iterator[Path]:
    """:func:`session_state_dir` for the length of a block, removed afterwards."""
    path = session_state_dir()
    try:
        yield path
    finally:
        stop_processes_using(path)
        shutil.rmtree(path, ignore_errors=True)


def stop_processes_using(state: Path, grace_s: float = 5.0) -> list[int]:
    """Stops what still runs from ``state``'s files (their paths on its command line), and
    returns their pids. Ray's HAProxy outlives a local Ray whose Serve did not stop in time
    (its controller's shutdown timed out on a busy machine); ``state`` is a directory of this
    session's own, so nothing else names it."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    marker = str(state).encode()
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for pid in found:
        while process_running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return found


def free_port(ports: range, *taken: int) -> int:
    """A port of ``ports`` free on every interface (HAProxy's pages bind on all of them when
    the gateway is served there),
    tried from a random point so that two clusters on one machine differ; never one of
    ``taken`` (picked already, not bound yet)."""
    start = random.randrange(len(ports))
    for offset in range(len(ports)):
        port = ports[(start + offset) % len(ports)]
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
            return port
    raise UnavailableError(f"no free port in {ports.start}-{ports.stop - 1}")
