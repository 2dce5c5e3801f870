"""A live gateway of two replicas while parts of it fail: a tampered artifact, a repository
update under load, a replica killed under load, and a SIGTERM under load.

The gateway serves a copy of the digits repository whose ``pruned`` artifact was tampered
with before the start; the tests run in file order, as an operator would meet the faults.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from gearbox.compression import ModelRepository
from gearbox.compression.examples.digits import load_splits
from gearbox.compression.repository import ARTIFACT_FILE
from gearbox.serving.config import APP_NAME
from tests.fixtures.load import Sent, SteadyLoad
from tests.fixtures.processes import (
    GATEWAY_REPLICA,
    HAPROXY_MANAGER,
    children,
    cluster_processes,
    listening_sockets,
)
from tests.integration.conftest import launch_serve, stop_serve, wait_gateway_ready

MODEL = "digits"
TAMPERED = "pruned"
TOKEN = "fault-tests-admin-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
GRPC_BEARER = {"authorization": f"Bearer {TOKEN}"}  # gRPC metadata keys are lower case


@dataclass
class Gateway:
    http: str
    grpc: str
    metrics: str
    repository: ModelRepository
    process: subprocess.Popen
    log: Path
    original_artifact: bytes


@pytest.fixture(scope="module")
def gateway(ray_address, digits_repository, tmp_path_factory) -> Iterator[Gateway]:
    source, compressed = digits_repository
    assert compressed.returncode == 0, compressed.stderr
    root = tmp_path_factory.mktemp("faults") / "repo"
    shutil.copytree(source.root, root)
    artifact = root / MODEL / TAMPERED / ARTIFACT_FILE
    original = artifact.read_bytes()
    artifact.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    launched = launch_serve(
        root, ray_address, root.parent / "serve.log", "--replicas", "2",
        "--shadow-fraction", "0", env={"GEARBOX_ADMIN_TOKEN": TOKEN},
    )  # fmt: skip
    gateway = Gateway(
        f"http://127.0.0.1:{launched.http_port}",
        f"127.0.0.1:{launched.grpc_port}",
        launched.metrics,
        ModelRepository(root),
        launched.process,
        launched.log,
        original,
    )
    try:
        wait_gateway_ready(gateway.http, gateway.grpc, gateway.process, gateway.log)
        yield gateway
    finally:
        stop_serve(gateway.process, gateway.log)


def _load(gateway: Gateway, **options) -> SteadyLoad:
    rows = load_splits().heldout.inputs["images"][:64]
    return SteadyLoad(gateway.http, gateway.grpc, MODEL, rows, **options)


def _loaded_replicas(gateway: Gateway) -> dict[str, float]:
    """``gearbox_variant_loaded`` per variant, as the gateway exports it."""
    text = requests.get(gateway.metrics, timeout=10).text
    return {
        sample.labels["variant"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "gearbox_variant_loaded"
        for sample in family.samples
        if sample.labels["model"] == MODEL
    }


def _until(predicate, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.25)


def test_a_tampered_artifact_is_left_out_and_reported_while_the_others_serve(gateway):
    triton = httpclient.InferenceServerClient(gateway.http.removeprefix("http://"))
    index = {row["version"]: row for row in triton.get_model_repository_index()}
    assert index[TAMPERED]["state"] == "UNAVAILABLE"
    assert "sha256" in index[TAMPERED]["reason"]
    assert index["fp32"]["state"] == "READY"
    metadata = triton.get_model_metadata(MODEL)
    assert TAMPERED not in metadata["versions"] and "fp32" in metadata["versions"]
    reply = requests.post(
        f"{gateway.http}/v2/models/{MODEL}/versions/{TAMPERED}/infer",
        json={"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8],
                          "data": [0.0] * 64}]},
        timeout=30,
    )  # fmt: skip
    assert reply.status_code == 503 and "sha256" in reply.json()["error"]
    _until(lambda: _loaded_replicas(gateway).get("fp32") == 2, "both replicas export figures")
    loaded = _loaded_replicas(gateway)
    assert loaded[TAMPERED] == 0 and loaded["fp32"] == 2
    # `gearbox serve` says so when it starts (its own wait for ready may end after ours).
    _until(lambda: "ready; Ctrl-C" in gateway.log.read_text(), "gearbox serve said it is ready")
    output = gateway.log.read_text()
    (line,) = [line for line in output.splitlines() if "not served" in line] or [output]
    assert f"{MODEL}/{TAMPERED}: failed to load on cpu" in line and "sha256" in line


def _listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at ``port`` (from /proc/net/tcp, tcp6)."""
    found = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_every_server_binds_the_loopback_address_only(gateway, ray_address):
    loopback = "0100007F"  # 127.0.0.1, as /proc/net/tcp writes it
    for url in (gateway.http, gateway.metrics, f"http://{gateway.grpc}"):
        port = int(url.split(":")[2].split("/")[0])
        assert _listening_addresses(port) == {loopback}, url
    # The ingress's HAProxy too: besides the gateway's ports, its exporter and stats pages,
    # which Ray's template binds on every interface and Gearbox's launcher does not.
    (manager,) = cluster_processes(ray_address, HAPROXY_MANAGER)
    sockets = {
        listening
        for pid in children([manager])
        if Path(f"/proc/{pid}/exe").resolve().name == "haproxy"
        for listening in listening_sockets(pid)
    }
    assert len({port for _address, port in sockets}) >= 4, sockets  # HTTP, gRPC, 2 pages
    assert {address for address, _port in sockets} == {loopback}, sockets


