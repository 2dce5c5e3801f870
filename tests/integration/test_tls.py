"""`gearbox serve --tls-cert/--tls-key` on the two-node cluster, with a throwaway certificate
authority (trustme) and real clients: `requests`, the unmodified `tritonclient.http` and
`tritonclient.grpc`.

Gearbox's own TLS terminator (the HAProxy that ships with ray[serve]) serves TLS on both ports
in front of Ray Serve's plaintext ingress, which stays the HAProxy ingress the cluster runs.
The last test stops the gateway and checks that the terminator went with it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import trustme
from tritonclient.utils import InferenceServerException

from gearbox.compression.examples.digits import load_splits
from gearbox.serving.processes import process_running
from tests.integration.conftest import launch_serve, stop_serve
from tests.unit.tls_fixtures import issue_pair, write_authority

MODEL = "digits"
READY_LINE = "ready; Ctrl-C or SIGTERM stops"
TERMINATOR_LINE = re.compile(r"terminated by Gearbox's HAProxy, pid (\d+)")


@dataclass(frozen=True)
class TlsGateway:
    address: str
    """host:port of the HTTPS endpoint."""
    grpc_target: str
    """host:port of the gRPC endpoint (TLS)."""
    authority: Path
    """The throwaway CA's certificate, which clients trust."""
    process: subprocess.Popen
    log: Path

    @property
    def https(self) -> str:
        return f"https://{self.address}"

    def terminator_pid(self) -> int:
        found = TERMINATOR_LINE.search(self.log.read_text())
        assert found, self.log.read_text()
        return int(found.group(1))


def _wait_until_ready(process: subprocess.Popen, log: Path) -> None:
    """`gearbox serve` prints its ready line once its own probes have had the ready answer over
    HTTPS and gRPC with TLS, trusting the certificate it serves (so this also tests them)."""
    deadline = time.monotonic() + 240
    while READY_LINE not in log.read_text():
        if process.poll() is not None:
            pytest.fail(f"gearbox serve exited early:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"gateway never became ready:\n{log.read_text()}")
        time.sleep(1)


@pytest.fixture(scope="module")
def tls_gateway(ray_address, digits_repository, tmp_path_factory) -> Iterator[TlsGateway]:
    repository, compressed = digits_repository
    assert compressed.returncode == 0, compressed.stderr
    files = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    pair = issue_pair(files, authority)
    trusted = write_authority(files, authority)
    launched = launch_serve(
        repository.root, ray_address, files / "serve.log",
        "--tls-cert", pair.certificate, "--tls-key", pair.key,
    )  # fmt: skip
    gateway = TlsGateway(
        f"127.0.0.1:{launched.http_port}",
        f"127.0.0.1:{launched.grpc_port}",
        trusted,
        launched.process,
        launched.log,
    )
    try:
        _wait_until_ready(gateway.process, gateway.log)
        yield gateway
    finally:
        # The last test stops it; this only cleans up after a failure before that.
        stop_serve(gateway.process, gateway.log)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    heldout = load_splits().heldout
    return heldout.inputs["images"][:32], heldout.labels[:32]


def test_startup_prints_tls_endpoints_and_keeps_the_haproxy_ingress(tls_gateway):
    printed = tls_gateway.log.read_text()
    assert f"HTTP     {tls_gateway.https}" in printed
    assert f"gRPC     {tls_gateway.grpc_target}  (inference.GRPCInferenceService over TLS)" in (
        printed
    )
    assert "valid for 127.0.0.1" in printed
    assert "ingress  haproxy" in printed
    assert process_running(tls_gateway.terminator_pid())


def test_infer_over_https_with_requests(tls_gateway, digits):
    images, labels = digits
    body = {
        "inputs": [
            {"name": "images", "datatype": "FP32", "shape": list(images.shape),
             "data": images.ravel().tolist()}
        ]
    }  # fmt: skip
    response = requests.post(
        f"{tls_gateway.https}/v2/models/{MODEL}/infer",
        json=body,
        verify=str(tls_gateway.authority),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    logits = np.asarray(output["data"]).reshape(output["shape"])
    assert (logits.argmax(axis=1) == labels).mean() > 0.8


def test_unmodified_triton_http_client_over_tls(tls_gateway, digits):
    images, labels = digits
    client = httpclient.InferenceServerClient(
        tls_gateway.address, ssl=True, ssl_options={"ca_certs": str(tls_gateway.authority)}
    )
    try:
        assert client.is_server_ready()
        tensor = httpclient.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        logits = client.infer(MODEL, [tensor]).as_numpy("logits")
    finally:
        client.close()
    assert (logits.argmax(axis=1) == labels).mean() > 0.8


def test_unmodified_triton_grpc_client_over_tls(tls_gateway, digits):
    images, labels = digits
    client = grpcclient.InferenceServerClient(
        tls_gateway.grpc_target, ssl=True, root_certificates=str(tls_gateway.authority)
    )
    try:
        assert client.is_server_ready()
        tensor = grpcclient.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        result = client.infer(MODEL, [tensor], parameters={"latency_budget_ms": 1000})
    finally:
        client.close()
    assert (result.as_numpy("logits").argmax(axis=1) == labels).mean() > 0.8
    assert result.get_response().parameters["variant"].string_param


def test_plaintext_to_the_tls_ports_gets_no_answer(tls_gateway):
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{tls_gateway.address}/v2/health/ready", timeout=10)
    plain = grpcclient.InferenceServerClient(tls_gateway.grpc_target)
    try:
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            plain.is_server_ready(client_timeout=10)
    finally:
        plain.close()


def test_a_client_that_does_not_trust_the_authority_is_refused(tls_gateway, tmp_path):
    stranger = write_authority(tmp_path, trustme.CA(), "stranger.pem")
    for trusted in (str(stranger), True):  # another CA; this machine's own roots
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{tls_gateway.https}/v2/health/ready", verify=trusted, timeout=10)
    client = httpclient.InferenceServerClient(
        tls_gateway.address, ssl=True, ssl_options={"ca_certs": str(stranger)}
    )
    try:
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            client.is_server_ready()
    finally:
        client.close()
    secure = grpcclient.InferenceServerClient(
        tls_gateway.grpc_target, ssl=True, root_certificates=str(stranger)
    )
    try:
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            secure.is_server_ready(client_timeout=10)
    finally:
        secure.close()


def test_sigterm_stops_the_gateway_and_its_terminator(tls_gateway):
    """Runs last: it stops the module's gateway."""
    terminator = tls_gateway.terminator_pid()
    tls_gateway.process.send_signal(signal.SIGTERM)
    code = tls_gateway.process.wait(timeout=120)
    output = tls_gateway.log.read_text()
    assert code == 0, output
    assert "draining and stopping" in output
    assert not process_running(terminator), (
        f"the TLS terminator (pid {terminator}) outlived the gateway"
    )
