"""One real Ray cluster for the whole integration session: two nodes on this machine.

Both nodes are started with ``ray start --block`` so that terminating those two processes
stops exactly this cluster and nothing else running Ray on the machine. They run with the
environment ``gearbox serve`` gives a Ray it starts: Ray Serve's HAProxy ingress, with HAProxy's
files in a directory of this session's own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from gearbox.compression import ModelRepository
from gearbox.serving.ingress import Ingress, free_port, ray_environment, session_state_dir

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
GEARBOX = str(Path(sys.executable).with_name("gearbox"))
NODE_OBJECT_STORE_BYTES = 300 * 1024 * 1024


TEST_PORT_RANGE = range(25000, 30000)
"""Clear of Ray's worker ports (10002-19999), the HAProxy ports Gearbox picks (20000-24999),
Serve's direct ingress (30000 up) and the kernel's ephemeral range, where Ray's processes
bind ports while a test starts its servers."""


def _free_port() -> int:
    return free_port(TEST_PORT_RANGE)


def _start_node(*args: str, log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [
            RAY,
            "start",
            "--block",
            "--num-cpus=1",
            "--node-ip-address=127.0.0.1",
            f"--object-store-memory={NODE_OBJECT_STORE_BYTES}",
            "--disable-usage-stats",
            *args,
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
    )


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _forget_cluster(address: str) -> None:
    """Remove Ray's record of this cluster as the machine's current one, as `ray stop` would,
    so that a later plain `ray.init()` elsewhere does not try to join the stopped cluster."""
    record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    port = address.rsplit(":", 1)[1]
    if record.is_file() and record.read_text().strip().endswith(f":{port}"):
        record.unlink()


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """GCS address of a two-node, one-CPU-per-node local cluster this test process joins."""
    logs = tmp_path_factory.mktemp("ray-logs")
    address = f"127.0.0.1:{_free_port()}"
    haproxy_state = session_state_dir()
    env = ray_environment(Ingress.HAPROXY, haproxy_state)
    # `gearbox serve --address` run by the tests reports the ingress from its environment; the
    # HAProxy file paths and ports stay this cluster's own (a `gearbox demo` picks its own).
    monkeypatch = pytest.MonkeyPatch()
    for key, value in env.items():
        if not key.startswith("RAY_SERVE_HAPROXY_"):
            monkeypatch.setenv(key, value)
    head = _start_node(
        "--head",
        f"--port={address.split(':')[1]}",
        "--include-dashboard=false",
        log=logs / "head",
        env=env,
    )
    worker = None
    try:
        deadline = time.monotonic() + 120
        worker = _start_node(f"--address={address}", log=logs / "worker", env=env)
        while True:
            try:
                ray.init(
                    address=address,
                    log_to_driver=False,
                    runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
                )
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"second Ray node did not join; logs in {logs}")
            time.sleep(0.5)
        yield address
    finally:
        ray.shutdown()
        if worker is not None:
            _stop(worker)
        _stop(head)
        shutil.rmtree(logs, ignore_errors=True)
        shutil.rmtree(haproxy_state, ignore_errors=True)
        monkeypatch.undo()
        _forget_cluster(address)


def run_gearbox(
    *args: str, cwd: Path = ROOT, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """The real console script, as a user runs it (``env``: added to this environment)."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("gearbox")), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def wait_gateway_ready(http: str, grpc_target: str, process: subprocess.Popen, log: Path) -> None:
    """Returns once `gearbox serve` answers ready over both protocols (behind HAProxy each
    says ready only once its direct path is up); fails the test if it exits or never does."""
    import requests
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"gearbox serve exited early:\n{log.read_text()}")
        try:
            http_ready = requests.get(f"{http}/v2/health/ready", timeout=2).ok
            if http_ready and grpcclient.InferenceServerClient(grpc_target).is_server_ready():
                return
        except (requests.RequestException, InferenceServerException):
            pass
        time.sleep(1)
    pytest.fail(f"gateway never became ready:\n{log.read_text()}")


def scrape_sum(metrics_url: str, sample: str, **labels: str) -> float:
    """The sum of a gateway's ``sample`` series whose labels include ``labels``."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(
        found.value
        for family in text_string_to_metric_families(text)
        for found in family.samples
        if found.name == sample and labels.items() <= found.labels.items()
    )


@dataclass(frozen=True)
class LaunchedGateway:
    """A `gearbox serve` this session started on free ports, its output in ``log``."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log: Path

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def launch_serve(
    repository: Path,
    ray_address: str,
    log: Path,
    *options: str,
    env: dict[str, str] | None = None,
) -> LaunchedGateway:
    """`gearbox serve --repo REPOSITORY --address RAY_ADDRESS` on free ports, plus ``options``
    (``env``: added to this environment). Wait for it with :func:`wait_gateway_ready`."""
    http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
    process = subprocess.Popen(
        [
            GEARBOX, "serve", "--repo", str(repository), "--address", ray_address,
            "--http-port", str(http_port), "--grpc-port", str(grpc_port),
            "--metrics-port", str(metrics_port), *options,
        ],
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    return LaunchedGateway(process, http_port, grpc_port, metrics_port, log)


def stop_serve(process: subprocess.Popen, log: Path) -> str:
    """SIGTERM to a `gearbox serve` still running, which must then exit 0; its output."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=120)
    output = log.read_text()
    assert code == 0, output
    return output


def start_gearbox(*args: str, cwd: Path = ROOT) -> subprocess.Popen:
    """The real console script, started in the background (to interrupt it)."""
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("gearbox")), *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def digits_repository(
    ray_address: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ModelRepository, subprocess.CompletedProcess]:
    """The full built-in example, compressed once through the CLI on the cluster (~80 s):
    checked by the compression tests, served by the serving tests."""
    repo = tmp_path_factory.mktemp("digits") / "repo"
    result = run_gearbox(
        "compress", "--example", "digits", "--repo", str(repo), "--address", ray_address
    )
    return ModelRepository(repo), result