def test_a_repaired_variant_is_served_by_every_replica_after_a_load_with_none_failing(gateway):
    (gateway.repository.root / MODEL / TAMPERED / ARTIFACT_FILE).write_bytes(
        gateway.original_artifact
    )
    load = _load(gateway).start()
    try:
        load.wait_for(50)
        triton = httpclient.InferenceServerClient(gateway.http.removeprefix("http://"))
        with pytest.raises(Exception, match="Authorization: Bearer"):
            triton.load_model(MODEL)  # no token: refused, nothing changes
        triton.load_model(MODEL, headers=BEARER)
        # Returned once every replica serves the update: none may still refuse the variant.
        for _ in range(20):
            assert triton.is_model_ready(MODEL, TAMPERED)
        load.wait_for(load.report.answered + 50)
    finally:
        report = load.stop()
    assert report.failed() == [], report.outcomes()
    # Each replica writes its figures every second.
    _until(lambda: _loaded_replicas(gateway)[TAMPERED] == 2, "both replicas export it loaded")


def test_unload_and_load_over_grpc_change_every_replica(gateway):
    triton = grpcclient.InferenceServerClient(gateway.grpc)
    triton.unload_model(MODEL, headers=GRPC_BEARER)
    for _ in range(20):  # whichever replica answers
        assert not triton.is_model_ready(MODEL)
    index = triton.get_model_repository_index(as_json=True)["models"]
    assert {row.get("state") for row in index if row["name"] == MODEL} == {"UNAVAILABLE"}
    triton.load_model(MODEL, headers=GRPC_BEARER)
    for _ in range(20):
        assert triton.is_model_ready(MODEL)


def test_killing_a_replica_under_load_answers_every_request_the_gateway_took(gateway, ray_address):
    replicas = cluster_processes(ray_address, GATEWAY_REPLICA)
    assert len(replicas) == 2, replicas
    load = _load(gateway).start()
    try:
        load.wait_for(100)
        killed_at = time.monotonic()
        os.kill(replicas[0], signal.SIGKILL)
        # Serve replaces the replica; the load runs on across its death and the replacement.
        _until(
            lambda: (
                len(cluster_processes(ray_address, GATEWAY_REPLICA)) == 2
                and replicas[0] not in cluster_processes(ray_address, GATEWAY_REPLICA)
                and _running_replicas() == 2
            ),
            "the killed replica was replaced",
            timeout_s=240,
        )
        load.wait_for(load.report.answered + 100)
    finally:
        report = load.stop()
    after_kill = [s for s in report.sent if s.finished >= killed_at]
    assert after_kill, "no request crossed the kill"
    # Every HTTP request was answered: those in flight on the killed replica were sent again to
    # the other one, which HAProxy can do only because Gearbox's launcher makes it read each
    # request whole before forwarding it (gearbox.serving.haproxy_launcher).
    failed = [(s.protocol, round(s.started - killed_at, 3), s.detail) for s in report.failed()]
    # Known and open (issue 11): now and then the one gRPC call in flight on the killed replica
    # is reset by HAProxy with REFUSED_STREAM (RST_STREAM code 7) instead of being retried.
    errors = [
        f
        for f, s in zip(failed, report.failed(), strict=True)
        if not _refused_at_kill(s, killed_at)
    ]
    assert errors == [] and len(failed) <= 1, failed


def _refused_at_kill(sent: Sent, killed_at: float) -> bool:
    return (
        sent.protocol == "grpc"
        and "RST_STREAM with error code 7" in sent.detail
        and abs(sent.started - killed_at) < 1.0
    )


def _running_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments["Gateway"]
    return status.replica_states.get("RUNNING", 0)


def test_sigterm_drains_the_requests_in_flight_and_exits_cleanly(gateway):
    load = _load(gateway, http_clients=3, grpc_clients=1).start()
    try:
        load.wait_for(100)
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=120) == 0, gateway.log.read_text()
    finally:
        report = load.stop()
    # Every request sent before the signal was answered; later ones may be refused.
    assert report.failed(before=signalled) == [], report.outcomes(before=signalled)
    assert report.answered >= 100
