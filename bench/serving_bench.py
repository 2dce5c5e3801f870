"""Benchmark of Gearbox's serving path: latency against a bare asyncio server, throughput
against the same executor driven in-process. One run measures everything.

    .venv/bin/python bench/serving_bench.py [--repo DIR [--reuse]] [--json PATH]
        [--ingress haproxy|proxy] [--budget-ms 50] [--warmup 200] [--requests 2000]
        [--rounds 3] [--concurrency 16] [--throughput-s 10] [--throughput-warmup-s 2]
        [--profile-s 5]
        [--http-port 18000] [--grpc-port 19000] [--metrics-port 18080] [--bare-http-port 18100]
        [--bare-grpc-port 19100]

Setup. With --reuse the `digits` repository at --repo is served as it is; otherwise
`gearbox compress --example digits --repo DIR` builds one first (a temp dir by default). The
gateway is deployed exactly as `gearbox serve` deploys it: a local Ray started through
`ray_session(None, env=ray_environment(INGRESS, session_state_dir()))` (HAProxy ingress by
default, --ingress proxy for Ray Serve's classic proxy), then `start_gateway(...)`. Every
server binds 127.0.0.1 only; Serve and Ray are shut down at exit.

1. Latency, batch 1, sequential requests, timed at the client (one keep-alive HTTP connection
   or one gRPC channel per case and round; bodies and messages encoded once, up front). The
   request is one held-out digits image. Cases:
   - gearbox routed: model `digits`, no version, parameter latency_budget_ms = --budget-ms;
   - gearbox pinned: model_version = the variant the router chose for the routed requests;
   - bare: a single-process asyncio server (bench/serving_peers.py `bare`: uvicorn +
     Starlette and grpc.aio on one uvloop event loop, as a Ray worker runs) with the SAME
     ONNX Runtime session (the artifact read and sha256-verified by
     `ModelRepository.read_artifact`, opened by `CPU.create_session`) behind the SAME OIP
     converters as Gearbox (`decode_infer_request` / `encode_infer_response`,
     `request_from_proto` / `response_to_proto`), the session run inline on the event loop:
     no routing, no batching, no Ray. It gets the pinned request.
   Gearbox and the bare server run side by side, but only one of them is ever measured at a
   time; --rounds alternates them (G B, B G, G B, ...) with --requests split between rounds,
   so that a busy machine's slow drift hits both. Reported per protocol and case: p50, p95,
   p99; for Gearbox also the median of the response's `latency_ms` parameter (the span
   inside the gateway replica) and client p50 minus it (what the ingress and the transport
   cost). Checks: Gearbox p50 (routed and pinned) - bare p50 <= 0.7 ms per protocol, and
   Gearbox's logits identical (bit for bit) to the bare server's.
   A breakdown follows (serving_peers.py `plane`, run while no server is measured): Gearbox's
   HTTP adapter / gRPC servicer and data plane, built as the replica builds them, and the
   bare server's converters, each timed in one process without any server. Client p50 minus
   `latency_ms` is what lies outside the replica's clock; `latency_ms` minus that code is what
   Ray Serve's replica path adds around it.

2. Throughput at saturation, for the chosen variant and for fp32 (once if they are the same):
   - Gearbox pinned to the variant, driven over HTTP by --concurrency closed-loop keep-alive
     connections from a separate, light client process (bench/serving_peers.py `load`:
     one uvloop event loop, pre-encoded request, no JSON decoding) for --throughput-s after
     --throughput-warmup-s;
   - the in-process ceiling: the gateway's own cpu backend (`LocalBackend`: the same sessions,
     the same `DeviceExecutor` with the gateway's `BatchingConfig`, `ServiceTimes` and one
     worker, warmed up the same way) in a separate process, with --concurrency asyncio tasks
     each submitting the same single-row request as soon as its last one is answered.
   Check: Gearbox req/s >= 0.5x in-process req/s, with no failed request. Reported beside it,
   to show where the time goes: the mean batch each formed (Gearbox's from its Prometheus
   export: requests / batches counted over the run; in-process from the executor's batch
   callback), the bare server's throughput under the same load (what an HTTP server with
   no Ray, routing or batching reaches in front of the session on these cores), client
   latency against the gateway's own `latency_ms`, and the CPU cores each
   group of processes used during the window (gateway replica, HAProxy, client, the rest of
   Ray, everything outside the benchmark), from /proc. Then, for --profile-s more under the
   same load (py-spy, when installed: `pip install -e '.[dev]'` brings it), a profile of the
   gateway replica: how busy each of its threads was, the event loop's time per request by
   whose code ran (Gearbox, Ray Serve, uvicorn and Starlette, ONNX Runtime inline, asyncio),
   and the rate that the framework's share alone would allow one replica.

3. --json PATH writes every figure. Exit status 1 on any FAIL (or a run stopped by a failed
   request), 2 if the run could not be set up (a port in use, say). Every request loop is
   bounded in count and in time.

The machine this was written for has 2 cores shared with other work: figures drift, which is
what the rounds are for; read the per-round p50s before trusting a margin.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from gearbox.compression import ModelRepository
from gearbox.compression.cluster import ray_session
from gearbox.compression.errors import GearboxError, UnavailableError
from gearbox.compression.examples.digits import load_splits
from gearbox.serving.config import BatchingConfig, GatewayConfig
from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.ingress import Ingress, ray_environment, session_state_dir
from gearbox.serving.metric_names import BATCH_SIZE, REQUESTS
from gearbox.serving.server import LOOPBACK, check_port_free, start_gateway

HERE = Path(__file__).resolve().parent
PEERS = HERE / "serving_peers.py"
GEARBOX = str(Path(sys.executable).with_name("gearbox"))
MODEL = "digits"
REFERENCE = "fp32"
MAX_P50_OVERHEAD_MS = 0.7
MIN_THROUGHPUT_RATIO = 0.5
REQUEST_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 120.0
METRICS_CATCH_UP_S = 20.0
"""A replica writes its metrics every second: how long to wait for a count to catch up."""
CHOICE_PROBES = 50
"""Routed requests per protocol that decide which variant the router chooses."""
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
PROTOCOLS = ("http", "grpc")
ROUTED, PINNED, BARE = "gearbox routed", "gearbox pinned", "bare"
CASES = (ROUTED, PINNED, BARE)


# -- clients -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    logits: np.ndarray
    parameters: dict[str, Any]


class HttpCaller:
    """One keep-alive connection sending one pre-encoded request; returns (ms, raw body)."""

    def __init__(self, port: int, path: str, body: bytes) -> None:
        self._connection = http.client.HTTPConnection(LOOPBACK, port, timeout=REQUEST_TIMEOUT_S)
        self._path = path
        self._body = body
        self._headers = {"Content-Type": "application/json"}
        self.ok = 0

    def __call__(self) -> tuple[float, bytes]:
        started = time.perf_counter()
        self._connection.request("POST", self._path, self._body, self._headers)
        response = self._connection.getresponse()
        raw = response.read()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise UnavailableError(f"HTTP {response.status} from {self._path}: {raw[:300]!r}")
        self.ok += 1
        return elapsed, raw

    @staticmethod
    def parse(raw: bytes) -> Answer:
        payload = json.loads(raw)
        output = payload["outputs"][0]
        logits = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
        return Answer(logits, payload.get("parameters", {}))

    def close(self) -> None:
        self._connection.close()


class GrpcCaller:
    """One channel sending one pre-serialized ModelInferRequest; returns (ms, raw reply)."""

    def __init__(self, port: int, request: bytes) -> None:
        self._channel = grpc.insecure_channel(f"{LOOPBACK}:{port}")
        # No serializers: the request goes out as the bytes encoded up front.
        self._infer = self._channel.unary_unary(INFER_METHOD)
        self._request = request
        self.ok = 0

    def __call__(self) -> tuple[float, bytes]:
        started = time.perf_counter()
        raw = self._infer(self._request, timeout=REQUEST_TIMEOUT_S)
        elapsed = (time.perf_counter() - started) * 1000
        self.ok += 1
        return elapsed, raw

    @staticmethod
    def parse(raw: bytes) -> Answer:
        reply = pb.ModelInferResponse.FromString(raw)
        output = reply.outputs[0]
        logits = np.asarray(output.contents.fp32_contents, dtype=np.float32)
        parameters = {
            key: getattr(value, value.WhichOneof("parameter_choice"))
            for key, value in reply.parameters.items()
        }
        return Answer(logits.reshape(list(output.shape)), parameters)

    def close(self) -> None:
        self._channel.close()


Caller = HttpCaller | GrpcCaller


@dataclass(frozen=True)
class Requests:
    """Every request of the benchmark, encoded once."""

    image: np.ndarray
    budget_ms: float

    def http_body(self, routed: bool) -> bytes:
        document: dict[str, Any] = {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "FP32",
                    "shape": list(self.image.shape),
                    "data": self.image.ravel().tolist(),
                }
            ]
        }
        if routed:
            document["parameters"] = {"latency_budget_ms": self.budget_ms}
        return json.dumps(document).encode()

    def grpc_message(self, variant: str | None) -> bytes:
        request = pb.ModelInferRequest(model_name=MODEL, model_version=variant or "")
        tensor = request.inputs.add(name="images", datatype="FP32", shape=list(self.image.shape))
        tensor.contents.fp32_contents.extend(self.image.ravel().tolist())
        if variant is None:
            request.parameters["latency_budget_ms"].double_param = self.budget_ms
        return request.SerializeToString()

    def caller(self, protocol: str, port: int, variant: str | None) -> Caller:
        """Routed with ``variant`` None, else pinned to it."""
        if protocol == "grpc":
            return GrpcCaller(port, self.grpc_message(variant))
        path = f"/v2/models/{MODEL}" + (f"/versions/{variant}" if variant else "") + "/infer"
        return HttpCaller(port, path, self.http_body(routed=variant is None))


# -- latency -----------------------------------------------------------------------------------


@dataclass
class Round:
    samples: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    variants: Counter[str] = field(default_factory=Counter)
    logits: np.ndarray | None = None
    mismatched: int = 0
    """Answers of the expected variant whose logits differ from the round's first."""
    other_variant: int = 0
    """Answers a routed request got from another variant (their logits are not compared)."""
    truncated: bool = False


