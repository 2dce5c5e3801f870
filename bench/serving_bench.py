"""Benchmark of the serving overhead: Gearbox against a minimal Ray Serve deployment.

    .venv/bin/python bench/serving_bench.py [--repo DIR] [--reuse] [--json PATH]
        [--http-port 18000] [--grpc-port 19000] [--budget-ms 50]
        [--warmup 200] [--requests 2000] [--rounds 5]

1. Uses the `digits` repository at --repo with --reuse; otherwise runs
   `gearbox compress --example digits --repo DIR` first (a temp dir by default).
2. Starts one local Ray and Ray Serve once (HTTP and gRPC proxies on loopback), then runs two
   phases one after another, so that only one Serve application is up at a time and plain
   clients need no application metadata:
   - Gearbox: the gateway as `gearbox serve` deploys it (cpu device class: 1 CPU, 1 intra-op
     thread). Batch-1 requests of one held-out digits image, (a) routed: model `digits`, no
     version, parameter `latency_budget_ms` (--budget-ms); (b) pinned: `model_version` set to
     the variant the router chose in (a), no parameters.
   - Minimal: a bare Ray Serve deployment (1 CPU) that loads the same verified artifact into
     the same ONNX Runtime session (`CPU.create_session`) and answers the same OIP wire
     format (JSON over HTTP, typed `fp32_contents` over gRPC), and nothing else.
3. Per case: --warmup requests, then --requests sequential requests from one keep-alive
   HTTP connection or one gRPC channel, timed client-side; prints p50/p99 per protocol and
   checks, per protocol, that the Gearbox p50 (routed and pinned) is at most 1.0 ms above the
   minimal deployment's p50, and that Gearbox and the minimal deployment return the same
   logits for the benchmark image. Exits 1 on any FAIL.

On a small, shared machine a whole request through Ray Serve's proxies costs several ms and
drifts by more than the 1 ms margin over minutes; --rounds N alternates the two phases N
times (--requests split between them, samples pooled) so that drift hits both alike.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from ray import serve
from ray.serve.config import HTTPOptions, ProxyLocation, gRPCOptions
from starlette.requests import Request
from starlette.responses import Response

from gearbox.compression import CPU, ModelRepository
from gearbox.compression.errors import GearboxError, UnavailableError
from gearbox.compression.examples.digits import load_splits
from gearbox.compression.pipeline import ray_session
from gearbox.serving.app import GRPC_SERVICER
from gearbox.serving.config import APP_NAME, GatewayConfig
from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from gearbox.serving.server import LOOPBACK, check_port_free, start_gateway

GEARBOX = str(Path(sys.executable).with_name("gearbox"))
MODEL = "digits"
MINIMAL_APP = "minimal"
MAX_P50_OVERHEAD_MS = 1.0
READY_TIMEOUT_S = 120.0
PROTOCOLS = ("http", "grpc")
CASES = ("gearbox routed", "gearbox pinned", "minimal")


@serve.deployment
class Minimal:
    """The honest minimum: the same ORT session, the same input, the same wire format."""

    def __init__(self, artifact: bytes, variant: str) -> None:
        self._session = CPU.create_session(artifact)
        self._input = self._session.get_inputs()[0].name
        self._outputs = [output.name for output in self._session.get_outputs()]
        self._variant = variant

    def _run(self, array: np.ndarray) -> list[np.ndarray]:
        return self._session.run(self._outputs, {self._input: array})

    async def __call__(self, request: Request) -> Response:
        document = json.loads(await request.body())
        tensor = document["inputs"][0]
        array = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        results = self._run(array)
        body = {
            "model_name": MODEL,
            "model_version": self._variant,
            "outputs": [
                {
                    "name": name,
                    "datatype": "FP32",
                    "shape": list(result.shape),
                    "data": result.ravel().tolist(),
                }
                for name, result in zip(self._outputs, results, strict=True)
            ],
        }
        return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")

    async def ModelInfer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        tensor = request.inputs[0]
        array = np.asarray(tensor.contents.fp32_contents, dtype=np.float32).reshape(
            list(tensor.shape)
        )
        results = self._run(array)
        reply = pb.ModelInferResponse(model_name=MODEL, model_version=self._variant)
        for name, result in zip(self._outputs, results, strict=True):
            output = reply.outputs.add(name=name, datatype="FP32", shape=list(result.shape))
            output.contents.fp32_contents.extend(result.ravel().tolist())
        return reply


class Client:
    """One keep-alive HTTP connection and one gRPC channel; each call returns
    (client-side ms, logits, response parameters)."""

    def __init__(self, http_port: int, grpc_port: int, image: np.ndarray) -> None:
        self._http = http.client.HTTPConnection(LOOPBACK, http_port, timeout=30)
        self._channel = grpc.insecure_channel(f"{LOOPBACK}:{grpc_port}")
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._image = image

    def http_call(
        self, version: str | None, parameters: dict[str, float]
    ) -> Callable[[], tuple[float, np.ndarray, dict[str, Any]]]:
        document: dict[str, Any] = {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "FP32",
                    "shape": list(self._image.shape),
                    "data": self._image.ravel().tolist(),
                }
            ]
        }
        if parameters:
            document["parameters"] = parameters
        body = json.dumps(document).encode()
        path = f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/infer"
        headers = {"content-type": "application/json"}

        def call() -> tuple[float, np.ndarray, dict[str, Any]]:
            started = time.perf_counter()
            self._http.request("POST", path, body, headers)
            response = self._http.getresponse()
            raw = response.read()
            elapsed = (time.perf_counter() - started) * 1000
            if response.status != 200:
                raise UnavailableError(f"HTTP {response.status} from {path}: {raw[:300]!r}")
            payload = json.loads(raw)
            output = payload["outputs"][0]
            logits = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
            return elapsed, logits, payload.get("parameters", {})

        return call

    def grpc_call(
        self, version: str | None, parameters: dict[str, float]
    ) -> Callable[[], tuple[float, np.ndarray, dict[str, Any]]]:
        request = pb.ModelInferRequest(model_name=MODEL, model_version=version or "")
        tensor = request.inputs.add(name="images", datatype="FP32", shape=list(self._image.shape))
        tensor.contents.fp32_contents.extend(self._image.ravel().tolist())
        for key, value in parameters.items():
            request.parameters[key].double_param = value

        def call() -> tuple[float, np.ndarray, dict[str, Any]]:
            started = time.perf_counter()
            reply = self._stub.ModelInfer(request, timeout=30)
            elapsed = (time.perf_counter() - started) * 1000
            output = reply.outputs[0]
            logits = np.asarray(output.contents.fp32_contents, dtype=np.float32).reshape(
                list(output.shape)
            )
            params = {
                k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in reply.parameters.items()
            }
            return elapsed, logits, params

        return call

    def call(
        self, protocol: str, version: str | None = None, parameters: dict[str, float] | None = None
    ) -> Callable[[], tuple[float, np.ndarray, dict[str, Any]]]:
        make = self.http_call if protocol == "http" else self.grpc_call
        return make(version, parameters or {})

    def close(self) -> None:
        self._http.close()
        self._channel.close()


def wait_answering(call: Callable[[], Any], what: str) -> None:
    """Until the proxy routes to the freshly deployed application (route tables lag)."""
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


def measure(
    call: Callable[[], tuple[float, np.ndarray, dict[str, Any]]], warmup: int, requests: int
) -> dict[str, Any]:
    """One round of one case: untimed warm-up, then ``requests`` sequential timed calls."""
    for _ in range(warmup):
        call()
    samples = []
    variants: Counter[str] = Counter()
    logits = None
    for _ in range(requests):
        elapsed, logits, parameters = call()
        samples.append(elapsed)
        if "variant" in parameters:
            variants[str(parameters["variant"])] += 1
    return {"samples": samples, "variants": variants, "logits": logits}


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Pools one case's rounds: p50/p99 over every sample, plus each round's own p50."""
    samples = np.concatenate([np.asarray(r["samples"]) for r in rounds])
    variants: Counter[str] = Counter()
    for r in rounds:
        variants.update(r["variants"])
    return {
        "p50_ms": float(np.percentile(samples, 50)),
        "p99_ms": float(np.percentile(samples, 99)),
        "mean_ms": float(samples.mean()),
        "requests": int(samples.size),
        "round_p50_ms": [float(np.percentile(r["samples"], 50)) for r in rounds],
        "variants": dict(variants),
        "logits": rounds[-1]["logits"].ravel().tolist(),
    }


