"""Gearbox's TLS terminator: an HAProxy process of its own in front of Ray Serve's ingress.

Why Gearbox terminates TLS itself: Ray Serve 2.60 encrypts HTTP only on its classic proxy
(uvicorn's ssl options; its HAProxy ingress binds plain HTTP) and gRPC nowhere (every Serve gRPC
server binds with ``add_insecure_port``). So with ``--tls-cert``, Serve's ingress (HAProxy by
default, or the classic proxy) listens in plaintext on internal loopback ports, and ``gearbox
serve`` runs the HAProxy binary that ships with ray[serve] on the user's ports: it completes the
TLS handshake with the gateway's certificate (ALPN ``http/1.1`` on the HTTP port, ``h2`` on the
gRPC port) and forwards the decrypted byte stream (mode tcp) to the matching internal port, so
Serve sees exactly the bytes a plaintext client would send.

The budget's clock does not move: it starts in the gateway replica (DESIGN.md §5), so the
terminator, like the ingress behind it, is outside the span; what the handshake and the extra
copy cost a caller belongs with the rest of its transport (``--transport-allowance-ms``).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from gearbox.compression.errors import UnavailableError
from gearbox.serving.haproxy_launcher import real_haproxy
from gearbox.serving.tls import TlsFiles, pinned_client_context

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 3600
"""How long a connection may stay silent, either way: as long as Ray Serve's HAProxy ingress
lets a client idle (its ``timeout client``), so the terminator never cuts a connection the
ingress behind it would keep."""
LOG_TAIL_LINES = 6
HTTP_ALPN = "http/1.1"
GRPC_ALPN = "h2"


@dataclass(frozen=True)
class TlsRoute:
    """A port the terminator serves TLS on, and the plaintext port it forwards that stream to."""

    name: str
    """The route's HAProxy frontend and backend name (a word: ``http``, ``grpc``)."""
    port: int
    upstream_port: int
    alpn: str
    """The one application protocol offered in the handshake: gRPC clients refuse a server
    that does not select ``h2``."""


def haproxy_binary() -> str:
    """The HAProxy the terminator runs: the one Ray Serve's ingress runs behind Gearbox's
    launcher (:func:`gearbox.serving.haproxy_launcher.real_haproxy`)."""
    try:
        return real_haproxy()
    except FileNotFoundError as error:
        raise UnavailableError(f"TLS needs HAProxy: {error}") from None


def _quoted(path: Path) -> str:
    # Single quotes: HAProxy expands no variables and no escapes inside them.
    if "'" in str(path):
        raise UnavailableError(f"the TLS terminator cannot use a path with a quote: {path}")
    return f"'{path}'"


def haproxy_config(pem: Path, routes: Sequence[TlsRoute], host: str) -> str:
    """The terminator's whole HAProxy configuration: one TLS frontend per route on ``host``,
    forwarding in mode tcp to the route's upstream port on ``host``."""
    lines = [
        "global",
        # Gearbox's gateway replicas run one HAProxy thread too (see ingress.ray_environment):
        # a thread decrypts far more than a node's Python replicas answer.
        "    nbthread 1",
        "    maxconn 4096",
        # Without SO_REUSEPORT a second process on the port is an error at start, never a
        # silent share of the gateway's traffic.
        "    noreuseport",
        "    ssl-default-bind-options ssl-min-ver TLSv1.2",
        "    log stderr format raw local0 notice",
        "defaults",
        "    mode tcp",
        "    log global",
        "    timeout connect 5s",
        f"    timeout client {IDLE_TIMEOUT_S}s",
        f"    timeout server {IDLE_TIMEOUT_S}s",
    ]
    for route in routes:
        lines += [
            f"frontend {route.name}_tls",
            f"    bind {host}:{route.port} ssl crt {_quoted(pem)} alpn {route.alpn}",
            f"    default_backend {route.name}_ingress",
            f"backend {route.name}_ingress",
            f"    server ingress {host}:{route.upstream_port}",
        ]
    return "\n".join(lines) + "\n"


def _write_private(path: Path, content: bytes) -> None:
    # Created with mode 0600 from the start: the key is never readable by others, not even
    # for the moment between a write and a chmod.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(content)