def digits_repository_to_serve(
    repo: Path | None, reuse: bool, ports: dict[str, int]
) -> Path | None:
    """The benchmark's `digits` repository, once ``ports`` ({what: port}) are known free:
    ``repo`` as it is with ``reuse``, else compressed now (into a temp dir without ``repo``).
    None, with the reason printed, when the run cannot be set up."""
    try:
        for what, port in ports.items():
            check_port_free(port, what)
    except GearboxError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return None
    repo_dir = (repo or Path(tempfile.mkdtemp(prefix="gearbox-bench-"))).resolve()
    if not reuse:
        compress = [GEARBOX, "compress", "--example", MODEL, "--repo", str(repo_dir)]
        if subprocess.run(compress, stdout=subprocess.DEVNULL, check=False).returncode != 0:
            print(f"error: {' '.join(compress)} failed", file=sys.stderr)
            return None
    if MODEL not in ModelRepository(repo_dir).models():
        print(f"error: repository {repo_dir} holds no '{MODEL}' model", file=sys.stderr)
        return None
    return repo_dir


def measure(caller: Caller, warmup: int, requests: int, timeout_s: float, variant: str) -> Round:
    """Untimed warm-up, then ``requests`` sequential timed calls; stops early at the deadline.
    Logits are kept from answers of ``variant`` (the bare server names none: all of them)."""
    deadline = time.monotonic() + timeout_s
    result = Round()
    for _ in range(warmup):
        if time.monotonic() > deadline:
            break
        caller()
    for _ in range(requests):
        if time.monotonic() > deadline:
            result.truncated = True
            break
        elapsed, raw = caller()
        answer = caller.parse(raw)
        result.samples.append(elapsed)
        if "latency_ms" in answer.parameters:
            result.server_ms.append(float(answer.parameters["latency_ms"]))
        answered_by = str(answer.parameters.get("variant", variant))
        if "variant" in answer.parameters:
            result.variants[answered_by] += 1
        if answered_by != variant:
            result.other_variant += 1
        elif result.logits is None:
            result.logits = answer.logits
        elif not np.array_equal(answer.logits, result.logits):
            result.mismatched += 1
    return result


