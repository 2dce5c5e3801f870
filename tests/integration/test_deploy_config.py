"""deploy/serve_config.yaml deployed the way deploy/README.md gives a user: `serve run` on a
running Ray cluster, here the session's two-node cluster.

The session cluster runs without a dashboard, so `serve deploy` (which goes through the
dashboard's REST API) cannot reach it; `serve run` deploys the same config through the cluster's
GCS address and, on Ctrl-C, shuts Serve down again. Only what a copy of the config must change
for a test is changed: free ports on 127.0.0.1, the test repository, and the proxy location.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pytest
import requests
import tritonclient.grpc as grpcclient
import yaml
from ray import serve

from gearbox.compression import ModelRepository
from gearbox.compression.examples.digits import load_splits
from gearbox.serving.metric_names import REQUESTS
from gearbox.serving.server import serve_was_running
from tests.integration.conftest import ROOT, _free_port, scrape_sum, wait_gateway_ready

SERVE = str(Path(sys.executable).with_name("serve"))
SERVE_CONFIG = ROOT / "deploy" / "serve_config.yaml"
MODEL = "digits"
REFERENCE_VARIANT = "fp32"
METRICS_SNAPSHOTS = Path(tempfile.gettempdir()) / "gearbox-metrics"


@dataclass(frozen=True)
class Deployment:
    http: str
    grpc: str
    metrics: str
    repository: ModelRepository


def _test_copy_of_the_config(
    repository: Path, http_port: int, grpc_port: int, metrics_port: int
) -> dict:
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    # Both nodes of the session cluster share this machine: a proxy on each would bind the same
    # ports (gearbox serve picks HeadOnly on one machine for the same reason).
    config["proxy_location"] = "HeadOnly"
    config["http_options"].update(host="127.0.0.1", port=http_port)
    config["grpc_options"]["port"] = grpc_port
    (app,) = config["applications"]
    app["args"].update(
        repository=str(repository), metrics_port=metrics_port, metrics_host="127.0.0.1"
    )
    return config


def _listener_pid(port: int) -> int | None:
    for connection in psutil.net_connections("tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            return connection.pid
    return None


def _stop_serve_run(process: subprocess.Popen) -> int | None:
    """Ctrl-C, as a user stops `serve run`: it shuts Serve down on the cluster, then exits.
    Returns its exit status, or None when it had to be killed."""
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def _serve_gone(timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while serve_was_running():
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


@pytest.fixture(scope="module")
def deployment(ray_address, digits_repository, tmp_path_factory) -> Iterator[Deployment]:
    repository, compressed = digits_repository
    assert compressed.returncode == 0, compressed.stderr
    # `serve run` takes over a running Serve and shuts it down on Ctrl-C: never another's.
    assert not serve_was_running(), "another test left Ray Serve running on the session cluster"
    http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
    workdir = tmp_path_factory.mktemp("serve-config")
    config_file = workdir / "serve_config.yaml"
    config_file.write_text(
        yaml.safe_dump(
            _test_copy_of_the_config(repository.root, http_port, grpc_port, metrics_port)
        )
    )
    log = workdir / "serve-run.log"
    process = subprocess.Popen(
        [SERVE, "run", str(config_file), "--address", ray_address],
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    deployment = Deployment(
        http=f"http://127.0.0.1:{http_port}",
        grpc=f"127.0.0.1:{grpc_port}",
        metrics=f"http://127.0.0.1:{metrics_port}/metrics",
        repository=repository,
    )
    exporter_pid = None
    try:
        wait_gateway_ready(deployment.http, deployment.grpc, process, log)
        exporter_pid = _listener_pid(metrics_port)
        yield deployment
    finally:
        code = _stop_serve_run(process)
        # Ctrl-C shuts the whole of Serve down (controller, proxies, HAProxy), so the next
        # test's gateway starts Serve afresh on its own ports. Should it not have, this test
        # stops the Serve it started rather than leave it in the other tests' way.
        stopped_by_serve_run = _serve_gone()
        if not stopped_by_serve_run:
            serve.shutdown()
        # The replica's metrics snapshots outlive it by design (counts survive restarts);
        # remove this deployment's, found by the replica that held the metrics port.
        if exporter_pid is not None:
            for snapshot in METRICS_SNAPSHOTS.glob(f"*/{exporter_pid}-*"):
                shutil.rmtree(snapshot.parent, ignore_errors=True)
        assert code == 0 and stopped_by_serve_run, (
            f"serve run did not stop cleanly on Ctrl-C (exit {code}):\n{log.read_text()}"
        )


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_splits().heldout.inputs["images"][:16]


@pytest.fixture(scope="module")
def reference_logits(deployment, images) -> np.ndarray:
    """What the reference variant's ONNX model answers, run here with ONNX Runtime."""
    repository = deployment.repository
    artifact = repository.read_artifact(repository.manifest(MODEL, REFERENCE_VARIANT))
    session = ort.InferenceSession(artifact, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images})
    return logits


def test_the_deployed_config_says_ready(deployment):
    answer = requests.get(f"{deployment.http}/v2/health/ready", timeout=10)
    assert answer.status_code == 200
    assert answer.json() == {"ready": True}


def _infer_over_http(
    deployment: Deployment, images: np.ndarray, version: str = ""
) -> requests.Response:
    body = {
        "inputs": [
            {"name": "images", "datatype": "FP32", "shape": list(images.shape),
             "data": images.ravel().tolist()}
        ]
    }  # fmt: skip
    path = f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/infer"
    return requests.post(deployment.http + path, json=body, timeout=30)


def test_an_http_infer_answers_what_the_reference_model_computes(
    deployment, images, reference_logits
):
    answer = _infer_over_http(deployment, images)
    assert answer.status_code == 200, answer.text
    payload = answer.json()
    # No latency budget: the reference variant answers.
    assert payload["model_version"] == REFERENCE_VARIANT
    (output,) = payload["outputs"]
    logits = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_allclose(logits, reference_logits, rtol=1e-5, atol=1e-5)


def test_a_grpc_infer_answers_what_the_reference_model_computes(
    deployment, images, reference_logits
):
    client = grpcclient.InferenceServerClient(url=deployment.grpc)
    tensor = grpcclient.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = client.infer(MODEL, [tensor])
    assert result.get_response().model_version == REFERENCE_VARIANT
    np.testing.assert_allclose(result.as_numpy("logits"), reference_logits, rtol=1e-5, atol=1e-5)


def test_the_configured_metrics_port_counts_the_requests(deployment, images):
    # Only this test asks for the int8 variant, and a new deployment counts from zero.
    def answered() -> float:
        return scrape_sum(
            deployment.metrics, REQUESTS.sample_name, code="ok", model=MODEL, variant="int8"
        )

    sent = 3
    for _ in range(sent):
        assert _infer_over_http(deployment, images[:1], version="int8").status_code == 200
    # The replica writes its figures for the exporter every so often: wait for them.
    deadline = time.monotonic() + 60
    while answered() < sent:
        assert time.monotonic() < deadline, "the requests never reached the metrics port"
        time.sleep(0.5)
    assert answered() == sent