def combined_pem(tls: TlsFiles) -> bytes:
    """Certificate (chain) and key in the one PEM file HAProxy's ``crt`` takes."""
    certificate = Path(tls.certificate).read_bytes()
    separator = b"" if certificate.endswith(b"\n") else b"\n"
    return certificate + separator + Path(tls.key).read_bytes()


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` of HAProxy's log on one line: its alerts where it logged any (its
    start-up notices name only its version and path)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "no log"
    logged = [line.strip() for line in text.splitlines() if line.strip()]
    alerts = [line for line in logged if line.startswith("[ALERT]")]
    return " | ".join((alerts or logged)[-lines:]) or "nothing logged"


class TlsTerminator:
    """A running terminator: its HAProxy child process and its private directory (the combined
    PEM, the configuration, HAProxy's log). :meth:`stop` ends both; it is safe to call twice."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        directory: Path,
        routes: Sequence[TlsRoute],
        host: str,
        certificate: str,
    ) -> None:
        self.process = process
        self.directory = directory
        self.routes = tuple(routes)
        self.host = host
        self.certificate = certificate
        self.peer_certificate: dict[str, Any] = {}
        """The certificate the terminator presents, as a verifying client reads it."""
        self._exit_reported = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> Path:
        return self.directory / "haproxy.log"

    @classmethod
    def start(
        cls,
        tls: TlsFiles,
        routes: Sequence[TlsRoute],
        host: str,
        timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> TlsTerminator:
        """Starts HAProxy and returns once every route's port completes a TLS handshake with
        the gateway's certificate; on any failure nothing is left running or on disk."""
        binary = haproxy_binary()
        directory = Path(tempfile.mkdtemp(prefix="gearbox-tls-"))  # mode 0700
        try:
            pem = directory / "gateway.pem"
            _write_private(pem, combined_pem(tls))
            config = directory / "haproxy.cfg"
            config.write_text(haproxy_config(pem, routes, host))
            with (directory / "haproxy.log").open("wb") as log:
                process = subprocess.Popen(
                    # -db: stay in the foreground, one process, this one's child.
                    [binary, "-db", "-f", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Out of the terminal's process group: Ctrl-C reaches `gearbox serve`
                    # alone, which drains the gateway before it stops the terminator.
                    start_new_session=True,
                )
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        terminator = cls(process, directory, routes, host, tls.certificate)
        # The last resort if this process ends without stopping it (an uncaught error):
        # HAProxy must never outlive `gearbox serve` holding the gateway's ports.
        atexit.register(terminator.stop)
        try:
            terminator._wait_started(timeout_s)
        except BaseException:
            terminator.stop()
            raise
        return terminator

    def _wait_started(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            code = self.process.poll()
            if code is not None:
                self._exit_reported = True
                raise UnavailableError(
                    f"the TLS terminator (HAProxy) exited with code {code} at start: "
                    f"{log_tail(self.log)}"
                )
            try:
                for route in self.routes:
                    self.peer_certificate = self.handshake(route)
                return
            except (OSError, UnavailableError) as error:
                last = str(error)
            if time.monotonic() > deadline:
                raise UnavailableError(
                    f"the TLS terminator (HAProxy) did not serve TLS within {timeout_s:.0f} s "
                    f"({last}): {log_tail(self.log)}"
                )
            time.sleep(0.1)

    def handshake(self, route: TlsRoute) -> dict[str, Any]:
        """A TLS handshake on ``route``'s port that trusts only the gateway's certificate and
        offers only the route's protocol; returns the certificate presented."""
        context = pinned_client_context(self.certificate)
        context.set_alpn_protocols([route.alpn])
        with (
            socket.create_connection((self.host, route.port), timeout=2) as connection,
            context.wrap_socket(connection) as tls,
        ):
            chosen = tls.selected_alpn_protocol()
            if chosen != route.alpn:
                raise UnavailableError(
                    f"port {route.port} selected ALPN {chosen!r}, not {route.alpn!r}"
                )
            presented = tls.getpeercert()
        if not presented:
            raise ssl.SSLError(f"port {route.port} presented no certificate")
        return dict(presented)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stops HAProxy (SIGTERM by its pid, SIGKILL if it lingers) and removes the directory,
        with the key's copy; says so in the log if HAProxy had exited on its own."""
        atexit.unregister(self.stop)
        code = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        elif not self._exit_reported:
            logger.warning(
                "the TLS terminator (HAProxy, pid %d) had exited on its own with code %d: %s",
                self.pid,
                code,
                log_tail(self.log),
            )
        self._exit_reported = True
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> TlsTerminator:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