def phase_gearbox(
    repo_dir: Path,
    client: Client,
    args: argparse.Namespace,
    requests: int,
    variant: str | None,
) -> tuple[dict[str, dict[str, Any]], str]:
    """One round of Gearbox; the first round's routed case picks ``variant`` for the rest."""
    start_gateway(GatewayConfig.create(repo_dir), args.http_port, args.grpc_port)
    budget = {"latency_budget_ms": args.budget_ms}
    results: dict[str, dict[str, Any]] = {}
    try:
        for protocol in PROTOCOLS:
            call = client.call(protocol, parameters=budget)
            wait_answering(call, f"gearbox over {protocol}")
            results[f"{protocol}/gearbox routed"] = measure(call, args.warmup, requests)
        if variant is None:
            # The routed case decides which variant the pinned and the minimal cases run.
            chosen: Counter[str] = Counter()
            for protocol in PROTOCOLS:
                chosen.update(results[f"{protocol}/gearbox routed"]["variants"])
            variant = chosen.most_common(1)[0][0]
        for protocol in PROTOCOLS:
            call = client.call(protocol, version=variant)
            results[f"{protocol}/gearbox pinned"] = measure(call, args.warmup, requests)
    finally:
        serve.delete(APP_NAME)
    return results, variant


def phase_minimal(
    artifact: bytes, variant: str, client: Client, args: argparse.Namespace, requests: int
) -> dict[str, dict[str, Any]]:
    app = Minimal.options(ray_actor_options={"num_cpus": 1}).bind(artifact, variant)
    serve.run(app, name=MINIMAL_APP, route_prefix="/", blocking=False)
    results: dict[str, dict[str, Any]] = {}
    try:
        for protocol in PROTOCOLS:
            call = client.call(protocol)
            wait_answering(call, f"minimal over {protocol}")
            results[f"{protocol}/minimal"] = measure(call, args.warmup, requests)
    finally:
        serve.delete(MINIMAL_APP)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, help="repository to use (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="skip compression, serve --repo")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--http-port", type=int, default=18000)
    parser.add_argument("--grpc-port", type=int, default=19000)
    parser.add_argument("--budget-ms", type=float, default=50.0, help="routed latency budget")
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests per case")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per case")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="alternate the Gearbox and minimal phases this many times, splitting --requests "
        "between the rounds, so that slow drift of a busy machine hits both alike",
    )
    args = parser.parse_args()
    if args.reuse and args.repo is None:
        parser.error("--reuse needs --repo")
    if args.rounds < 1 or args.requests < args.rounds or args.warmup < 0:
        parser.error("need --rounds >= 1, --requests >= --rounds and --warmup >= 0")
    repo_dir = args.repo or Path(tempfile.mkdtemp(prefix="gearbox-bench-"))

    try:
        check_port_free(args.http_port, "http")
        check_port_free(args.grpc_port, "grpc")
    except GearboxError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2

    if not args.reuse:
        subprocess.run(
            [GEARBOX, "compress", "--example", MODEL, "--repo", str(repo_dir)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    repo = ModelRepository(repo_dir)
    heldout = load_splits().heldout
    image = np.ascontiguousarray(heldout.inputs["images"][:1], dtype=np.float32)
    label = int(heldout.labels[0]) if heldout.labels is not None else None

    rounds: dict[str, list[dict[str, Any]]] = {}
    variant: str | None = None
    with ray_session(None):
        serve.start(
            proxy_location=ProxyLocation.HeadOnly,
            http_options=HTTPOptions(host=LOOPBACK, port=args.http_port),
            grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=[GRPC_SERVICER]),
        )
        client = Client(args.http_port, args.grpc_port, image)
        try:
            for index in range(args.rounds):
                requests = args.requests // args.rounds + (index < args.requests % args.rounds)
                gearbox, variant = phase_gearbox(repo_dir, client, args, requests, variant)
                # The same bytes Gearbox loaded, verified against the manifest's sha256.
                artifact = repo.read_artifact(repo.manifest(MODEL, variant))
                minimal = phase_minimal(artifact, variant, client, args, requests)
                for key, result in {**gearbox, **minimal}.items():
                    rounds.setdefault(key, []).append(result)
        finally:
            client.close()
            serve.shutdown()
    results = {key: summarise(case_rounds) for key, case_rounds in rounds.items()}

    print(
        f"digits batch 1, one held-out image (label {label}); repository {repo_dir}; "
        f"{args.warmup} warm-up + {args.requests} timed sequential requests per case, "
        f"{args.rounds} round(s) of Gearbox then minimal"
    )
    print(f"routed with latency_budget_ms={args.budget_ms:g}: router chose '{variant}'")
    for protocol in PROTOCOLS:
        used = results[f"{protocol}/gearbox routed"]["variants"]
        if set(used) != {variant}:
            print(f"note: routed over {protocol} answered by {used}")
    header = f"{'protocol':<9} {'case':<15} {'variant':<10} {'p50 ms':>8} {'p99 ms':>8}"
    header += "   p50 per round" if args.rounds > 1 else ""
    print(header)
    print("-" * len(header))
    for protocol in PROTOCOLS:
        for case in CASES:
            row = results[f"{protocol}/{case}"]
            per_round = " ".join(f"{p50:.2f}" for p50 in row["round_p50_ms"])
            print(
                f"{protocol:<9} {case:<15} {variant:<10} "
                f"{row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f}"
                + (f"   {per_round}" if args.rounds > 1 else "")
            )

    checks = []
    for protocol in PROTOCOLS:
        minimal = results[f"{protocol}/minimal"]
        reference = np.asarray(minimal["logits"])
        for case in ("gearbox routed", "gearbox pinned"):
            row = results[f"{protocol}/{case}"]
            overhead = row["p50_ms"] - minimal["p50_ms"]
            checks.append(
                (
                    f"{protocol} {case} p50 - minimal p50 <= {MAX_P50_OVERHEAD_MS:g} ms",
                    overhead <= MAX_P50_OVERHEAD_MS,
                    f"{overhead:+.3f} ms",
                )
            )
            logits = np.asarray(row["logits"])
            difference = float(np.abs(logits - reference).max())
            checks.append(
                (
                    f"{protocol} {case} logits == minimal logits",
                    logits.shape == reference.shape and bool(np.allclose(logits, reference)),
                    f"max |diff| {difference:.2e}",
                )
            )
    print()
    for name, ok, figure in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<48} {figure}")

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "repository": str(repo_dir),
                    "budget_ms": args.budget_ms,
                    "variant": variant,
                    "label": label,
                    "warmup": args.warmup,
                    "requests": args.requests,
                    "rounds": args.rounds,
                    "results": results,
                    "checks": [
                        {"check": name, "pass": ok, "figure": figure} for name, ok, figure in checks
                    ],
                },
                indent=2,
            )
        )
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