def wait_answering(call: Callable[[], Any], what: str) -> None:
    """Until a route answers (a proxy's route table may lag the deployment)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            call()
            return
        except (GearboxError, grpc.RpcError, OSError, http.client.HTTPException) as error:
            last = error
            time.sleep(0.5)
    raise UnavailableError(f"{what} not answering after {READY_TIMEOUT_S:.0f} s: {last}")


def summarise(rounds: list[Round]) -> dict[str, Any]:
    """One case's rounds pooled: client percentiles, the server's own median, per-round p50."""
    samples = np.concatenate([np.asarray(r.samples, dtype=float) for r in rounds])
    server = np.concatenate([np.asarray(r.server_ms, dtype=float) for r in rounds])
    variants: Counter[str] = Counter()
    for r in rounds:
        variants.update(r.variants)
    kept = [r.logits for r in rounds if r.logits is not None]
    reference = kept[0] if kept else None
    mismatched = sum(r.mismatched for r in rounds) + sum(
        1 for logits in kept[1:] if not np.array_equal(logits, reference)
    )
    p50 = float(np.percentile(samples, 50)) if samples.size else float("nan")
    server_p50 = float(np.median(server)) if server.size else None
    return {
        "requests": int(samples.size),
        "p50_ms": p50,
        "p95_ms": float(np.percentile(samples, 95)) if samples.size else None,
        "p99_ms": float(np.percentile(samples, 99)) if samples.size else None,
        "mean_ms": float(samples.mean()) if samples.size else None,
        "round_p50_ms": [float(np.median(r.samples)) if r.samples else None for r in rounds],
        "server_latency_p50_ms": server_p50,
        "client_minus_server_p50_ms": p50 - server_p50 if server_p50 is not None else None,
        "variants": dict(variants),
        "logits": reference.ravel().tolist() if reference is not None else None,
        "logits_mismatched": mismatched,
        "answered_by_another_variant": sum(r.other_variant for r in rounds),
        "truncated": any(r.truncated for r in rounds),
    }


# -- the bare server and the other peers -------------------------------------------------------


@contextlib.contextmanager
def bare_server(
    repo_dir: Path, variant: str, http_port: int, grpc_port: int, log: Path
) -> Iterator[dict[str, Any]]:
    """The bare server in its own process, for the block; yields its ready line."""
    command = [
        sys.executable, str(PEERS), "bare", "--repo", str(repo_dir), "--variant", variant,
        "--http-port", str(http_port), "--grpc-port", str(grpc_port),
    ]  # fmt: skip
    with log.open("w") as stderr:
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
        )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT_S)
        line = process.stdout.readline() if ready else b""
        if not line:
            raise UnavailableError(f"bare server did not start: {_tail(log)}")
        yield json.loads(line)
    finally:
        assert process.stdin is not None
        process.stdin.close()  # its signal to stop
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_peer(arguments: list[str], timeout_s: float) -> dict[str, Any]:
    """One `load` or `inproc` run of bench/serving_peers.py: its JSON figures."""
    try:
        completed = subprocess.run(
            [sys.executable, str(PEERS), *arguments],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise UnavailableError(f"serving_peers {arguments[0]} ran past {timeout_s:.0f} s") from None
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        raise UnavailableError(
            f"serving_peers {arguments[0]} failed ({completed.returncode}): "
            f"{completed.stderr.strip()[-800:]}"
        )
    return json.loads(lines[-1])


def _tail(path: Path, chars: int = 800) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace").strip()[-chars:] or "(no output)"
    return "(no output)"


# -- the gateway's own counts, from its Prometheus export --------------------------------------


@dataclass
class GatewayCounts:
    """Cumulative counts of the gateway replica(s) as exported at one moment."""

    answered: int = 0
    """Requests answered OK, every variant and protocol."""
    requests: Counter[str] = field(default_factory=Counter)
    batches: Counter[str] = field(default_factory=Counter)
    buckets: dict[str, Counter[str]] = field(default_factory=dict)
    """Per variant: batches with at most ``le`` rows (cumulative, as Prometheus has them)."""


def scrape(urls: tuple[str, ...]) -> GatewayCounts:
    counts = GatewayCounts()
    for url in urls:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples = (s for f in text_string_to_metric_families(text) for s in f.samples)
        for sample in samples:
            labels = sample.labels
            if labels.get("model") != MODEL:
                continue
            variant, value = labels.get("variant", ""), int(sample.value)
            if sample.name == REQUESTS.sample_name and labels.get("code") == "ok":
                counts.answered += value
                counts.requests[variant] += value
            elif sample.name == f"{BATCH_SIZE.name}_count":
                counts.batches[variant] += value
            elif sample.name == f"{BATCH_SIZE.name}_bucket":
                counts.buckets.setdefault(variant, Counter())[labels.get("le", "")] += value
    return counts


def caught_up(urls: tuple[str, ...], answered: int) -> GatewayCounts | None:
    """The exported counts once they include all ``answered`` requests (None if they never do
    within METRICS_CATCH_UP_S): requests and batches are flushed together, so the batch
    counts are then as complete as the request counts."""
    deadline = time.monotonic() + METRICS_CATCH_UP_S
    while urls:
        with contextlib.suppress(OSError, ValueError):
            counts = scrape(urls)
            if counts.answered >= answered:
                return counts
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)
    return None


def batches_formed(
    before: GatewayCounts | None, after: GatewayCounts | None, variant: str
) -> dict[str, Any]:
    """Mean rows per batch of ``variant`` between two snapshots (each request is one row)."""
    if before is None or after is None:
        return {"mean_batch_rows": None, "batches": None, "batch_share_by_rows": {}}
    rows = after.requests[variant] - before.requests[variant]
    batches = after.batches[variant] - before.batches[variant]
    cumulative = {
        le: after.buckets.get(variant, Counter())[le] - before.buckets.get(variant, Counter())[le]
        for le in after.buckets.get(variant, {})
    }
    shares: dict[str, float] = {}
    below, bound = 0, 0
    for le, count in sorted(cumulative.items(), key=lambda item: float(item[0])):
        upper = float(le)
        low = bound + 1
        label = f"{low}+" if le == "+Inf" else f"{low}-{upper:g}" if low < upper else f"{upper:g}"
        if batches > 0 and count - below > 0:
            shares[label] = round((count - below) / batches, 3)
        below, bound = count, int(upper) if le != "+Inf" else bound
    return {
        "mean_batch_rows": rows / batches if batches > 0 else None,
        "batches": batches,
        "batch_share_by_rows": shares,
    }


# -- the benchmark -----------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    repo_dir: Path
    requests: Requests
    work_dir: Path
    answered: int = 0
    """Inference requests Gearbox answered OK, all phases (to know when its export caught up)."""
    metrics_urls: tuple[str, ...] = ()
    rounds: dict[str, list[Round]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def gearbox_phase(self, variant: str, requests: int) -> None:
        for protocol in PROTOCOLS:
            port = self.args.http_port if protocol == "http" else self.args.grpc_port
            for case, version in ((ROUTED, None), (PINNED, variant)):
                caller = self.requests.caller(protocol, port, version)
                self._case(protocol, case, caller, requests, variant)

    def bare_phase(self, variant: str, requests: int) -> None:
        for protocol in PROTOCOLS:
            port = self.args.bare_http_port if protocol == "http" else self.args.bare_grpc_port
            caller = self.requests.caller(protocol, port, variant)
            self._case(protocol, BARE, caller, requests, variant)

    def _case(self, protocol: str, case: str, caller: Caller, requests: int, variant: str) -> None:
        try:
            result = measure(caller, self.args.warmup, requests, self.args.case_timeout_s, variant)
        finally:
            if case != BARE:
                self.answered += caller.ok
            caller.close()
        self.rounds.setdefault(f"{protocol}/{case}", []).append(result)

    def choose_variant(self) -> str:
        """Routed probes over both protocols (waiting for the gRPC route first): the variant
        the router chose most often."""
        chosen: Counter[str] = Counter()
        for protocol in PROTOCOLS:
            port = self.args.http_port if protocol == "http" else self.args.grpc_port
            caller = self.requests.caller(protocol, port, None)
            try:
                wait_answering(caller, f"gearbox over {protocol}")
                for _ in range(CHOICE_PROBES):
                    _, raw = caller()
                    chosen[str(caller.parse(raw).parameters.get("variant"))] += 1
            finally:
                self.answered += caller.ok
                caller.close()
        if len(chosen) > 1:
            self.notes.append(f"routed probes were answered by {dict(chosen)}")
        return chosen.most_common(1)[0][0]

    def latency(self, variant: str) -> dict[str, Any]:
        args = self.args
        log = self.work_dir / "bare-server.log"
        with bare_server(
            self.repo_dir, variant, args.bare_http_port, args.bare_grpc_port, log
        ) as ready:
            if ready.get("sha256") != ready.get("manifest_sha256"):
                raise GearboxError("the bare server's artifact does not match its manifest")
            for index in range(args.rounds):
                count = args.requests // args.rounds + (index < args.requests % args.rounds)
                phases = [self.gearbox_phase, self.bare_phase]
                for phase in phases if index % 2 == 0 else phases[::-1]:
                    phase(variant, count)
        return {key: summarise(rounds) for key, rounds in self.rounds.items()}

    def plane(self, variant: str) -> dict[str, Any] | None:
        """Gearbox's adapters and data plane (and the bare server's converters) timed in one
        process without any server: what the code costs, apart from what serves it."""
        bodies = self.work_dir / "bodies"
        bodies.mkdir(exist_ok=True)
        (bodies / "http-routed.json").write_bytes(self.requests.http_body(routed=True))
        (bodies / "http-pinned.json").write_bytes(self.requests.http_body(routed=False))
        (bodies / "grpc-routed.bin").write_bytes(self.requests.grpc_message(None))
        (bodies / "grpc-pinned.bin").write_bytes(self.requests.grpc_message(variant))
        arguments = [
            "plane", "--repo", str(self.repo_dir), "--variant", variant,
            "--bodies", str(bodies), "--warmup", str(self.args.warmup),
            "--requests", str(self.args.requests), "--timeout-s", str(self.args.case_timeout_s),
        ]  # fmt: skip
        try:
            return run_peer(arguments, self.args.case_timeout_s + 120)
        except GearboxError as error:  # a diagnostic: its failure costs only its figures
            self.notes.append(f"the in-process breakdown failed: {error.message}")
            return None

    def throughput(self, variant: str, before: GatewayCounts | None) -> dict[str, Any]:
        """Gearbox pinned to ``variant`` under closed-loop load, then the in-process ceiling."""
        args = self.args
        body = self.work_dir / f"body-{variant}.json"
        body.write_bytes(self.requests.http_body(routed=False))
        timing = [
            "--concurrency", str(args.concurrency),
            "--warmup-s", str(args.throughput_warmup_s),
            "--duration-s", str(args.throughput_s),
            "--max-requests", str(args.max_load_requests),
        ]  # fmt: skip
        limit_s = args.throughput_warmup_s + args.throughput_s + 120
        path = f"/v2/models/{MODEL}/versions/{variant}/infer"
        target = [
            "--port", str(args.http_port),
            "--path", path,
            "--body", str(body), "--root-pid", str(os.getpid()),
        ]  # fmt: skip
        profile = ["--profile-s", str(args.profile_s)] if args.profile_s > 0 else []
        load = run_peer(["load", *target, *timing, *profile], limit_s + args.profile_s)
        self.answered += int(load["ok_total"])
        # The in-process run also gives the gateway's metrics export time to catch up.
        inproc = run_peer(
            ["inproc", "--repo", str(self.repo_dir), "--variant", variant, *timing], limit_s
        )
        after = caught_up(self.metrics_urls, self.answered)
        gateway = {**load, **batches_formed(before, after, variant)}
        ratio = gateway["requests_per_s"] / max(inproc["requests_per_s"], 1e-9)
        # What any HTTP server in front of this session reaches here: the bare one, which
        # has no Ray, no routing and no batching, under the same load.
        log = self.work_dir / f"bare-throughput-{variant}.log"
        with bare_server(self.repo_dir, variant, args.bare_http_port, args.bare_grpc_port, log):
            bare = run_peer(
                ["load", "--port", str(args.bare_http_port), "--path", path,
                 "--body", str(body), *timing],
                limit_s,
            )  # fmt: skip
        return {
            "gearbox": gateway,
            "in_process": inproc,
            "bare": bare,
            "ratio": ratio,
            "bare_ratio": bare["requests_per_s"] / max(inproc["requests_per_s"], 1e-9),
            "_after": after,
        }


# -- reporting ---------------------------------------------------------------------------------


def _ms(value: float | None, width: int = 7) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"


def latency_table(results: dict[str, dict[str, Any]], rounds: int) -> list[str]:
    header = (
        f"{'protocol':<8} {'case':<15} {'p50':>7} {'p95':>7} {'p99':>7} "
        f"{'srv p50':>8} {'cli-srv':>8} {'n':>6}"
    )
    header += "  p50 per round" if rounds > 1 else ""
    lines = [header, "-" * len(header)]
    for protocol in PROTOCOLS:
        for case in CASES:
            row = results[f"{protocol}/{case}"]
            per_round = " ".join(f"{p:.2f}" for p in row["round_p50_ms"] if p is not None)
            lines.append(
                f"{protocol:<8} {case:<15} {_ms(row['p50_ms'])} {_ms(row['p95_ms'])} "
                f"{_ms(row['p99_ms'])} {_ms(row['server_latency_p50_ms'], 8)} "
                f"{_ms(row['client_minus_server_p50_ms'], 8)} {row['requests']:>6}"
                + (f"  {per_round}" if rounds > 1 else "")
            )
    return lines


def breakdown_table(
    latency: dict[str, dict[str, Any]], plane: dict[str, dict[str, Any]]
) -> tuple[list[str], dict[str, dict[str, float | None]]]:
    """Where each case's client p50 goes (differences of medians, so indicative only)."""
    header = (
        f"{'protocol':<8} {'case':<15} {'client':>7} {'outside':>8} {'span':>7} "
        f"{'code':>7} {'server':>7}"
    )
    lines = [header, "-" * len(header)]
    figures: dict[str, dict[str, float | None]] = {}
    for protocol in PROTOCOLS:
        for case in CASES:
            key = f"{protocol}/{case}"
            row, code = latency[key], plane.get(key, {}).get("p50")
            client, span = row["p50_ms"], row["server_latency_p50_ms"]
            outside = client - span if span is not None else None
            around = (span if span is not None else client) - code if code is not None else None
            figures[key] = {
                "client_p50_ms": client,
                "outside_span_ms": outside,
                "span_ms": span,
                "code_alone_ms": code,
                "server_around_code_ms": around,
            }
            lines.append(
                f"{protocol:<8} {case:<15} {_ms(client)} {_ms(outside, 8)} {_ms(span)} "
                f"{_ms(code)} {_ms(around)}"
            )
    return lines, figures


