"""The processes bench/serving_bench.py starts beside itself, one subcommand each.

    python bench/serving_peers.py bare --repo DIR --variant V --http-port P --grpc-port P
    python bench/serving_peers.py load --port P --path PATH --body FILE [--concurrency 16]
        [--warmup-s 2] [--duration-s 10] [--max-requests N] [--root-pid PID [--profile-s S]]
    python bench/serving_peers.py inproc --repo DIR --variant V [--concurrency 16]
        [--warmup-s 2] [--duration-s 10] [--max-requests N]

``bare``: the baseline server. One asyncio process (uvloop, as Ray workers use) with uvicorn +
Starlette for HTTP and ``grpc.aio`` for gRPC, bound to 127.0.0.1. It loads the variant's artifact
through ``ModelRepository.read_artifact`` (sha256-verified) into ``CPU.create_session`` and
answers ``ModelInfer`` through Gearbox's own converters (``decode_infer_request`` /
``encode_infer_response``, ``request_from_proto`` / ``response_to_proto``), running the session
inline on the event loop: no routing, no batching, no Ray. It prints one JSON line once both
servers listen and serves until its stdin closes (or SIGTERM).

``load``: a closed-loop HTTP load generator: ``--concurrency`` keep-alive connections on one
uvloop event loop, each sending the same pre-encoded request as soon as its previous answer is
in, for ``--warmup-s`` (discarded) then ``--duration-s`` (counted). It reads each answer's
``latency_ms`` parameter with a regular expression (no JSON decoding) and, with
``--root-pid``, samples every process's CPU time over the counted window from /proc. With
``--profile-s`` too, the load goes on that long after the counted window while py-spy samples
the gateway replica: how busy each of its threads was, and which code (Gearbox's, Ray Serve's,
uvicorn's, ONNX Runtime run inline) kept its event loop busy.

``inproc``: the in-process ceiling. The gateway's own cpu backend (``LocalBackend``: the same
sessions, ``ServiceTimes`` seeded from the manifests and calibrated, the same
``DeviceExecutor`` with the gateway's ``BatchingConfig`` and one worker, the same worker-hop
measurement) driven by ``--concurrency`` asyncio tasks that each submit the same single-row
request as soon as their previous one is answered.

``load`` and ``inproc`` print one JSON line of figures and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODEL = "digits"
LOOPBACK = "127.0.0.1"
DRAIN_TIMEOUT_S = 30.0
"""How long a closed loop waits for the requests in flight when its time is up."""
LATENCY_MS = re.compile(rb'"latency_ms":([0-9.eE+-]+)')


def _percentiles(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": statistics.median(ordered), "p95": at(0.95), "p99": at(0.99)}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop where installed, as in Ray's workers (and so in the gateway replica)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


# -- bare: the baseline server -----------------------------------------------------------------


def bare_inference(repo: str, variant: str) -> tuple[Callable[[Any], Any], bytes, str]:
    """The bare server's whole inference: the variant's artifact, read and sha256-verified by
    the repository, in a ``CPU.create_session`` session run on the calling thread; returns
    (InferRequest -> InferResponse, the artifact, the manifest's sha256)."""
    from gearbox.compression.devices import CPU
    from gearbox.compression.errors import NotFoundError
    from gearbox.compression.repository import ModelRepository
    from gearbox.serving.inference import InferRequest, InferResponse, Tensor

    repository = ModelRepository(repo)
    manifest = repository.manifest(MODEL, variant)
    artifact = repository.read_artifact(manifest)  # checked against the manifest's sha256
    session = CPU.create_session(artifact)
    output_names = list(repository.model(MODEL).signature.output_names)

    def infer(request: InferRequest) -> InferResponse:
        if request.model != MODEL or request.version not in ("", variant):
            raise NotFoundError(f"only {MODEL}/{variant} is served here")
        feeds = {tensor.name: tensor.data for tensor in request.inputs}
        results = session.run(output_names, feeds)
        return InferResponse(
            model=request.model,
            version=variant,
            id=request.id,
            outputs=tuple(Tensor(n, r) for n, r in zip(output_names, results, strict=True)),
            parameters={},
            binary_outputs=frozenset(o.name for o in request.outputs if o.binary),
            all_outputs_binary=request.all_outputs_binary and not request.outputs,
        )

    return infer, artifact, manifest.sha256


def run_bare(args: argparse.Namespace) -> int:
    import grpc
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from gearbox.compression.errors import GearboxError
    from gearbox.compression.repository import sha256_hex
    from gearbox.serving.grpc.adapter import GRPC_STATUS, request_from_proto, response_to_proto
    from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
    from gearbox.serving.grpc.generated.grpc_service_pb2_grpc import (
        GRPCInferenceServiceServicer,
        add_GRPCInferenceServiceServicer_to_server,
    )
    from gearbox.serving.rest.adapter import (
        decode_infer_request,
        encode_infer_response,
        error_response,
    )

    infer, artifact, manifest_sha256 = bare_inference(args.repo, args.variant)
    variant = args.variant

    async def infer_http(request: Request) -> Response:
        body = await request.body()
        params = request.path_params
        try:
            decoded = decode_infer_request(
                params["model"], params.get("version", ""), request.headers, body
            )
            reply = encode_infer_response(infer(decoded))
        except GearboxError as error:
            reply = error_response(error.code, error.message)
        return Response(reply.body, status_code=reply.status, headers=dict(reply.headers))

    async def ready_http(request: Request) -> Response:
        return Response(b'{"ready":true}', media_type="application/json")

    app = Starlette(
        routes=[
            Route("/v2/health/ready", ready_http, methods=["GET"]),
            Route("/v2/models/{model}/infer", infer_http, methods=["POST"]),
            Route("/v2/models/{model}/versions/{version}/infer", infer_http, methods=["POST"]),
        ]
    )

    class Servicer(GRPCInferenceServiceServicer):
        async def ServerReady(
            self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
        ) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=True)

        async def ModelInfer(
            self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
        ) -> pb.ModelInferResponse:
            try:
                response = infer(request_from_proto(request))
                return response_to_proto(response, bool(request.raw_input_contents))
            except GearboxError as error:
                context.set_code(GRPC_STATUS[error.code])
                context.set_details(error.message)
                return pb.ModelInferResponse()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        http_server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=LOOPBACK,
                port=args.http_port,
                lifespan="off",
                access_log=False,
                log_level="warning",
            )
        )
        http_task = loop.create_task(http_server.serve())
        grpc_server = grpc.aio.server()
        add_GRPCInferenceServiceServicer_to_server(Servicer(), grpc_server)
        grpc_server.add_insecure_port(f"{LOOPBACK}:{args.grpc_port}")
        await grpc_server.start()
        deadline = time.monotonic() + 30
        while not http_server.started:
            if http_task.done() or time.monotonic() > deadline:
                await grpc_server.stop(None)
                raise SystemExit(f"bare HTTP server did not start on port {args.http_port}")
            await asyncio.sleep(0.05)
        _emit(
            {
                "ready": True,
                "pid": os.getpid(),
                "variant": variant,
                "sha256": sha256_hex(artifact),
                "manifest_sha256": manifest_sha256,
            }
        )
        # The parent closes our stdin to stop us (and a parent that dies closes it too).
        stdin_closed = loop.create_future()

        def watch_stdin() -> None:
            sys.stdin.buffer.read()
            loop.call_soon_threadsafe(lambda: stdin_closed.done() or stdin_closed.set_result(None))

        threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
        await asyncio.wait({http_task, stdin_closed}, return_when=asyncio.FIRST_COMPLETED)
        http_server.should_exit = True
        await grpc_server.stop(0.5)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(http_task, timeout=5)

    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        runner.run(serve())
    return 0


