"""Certificates from a throwaway authority (trustme) and plaintext loopback servers that answer
ready over HTTP and gRPC, for the TLS unit tests."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import trustme

from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from gearbox.serving.tls import TlsFiles

LOOPBACK = "127.0.0.1"
READY_PATH = "/v2/health/ready"


def issue_pair(
    directory: Path, authority: trustme.CA, *names: str, stem: str = "server"
) -> TlsFiles:
    """A server certificate for ``names`` (default: loopback) issued by ``authority``, and its
    key, written to ``directory``."""
    leaf = authority.issue_cert(*(names or (LOOPBACK, "localhost")))
    certificate, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    certificate.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return TlsFiles(str(certificate), str(key))


def write_authority(directory: Path, authority: trustme.CA, name: str = "ca.pem") -> Path:
    """The authority's own certificate, which clients trust."""
    path = directory / name
    authority.cert_pem.write_to_path(str(path))
    return path


class ReadyHandler(http.server.BaseHTTPRequestHandler):
    """200 on the ready path, 404 elsewhere."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == READY_PATH else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def http_server(server: http.server.HTTPServer) -> Iterator[int]:
    """Runs ``server`` (on a loopback port) for the block; yields its port."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class _ReadyServicer(pb_grpc.GRPCInferenceServiceServicer):
    def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)


@contextmanager
def plaintext_grpc_server() -> Iterator[int]:
    """A plaintext gRPC inference server on loopback whose ServerReady says ready; its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_ReadyServicer(), server)
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)