def throughput_lines(variant: str, figures: dict[str, Any]) -> list[str]:
    gateway, inproc = figures["gearbox"], figures["in_process"]

    def rows(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "n/a"

    lines = [
        f"{variant:<10} {gateway['requests_per_s']:>10.0f} {inproc['requests_per_s']:>12.0f} "
        f"{figures['ratio']:>6.2f}x  mean batch rows: gearbox {rows(gateway['mean_batch_rows'])}"
        f", in-process {rows(inproc['mean_batch_rows'])}"
    ]
    shares = " ".join(f"{k}:{v:.0%}" for k, v in gateway["batch_share_by_rows"].items())
    lines.append(
        f"{'':<10} gearbox: client p50 {_ms(gateway['client_ms']['p50'], 0)} ms, "
        f"latency_ms p50 {_ms(gateway['server_latency_ms']['p50'], 0)} ms, "
        f"errors {sum(gateway['errors'].values())}; share of batches by rows {shares or 'n/a'}"
    )
    bare = figures.get("bare")
    if bare:
        lines.append(
            f"{'':<10} bare server (uvicorn, the session inline, no Ray): "
            f"{bare['requests_per_s']:.0f}/s, {figures['bare_ratio']:.2f}x in-process (Gearbox "
            f"{gateway['requests_per_s'] / max(bare['requests_per_s'], 1e-9):.2f}x the bare "
            f"server), client p50 {_ms(bare['client_ms']['p50'], 0)} ms, errors "
            f"{sum(bare['errors'].values())}"
        )
    lines.append(
        f"{'':<10} in-process: p50 {_ms(inproc['client_ms']['p50'], 0)} ms, "
        f"{inproc['inline_batches']}/{inproc['batches']} batches inline "
        f"(worker hop {inproc['hop_ms']:.3f} ms), {inproc['process_cpu_cores']:.2f} cores"
    )
    split = gateway["cpu_cores"]
    if split:
        lines.append(
            f"{'':<10} cores used under load: "
            + ", ".join(f"{name} {cores:.2f}" for name, cores in split.items())
            + f" (of {os.cpu_count()})"
        )
    profile = gateway.get("replica_profile")
    if profile:
        lines += [f"{'':<10} {line}" for line in replica_lines(profile, inproc["requests_per_s"])]
    return lines


FRAMEWORK_OWNERS = ("Ray Serve", "Ray", "uvicorn and Starlette")
"""The event loop's owners that are the serving framework, not Gearbox or the model."""


def replica_lines(profile: dict[str, Any], in_process_rps: float) -> list[str]:
    """What the py-spy profile of the replica says: where its event loop's time goes per
    request, and the rate the framework's share alone would allow one replica."""
    if "error" in profile:
        return [f"replica profile: {profile['error']}"]
    rps = profile["requests_per_s"]
    loop = profile["event_loop"]
    if not rps or not loop:
        return ["replica profile: no samples of the event loop"]
    per_request = {owner: share * 1000 / rps for owner, share in loop.items()}
    threads = ", ".join(
        f"{name} {share:.0%}" for name, share in profile["threads"].items() if share >= 0.02
    )
    lines = [
        f"replica event loop (py-spy, {rps:.0f} req/s): busy {sum(loop.values()):.0%}, per "
        "request " + ", ".join(f"{owner} {ms:.3f} ms" for owner, ms in per_request.items()),
        f"replica threads busy: {threads}",
    ]
    framework_ms = sum(per_request.get(owner, 0.0) for owner in FRAMEWORK_OWNERS)
    if framework_ms > 0:
        ceiling = 1000 / framework_ms
        lines.append(
            f"the framework's {framework_ms:.3f} ms per request alone caps one replica's event "
            f"loop at {ceiling:.0f} req/s ({ceiling / max(in_process_rps, 1e-9):.2f}x in-process)"
        )
    return lines


# -- main --------------------------------------------------------------------------------------


def _ingress(text: str) -> Ingress:
    try:
        return Ingress.parse(text)
    except GearboxError as error:
        raise argparse.ArgumentTypeError(error.message) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, help="repository to use (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="skip compression, serve --repo")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument(
        "--ingress", type=_ingress, default=Ingress.HAPROXY, metavar="haproxy|proxy",
        help="what fronts the gateway (default haproxy, as `gearbox serve`)",
    )  # fmt: skip
    parser.add_argument("--http-port", type=int, default=18000)
    parser.add_argument("--grpc-port", type=int, default=19000)
    parser.add_argument("--metrics-port", type=int, default=18080)
    parser.add_argument("--bare-http-port", type=int, default=18100)
    parser.add_argument("--bare-grpc-port", type=int, default=19100)
    parser.add_argument("--budget-ms", type=float, default=50.0, help="routed latency budget")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls per case/round")
    parser.add_argument("--requests", type=int, default=2000, help="timed calls per case")
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="alternate Gearbox and bare this many times, splitting --requests between them",
    )  # fmt: skip
    parser.add_argument(
        "--case-timeout-s", type=float, default=180.0, help="time bound of one case's round"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    parser.add_argument(
        "--no-priority-lane", dest="priority_lane", action="store_false",
        help="serve without the priority lane, as gearbox serve --no-priority-lane",
    )  # fmt: skip
    parser.add_argument(
        "--throughput-s", type=float, default=10.0, help="counted window (0 skips throughput)"
    )
    parser.add_argument("--throughput-warmup-s", type=float, default=2.0)
    parser.add_argument(
        "--profile-s", type=float, default=5.0,
        help="after each counted throughput window, profile the gateway replica with py-spy "
        "this long, still under load (0: no profile)",
    )  # fmt: skip
    parser.add_argument(
        "--max-load-requests", type=int, default=1_000_000, help="count bound of one load run"
    )
    return parser


@dataclass
class Results:
    """Everything one run measured."""

    ingress: str
    variant: str
    latency: dict[str, dict[str, Any]]
    plane: dict[str, dict[str, Any]] | None
    throughput: dict[str, dict[str, Any]]
    notes: list[str]


def run(args: argparse.Namespace, repo_dir: Path, image: np.ndarray) -> Results:
    """Deploys Gearbox as `gearbox serve` does, measures, and shuts Serve and Ray down."""
    throughput: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gbx-bench-")))
        state_dir = session_state_dir() if args.ingress is Ingress.HAPROXY else None
        if state_dir is not None:
            stack.callback(shutil.rmtree, state_dir, ignore_errors=True)
        bench = Bench(args, repo_dir, Requests(image, args.budget_ms), work_dir)
        stack.enter_context(ray_session(None, env=ray_environment(args.ingress, state_dir)))
        stack.callback(serve.shutdown)
        config = GatewayConfig.create(
            repo_dir,
            batching=BatchingConfig(priority_lane=args.priority_lane),
            metrics_port=args.metrics_port,
        )
        stack.callback(shutil.rmtree, config.metrics_directory, ignore_errors=True)
        endpoints = start_gateway(config, args.http_port, args.grpc_port)
        bench.metrics_urls = endpoints.metrics
        variant = bench.choose_variant()
        latency = bench.latency(variant)
        plane = bench.plane(variant)
        if args.throughput_s > 0:
            snapshot = caught_up(bench.metrics_urls, bench.answered)
            for name in dict.fromkeys((variant, REFERENCE)):
                figures = bench.throughput(name, snapshot)
                snapshot = figures.pop("_after")
                throughput[name] = figures
    for protocol in PROTOCOLS:
        used = latency[f"{protocol}/{ROUTED}"]["variants"]
        if set(used) != {variant}:
            bench.notes.append(f"routed over {protocol} answered by {used}")
        if any(latency[f"{protocol}/{case}"]["truncated"] for case in CASES):
            bench.notes.append(f"{protocol}: a case hit --case-timeout-s and was cut short")
    return Results(endpoints.ingress.value, variant, latency, plane, throughput, bench.notes)


Check = tuple[str, bool, str]


def checks_of(results: Results) -> list[Check]:
    checks: list[Check] = []
    for protocol in PROTOCOLS:
        bare = results.latency[f"{protocol}/{BARE}"]
        reference = np.asarray(bare["logits"])
        for case in (ROUTED, PINNED):
            row = results.latency[f"{protocol}/{case}"]
            overhead = row["p50_ms"] - bare["p50_ms"]
            checks.append(
                (
                    f"{protocol} {case} p50 - bare p50 <= {MAX_P50_OVERHEAD_MS:g} ms",
                    bool(overhead <= MAX_P50_OVERHEAD_MS),
                    f"{overhead:+.3f} ms",
                )
            )
            logits = np.asarray(row["logits"])
            same_shape = logits.shape == reference.shape
            difference = float(np.abs(logits - reference).max()) if same_shape else float("inf")
            identical = same_shape and bool(np.array_equal(logits, reference))
            checks.append(
                (
                    f"{protocol} {case} logits identical to bare",
                    identical and row["logits_mismatched"] == 0,
                    f"max |diff| {difference:.1e}, {row['logits_mismatched']} differing answers"
                    + (
                        f" ({row['answered_by_another_variant']} by another variant, not compared)"
                        if row["answered_by_another_variant"]
                        else ""
                    ),
                )
            )
    for name, figures in results.throughput.items():
        gateway = figures["gearbox"]
        failed = sum(gateway["errors"].values()) + len(gateway["connection_failures"])
        checks.append(
            (
                f"throughput {name}: gearbox >= {MIN_THROUGHPUT_RATIO:g}x in-process, no errors",
                figures["ratio"] >= MIN_THROUGHPUT_RATIO and failed == 0,
                f"{figures['ratio']:.2f}x, {failed} failed",
            )
        )
    return checks


def report(
    args: argparse.Namespace, results: Results, checks: list[Check], label: int | None
) -> dict[str, dict[str, float | None]]:
    """Prints the tables; returns the latency breakdown (for the JSON)."""
    print(
        f"Gearbox serving benchmark: digits, one held-out image (label {label}), batch 1; "
        f"ingress {results.ingress}; {os.cpu_count()} cores"
    )
    print(
        f"router chose '{results.variant}' at latency_budget_ms={args.budget_ms:g}; "
        f"{args.rounds} round(s) alternating Gearbox and bare; {args.warmup} warm-up calls per "
        f"case and round, {args.requests} timed calls per case"
    )
    print()
    print("latency, ms at the client (srv p50: median latency_ms the gateway reports)")
    print("\n".join(latency_table(results.latency, args.rounds)))
    breakdown: dict[str, dict[str, float | None]] = {}
    if results.plane is not None:
        lines, breakdown = breakdown_table(results.latency, results.plane)
        print()
        print("where the p50 goes, ms (differences of medians):")
        print(
            "  gearbox: client = outside (ingress, transport, server before the clock) + span "
            "(latency_ms);"
        )
        print(
            "           span = code (adapter + data plane + session, timed in-process without "
            "a server) + server (Ray Serve's replica path)"
        )
        print("  bare:    client = code (converters + session) + server (uvicorn or grpc.aio, "
              "transport)")  # fmt: skip
        print("\n".join(lines))
    if results.throughput:
        print()
        print(
            f"throughput, HTTP, {args.concurrency} closed-loop clients, {args.throughput_s:g} s "
            f"after {args.throughput_warmup_s:g} s warm-up: gearbox pinned vs the same executor "
            "in-process"
        )
        print(f"{'variant':<10} {'gearbox/s':>10} {'in-process/s':>12} {'ratio':>7}")
        for name, figures in results.throughput.items():
            print("\n".join(throughput_lines(name, figures)))
    for note in results.notes:
        print(f"note: {note}")
    print()
    for name, ok, figure in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<60} {figure}")
    return breakdown