# -- load: the closed-loop HTTP client ---------------------------------------------------------


def _process_table() -> dict[int, tuple[int, str, int]]:
    """Every process: (parent pid, command line, CPU clock ticks so far)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read(300).replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        # After the command: state ppid ... utime (11th) stime (12th).
        table[int(entry)] = (int(fields[1]), command, int(fields[11]) + int(fields[12]))
    return table


def _cpu_group(pid: int, command: str, descends: bool, root_pid: int) -> str:
    """A process's group: this client, the driver, the gateway replica, or the program's own
    name (Ray's actors by their title, Python processes by their script)."""
    if pid == os.getpid():
        return "load client"
    if not descends:
        return "outside the benchmark"
    if pid == root_pid:
        return "bench driver"
    words = command.split()
    program = words[0] if words else "?"
    if program.startswith("ray::"):
        title = program.split(".", 1)[0]
        return "gateway replica" if title.startswith("ray::ServeReplica:") else title
    name = Path(program).name
    if name.startswith("python"):
        scripts = [Path(w).name for w in words[1:] if w.endswith(".py")]
        return scripts[0] if scripts else name
    return name


def cpu_split(
    before: dict[int, tuple[int, str, int]],
    after: dict[int, tuple[int, str, int]],
    root_pid: int,
    seconds: float,
) -> dict[str, float]:
    """Cores used per group of processes between two :func:`_process_table` snapshots."""

    ticks: Counter[str] = Counter()
    for pid, (_, command, total) in after.items():
        used = total - before.get(pid, (0, "", 0))[2]
        if used > 0:
            ticks[_cpu_group(pid, command, _descends(after, pid, root_pid), root_pid)] += used
    per_second = os.sysconf("SC_CLK_TCK")
    return {
        group: round(t / per_second / seconds, 3)
        for group, t in ticks.most_common()
        if t / per_second / seconds >= 0.005
    }


# -- where the replica's time goes: a py-spy profile ---------------------------------------------

PY_SPY = Path(sys.executable).with_name("py-spy")
PROFILE_RATE_HZ = 250
EVENT_LOOP_THREAD = "AsyncIO Thread"
"""The thread a Ray actor runs its asyncio event loop on (py-spy names threads)."""
OWNERS: tuple[tuple[str, str], ...] = (
    ("onnxruntime/", "ONNX Runtime"),
    ("(serving/", "Gearbox"),
    ("(compression/", "Gearbox"),
    ("/gearbox/", "Gearbox"),
    ("ray/serve/", "Ray Serve"),
    ("ray/", "Ray"),
    ("uvicorn/", "uvicorn and Starlette"),
    ("starlette/", "uvicorn and Starlette"),
)
"""Who a sampled frame belongs to, by the file it is in; the innermost frame with an owner
takes the sample (the standard library's frames count for whoever called them)."""
OTHER_OWNER = "asyncio and the rest"


def _owner(frames: list[str]) -> str:
    for frame in reversed(frames):
        for pattern, name in OWNERS:
            if pattern in frame:
                return name
    return OTHER_OWNER


def attribute_samples(raw: str, seconds: float, rate_hz: float) -> dict[str, Any]:
    """py-spy's raw output (``thread (tid): name;frame;frame N`` per line, ``--threads``) as
    shares of the profiled wall time: how busy each thread was, and for the event loop's
    thread which code it was busy in."""
    possible = seconds * rate_hz
    threads: Counter[str] = Counter()
    loop: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread") else frames[0]
        threads[thread] += int(count)
        if thread.startswith(EVENT_LOOP_THREAD):
            loop[_owner(frames)] += int(count)
    return {
        "threads": {name: round(n / possible, 3) for name, n in threads.most_common()},
        "event_loop": {owner: round(n / possible, 3) for owner, n in loop.most_common()},
    }


async def _profile(pid: int, seconds: float) -> dict[str, Any]:
    """Samples process ``pid`` with py-spy for ``seconds`` (:func:`attribute_samples`), or
    says why it could not."""
    if not PY_SPY.exists():
        return {"error": f"no py-spy next to {sys.executable} (pip install py-spy)"}
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        spy = await asyncio.create_subprocess_exec(
            str(PY_SPY), "record", "--pid", str(pid), "--duration", f"{seconds:g}",
            "--rate", str(PROFILE_RATE_HZ), "--format", "raw", "--threads", "--nonblocking",
            "--output", out.name,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, error = await spy.communicate()
        raw = Path(out.name).read_text(errors="replace")
    if spy.returncode != 0 or not raw:
        return {"error": f"py-spy failed: {error.decode(errors='replace').strip()[-300:]}"}
    return attribute_samples(raw, seconds, PROFILE_RATE_HZ)


def _replica_pid(table: dict[int, tuple[int, str, int]], root_pid: int) -> int | None:
    """The busiest gateway replica started under ``root_pid``."""
    replicas = [
        (ticks, pid)
        for pid, (_, command, ticks) in table.items()
        if command.startswith("ray::ServeReplica:") and "Gateway" in command.split()[0]
        and _descends(table, pid, root_pid)
    ]  # fmt: skip
    return max(replicas)[1] if replicas else None


def _descends(table: dict[int, tuple[int, str, int]], pid: int, root_pid: int) -> bool:
    seen = set()
    while pid > 1 and pid not in seen:
        if pid == root_pid:
            return True
        seen.add(pid)
        pid = table.get(pid, (0, "", 0))[0]
    return False


class _LoadState:
    def __init__(self, max_requests: int) -> None:
        self.max_requests = max_requests
        self.issued = 0
        self.counting = False
        self.latencies: list[float] = []
        self.server_ms: list[float] = []
        self.ok_total = 0
        self.errors: Counter[str] = Counter()


def http_request(port: int, path: str, body: bytes) -> bytes:
    """One pre-encoded HTTP/1.1 POST of a JSON body to 127.0.0.1:``port``."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, whether the server closes the connection) of one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    chunked = closes = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            closes = b"close" in value.lower()
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size + 2))
        return status, b"".join(part[:-2] for part in parts), closes
    body = await reader.readexactly(length) if length else b""
    return status, body, closes


async def _load_connection(
    args: argparse.Namespace, request: bytes, state: _LoadState, stop_at: float
) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, args.port)
    try:
        while time.perf_counter() < stop_at and state.issued < state.max_requests:
            state.issued += 1
            started = time.perf_counter()
            writer.write(request)
            status, body, closes = await read_response(reader)
            elapsed_ms = (time.perf_counter() - started) * 1000
            if status == 200:
                state.ok_total += 1
            if state.counting:  # answered inside the counted window
                if status != 200:
                    state.errors[f"HTTP {status}"] += 1
                else:
                    state.latencies.append(elapsed_ms)
                    match = LATENCY_MS.search(body)
                    if match:
                        state.server_ms.append(float(match.group(1)))
            if closes:
                writer.close()
                reader, writer = await asyncio.open_connection(LOOPBACK, args.port)
    finally:
        writer.close()


async def _load(args: argparse.Namespace) -> dict[str, Any]:
    request = http_request(args.port, args.path, Path(args.body).read_bytes())
    state = _LoadState(args.max_requests)
    loop_started = time.perf_counter()
    profile_s = args.profile_s if args.root_pid else 0.0
    stop_at = loop_started + args.warmup_s + args.duration_s + profile_s
    connections = [
        asyncio.ensure_future(_load_connection(args, request, state, stop_at))
        for _ in range(args.concurrency)
    ]
    await asyncio.sleep(args.warmup_s)
    processes_before = _process_table() if args.root_pid else {}
    cpu_before = _cpu_seconds()
    window_started = time.perf_counter()
    state.counting = True
    await asyncio.sleep(max(stop_at - profile_s - time.perf_counter(), 0))
    state.counting = False
    window_s = time.perf_counter() - window_started
    cpu_used = _cpu_seconds() - cpu_before
    processes_after = _process_table() if args.root_pid else {}
    split = cpu_split(processes_before, processes_after, args.root_pid, window_s)
    profile: dict[str, Any] | None = None
    if profile_s:
        # After the counted window, under the same load: py-spy's own sampling costs CPU.
        pid = _replica_pid(processes_after, args.root_pid)
        answered_before = state.ok_total
        profile = await _profile(pid, profile_s) if pid else {"error": "no gateway replica found"}
        profile["requests_per_s"] = (state.ok_total - answered_before) / profile_s
    done, pending = await asyncio.wait(connections, timeout=DRAIN_TIMEOUT_S)
    for task in pending:
        task.cancel()
    failures = [str(task.exception()) for task in done if task.exception() is not None]
    return {
        "concurrency": args.concurrency,
        "window_s": window_s,
        "completed": len(state.latencies),
        "ok_total": state.ok_total,
        "requests_per_s": len(state.latencies) / window_s,
        "errors": dict(state.errors),
        "connection_failures": failures[:5] + ([f"... {len(pending)} hung"] if pending else []),
        "client_ms": _percentiles(state.latencies),
        "server_latency_ms": _percentiles(state.server_ms),
        "client_cpu_cores": round(cpu_used / window_s, 3),
        "cpu_cores": split,
        "replica_profile": profile,
    }


def run_load(args: argparse.Namespace) -> int:
    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        _emit(runner.run(_load(args)))
    return 0


# -- inproc: the same executor, driven in-process ----------------------------------------------


async def _inproc(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from gearbox.compression.examples.digits import load_splits
    from gearbox.compression.repository import ModelRepository
    from gearbox.serving.app import GIL_SWITCH_INTERVAL_S
    from gearbox.serving.catalog import Catalog
    from gearbox.serving.config import GatewayConfig
    from gearbox.serving.hosting import LocalBackend

    # What the gateway replica does before it builds its backend.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    config = GatewayConfig.create(args.repo)
    repository = ModelRepository(config.repository)
    lock = threading.Lock()
    batches = {"rows": 0, "batches": 0, "inline": 0}
    loop_thread = threading.get_ident()

    def on_batch(model: str, variant: str, rows: int, seconds: float) -> None:
        with lock:
            batches["rows"] += rows
            batches["batches"] += 1
            batches["inline"] += threading.get_ident() == loop_thread

    backend = LocalBackend(
        repository,
        Catalog.load(repository),
        config.gateway_device_class,
        config.batching,
        on_batch=on_batch,
    )
    await backend.warm_up()
    executor = backend.executor
    image = np.ascontiguousarray(load_splits().heldout.inputs["images"][:1], dtype=np.float32)
    inputs = {"images": image}
    latencies: list[float] = []
    issued = 0

    async def client(stop_at: float, record: bool) -> None:
        nonlocal issued
        while time.perf_counter() < stop_at and issued < args.max_requests:
            issued += 1
            started = time.perf_counter()
            await executor.submit(MODEL, args.variant, inputs)
            answered = time.perf_counter()
            if record and answered <= stop_at:  # answered inside the counted window
                latencies.append((answered - started) * 1000)
            # Each request is its own arrival: let the other clients in (an inline run
            # finishes without suspending, and would otherwise starve them).
            await asyncio.sleep(0)

    async def phase(seconds: float, record: bool) -> None:
        stop_at = time.perf_counter() + seconds
        tasks = [asyncio.ensure_future(client(stop_at, record)) for _ in range(args.concurrency)]
        await asyncio.wait_for(asyncio.gather(*tasks), seconds + DRAIN_TIMEOUT_S)

    await phase(args.warmup_s, record=False)
    with lock:
        batches.update(rows=0, batches=0, inline=0)
    cpu_before = _cpu_seconds()
    await phase(args.duration_s, record=True)
    cpu_used = _cpu_seconds() - cpu_before
    window_s = args.duration_s
    backend.close()
    with lock:
        formed = dict(batches)
    return {
        "concurrency": args.concurrency,
        "window_s": window_s,
        "completed": len(latencies),
        "requests_per_s": len(latencies) / window_s,
        "batches": formed["batches"],
        "mean_batch_rows": formed["rows"] / formed["batches"] if formed["batches"] else None,
        "inline_batches": formed["inline"],
        "hop_ms": executor.hop_ms,
        "client_ms": _percentiles(latencies),
        "process_cpu_cores": round(cpu_used / window_s, 3),
    }


def run_inproc(args: argparse.Namespace) -> int:
    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        _emit(runner.run(_inproc(args)))
    return 0


# -- plane: Gearbox's own code for one request, without a server -------------------------------


class _Context:
    """The two calls the gRPC adapter makes on a context."""

    def set_code(self, code: Any) -> None:
        raise RuntimeError(f"gRPC status {code}")

    def set_details(self, details: str) -> None:
        pass


async def _plane(args: argparse.Namespace) -> dict[str, Any]:
    from gearbox.compression.repository import ModelRepository
    from gearbox.serving.app import GIL_SWITCH_INTERVAL_S
    from gearbox.serving.catalog import Catalog
    from gearbox.serving.config import GatewayConfig
    from gearbox.serving.dataplane import DataPlane
    from gearbox.serving.grpc.adapter import GrpcServicer, request_from_proto, response_to_proto
    from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
    from gearbox.serving.hosting import LocalBackend
    from gearbox.serving.metrics import ReplicaMetrics
    from gearbox.serving.rest.adapter import (
        HttpAdapter,
        decode_infer_request,
        encode_infer_response,
    )

    # What the gateway replica builds in Gateway.__init__ (its metrics written to a scratch
    # directory, as a replica writes them, with no port to serve them on).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    config = GatewayConfig.create(args.repo)
    repository = ModelRepository(config.repository)
    catalog = Catalog.load(repository)
    metrics = ReplicaMetrics(Path(tempfile.mkdtemp(prefix="gbx-plane-metrics-")))
    device = config.gateway_device_class
    backend = LocalBackend(
        repository,
        catalog,
        device,
        config.batching,
        on_batch=lambda model, variant, rows, _s: metrics.batch_formed(
            model, variant, device.name, rows
        ),
    )
    await backend.warm_up()
    plane = DataPlane(
        catalog,
        [backend],
        [d.name for d in config.device_classes],
        metrics,
        shadow_fraction=config.shadow_fraction,
    )
    await plane.warm_up()
    http = HttpAdapter(plane)
    servicer = GrpcServicer(plane)
    context = _Context()
    infer, _, _ = bare_inference(args.repo, args.variant)
    bodies = Path(args.bodies)
    headers = {"content-type": "application/json"}
    routed_path = f"/v2/models/{MODEL}/infer"
    pinned_path = f"/v2/models/{MODEL}/versions/{args.variant}/infer"

    def http_case(path: str, body: bytes) -> Callable[[], Any]:
        async def call() -> None:
            reply = await http.handle("POST", path, headers, body)
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}: {reply.body[:200]!r}")

        return call

    def grpc_case(raw: bytes) -> Callable[[], Any]:
        async def call() -> None:
            reply = await servicer.ModelInfer(pb.ModelInferRequest.FromString(raw), context)
            reply.SerializeToString()

        return call

    def bare_http(body: bytes) -> Callable[[], Any]:
        async def call() -> None:
            encode_infer_response(infer(decode_infer_request(MODEL, args.variant, headers, body)))

        return call

    def bare_grpc(raw: bytes) -> Callable[[], Any]:
        async def call() -> None:
            request = pb.ModelInferRequest.FromString(raw)
            response_to_proto(infer(request_from_proto(request)), False).SerializeToString()

        return call

    http_pinned = (bodies / "http-pinned.json").read_bytes()
    grpc_pinned = (bodies / "grpc-pinned.bin").read_bytes()
    cases = {
        "http/gearbox routed": http_case(routed_path, (bodies / "http-routed.json").read_bytes()),
        "http/gearbox pinned": http_case(pinned_path, http_pinned),
        "http/bare": bare_http(http_pinned),
        "grpc/gearbox routed": grpc_case((bodies / "grpc-routed.bin").read_bytes()),
        "grpc/gearbox pinned": grpc_case(grpc_pinned),
        "grpc/bare": bare_grpc(grpc_pinned),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    blocks = 4  # cases interleaved in blocks, so that drift hits them alike
    deadline = time.monotonic() + args.timeout_s
    for call in cases.values():
        for _ in range(args.warmup):
            await call()
    for _ in range(blocks):
        for name, call in cases.items():
            for _ in range(args.requests // blocks):
                if time.monotonic() > deadline:
                    break
                started = time.perf_counter()
                await call()
                samples[name].append((time.perf_counter() - started) * 1000)
                await asyncio.sleep(0)  # let shadow comparisons and callbacks run, as a server
    backend.close()
    return {name: {**_percentiles(values), "n": len(values)} for name, values in samples.items()}


def run_plane(args: argparse.Namespace) -> int:
    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        _emit(runner.run(_plane(args)))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    bare = commands.add_parser("bare", help="the baseline OIP server")
    bare.add_argument("--repo", required=True)
    bare.add_argument("--variant", required=True)
    bare.add_argument("--http-port", type=int, required=True)
    bare.add_argument("--grpc-port", type=int, required=True)
    for name, helptext in (
        ("load", "closed-loop HTTP load on a server"),
        ("inproc", "closed-loop load on the in-process executor"),
    ):
        command = commands.add_parser(name, help=helptext)
        command.add_argument("--concurrency", type=int, default=16)
        command.add_argument("--warmup-s", type=float, default=2.0)
        command.add_argument("--duration-s", type=float, default=10.0)
        command.add_argument("--max-requests", type=int, default=2_000_000)
        if name == "load":
            command.add_argument("--port", type=int, required=True)
            command.add_argument("--path", required=True)
            command.add_argument("--body", required=True, help="file holding the request body")
            command.add_argument("--root-pid", type=int, default=0)
            command.add_argument(
                "--profile-s", type=float, default=0.0,
                help="with --root-pid: after the counted window, sample the gateway replica "
                "with py-spy for this long, still under load",
            )  # fmt: skip
        else:
            command.add_argument("--repo", required=True)
            command.add_argument("--variant", required=True)
    plane = commands.add_parser("plane", help="Gearbox's adapters and data plane, no server")
    plane.add_argument("--repo", required=True)
    plane.add_argument("--variant", required=True)
    plane.add_argument("--bodies", required=True, help="folder of the pre-encoded requests")
    plane.add_argument("--warmup", type=int, default=200)
    plane.add_argument("--requests", type=int, default=2000)
    plane.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args()
    runners = {"bare": run_bare, "load": run_load, "inproc": run_inproc, "plane": run_plane}
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