def main() -> int:
    parser = _parser()
    args = parser.parse_args()
    if args.reuse and args.repo is None:
        parser.error("--reuse needs --repo")
    if args.rounds < 1 or args.requests < args.rounds or args.warmup < 0:
        parser.error("need --rounds >= 1, --requests >= --rounds and --warmup >= 0")
    if args.concurrency < 1 or args.throughput_s < 0 or args.throughput_warmup_s < 0:
        parser.error("need --concurrency >= 1 and non-negative durations")
    ports = {"http": args.http_port, "grpc": args.grpc_port,
             "bare-http": args.bare_http_port, "bare-grpc": args.bare_grpc_port}  # fmt: skip
    repo_dir = digits_repository_to_serve(args.repo, args.reuse, ports)
    if repo_dir is None:
        return 2
    heldout = load_splits().heldout
    image = np.ascontiguousarray(heldout.inputs["images"][:1], dtype=np.float32)
    label = int(heldout.labels[0]) if heldout.labels is not None else None

    # SIGTERM unwinds like Ctrl-C, so that Serve and Ray are always shut down.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        results = run(args, repo_dir, image)
    except (GearboxError, grpc.RpcError, OSError, http.client.HTTPException) as error:
        message = error.message if isinstance(error, GearboxError) else repr(error)
        print(f"FAIL  the run stopped: {message}", file=sys.stderr)
        return 1
    elapsed_s = time.monotonic() - started
    load_after = os.getloadavg()[0]

    checks = checks_of(results)
    breakdown = report(args, results, checks, label)
    print(f"({elapsed_s:.0f} s; 1-min load average {load_before:.2f} -> {load_after:.2f})")
    if args.json:
        document = {
            "repository": str(repo_dir),
            "ingress": results.ingress,
            "budget_ms": args.budget_ms,
            "variant": results.variant,
            "label": label,
            "warmup": args.warmup,
            "requests": args.requests,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "throughput_s": args.throughput_s,
            "throughput_warmup_s": args.throughput_warmup_s,
            "cpu_count": os.cpu_count(),
            "load_average": [load_before, load_after],
            "seconds": elapsed_s,
            "latency": results.latency,
            "in_process_code_ms": results.plane,
            "latency_breakdown": breakdown,
            "throughput": results.throughput,
            "notes": results.notes,
            "checks": [{"check": name, "pass": ok, "figure": fig} for name, ok, fig in checks],
        }
        args.json.write_text(json.dumps(document, indent=2))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
