"""SLO benchmark: do callers' latency budgets hold under open-loop load with a spike?

    .venv/bin/python bench/slo_bench.py [--example digits|minilm] [--repo DIR [--reuse]]
        [--seconds 60] [--rate R] [--slices 8]
        [--seed 7] [--json PATH] [--markdown PATH]
        [--http-port 18200] [--grpc-port 19200] [--metrics-port 18280]

1. Serves the example's repository (``--reuse``: the one at --repo; otherwise
   ``gearbox compress --example ...`` builds one) with the real ``gearbox serve`` console
   script, HAProxy ingress, bound to 127.0.0.1, and stops it with SIGINT at the end. The
   requests carry held-out items: digit images, or (``minilm``) sentences as text, whose
   answers are scored by their cosine to what the served ``fp32`` answers for the same
   sentence (fetched first).
2. Measures, from a separate client process, every ready variant's unloaded end-to-end latency
   at the client (pinned, isolated requests 20 ms apart: back to back, the cores never idle and
   a request took half as long on the development VM as a lone one), cycling through the
   held-out items; the fastest p50 is L. It also measures the time these requests spend
   outside the gateway's clock (client time minus ``latency_ms``) and, unless
   --transport-allowance-ms is given, restarts the gateway with that median as its transport
   allowance, the time a caller's budget spends beyond the gateway.
3. Builds one schedule, replayable from --seed: Poisson arrivals (exponential gaps) at half the
   measured capacity for the first third of --seconds, twice that (a spike) for the middle
   third, half again for the last; each request carries one held-out item and a budget drawn
   from 1.5L, 2L, 3L, 5L, 10L or none. A budget is *feasible* if the fastest variant meets it
   unloaded: at least L for same-sized digits; for sentences, at least the fastest variant's
   median over 3 isolated requests of that very sentence (a long one costs more than L).
   Capacity is that of the model as registered: a short closed-loop run pinned to ``fp32``,
   the reference (--rate overrides the half-capacity rate). In the spike, then, ``fp32``
   alone is saturated and only a move to faster variants keeps budgets.
4. Replays that schedule once per policy against the same server, from a separate client
   process: ``gearbox`` (routed, the budget sent as ``latency_budget_ms``), ``fp32-only``,
   ``fastest-only`` (pinned to the fastest variant) and ``random`` (each request pinned to a
   uniformly drawn ready variant). Open loop: a request is sent at its scheduled time whatever
   happened to earlier ones. The policies take turns (--slices, 8 by default): the schedule is
   cut into equal spans of time and each span is replayed for every policy, in an order that
   rotates, before the next; a shared VM's slow spells (CPU time stolen by the hypervisor:
   a third of it at times on the development VM) then fall on every policy alike instead of
   on whichever ran during them. Each span starts on a drained server, so a backlog lives at
   most one span (5 s of a 40 s run; --slices 1 lets it build over the whole run). The CPU
   time the machine was busy, and had stolen, while each policy ran is reported beside it, as
   is the share of the budgets that the fastest variant's isolated requests met unloaded: the
   machine's own floor.
5. Judges at the client: a request meets its budget only if an HTTP 200 arrived within the
   budget, counted from the moment the client turned to send it. Time spent waiting for a free
   connection (all 64 busy: the server is behind) counts; the client's own timer lateness
   (the event loop wakes within about 1 ms of a scheduled time) does not, and is reported
   apart. 429s and errors are misses, and every miss is put down to a cause from what the
   gateway's answer says (``predicted_latency_ms``, ``latency_ms``): refused or failed;
   predicted late (the gateway's prediction for the variant that answered, with the transport
   allowance, was already over the budget); the gateway's own span ran over
   what the budget left it; or the gateway kept to that and the time outside it (HAProxy,
   the transport, the client) took more than the transport allowance. Per policy: budgets
   met of the feasible, misses, quality (accuracy against the labels; mean cosine to ``fp32``
   for sentences) and the mean manifest quality of the answering variants, p50/p95/p99,
   throughput.
   The client is one uvloop process writing pre-encoded HTTP/1.1 requests on pre-opened
   keep-alive sockets and parsing the answers after the run, so that on 2 shared cores it
   keeps to the schedule.
Targets (PASS/FAIL, exit 1 on FAIL): gearbox meets >= 97 % of feasible budgets over the whole
run; it has >= 3x fewer misses than the best single-variant policy (fp32-only, fastest-only),
at equal or better quality than that policy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from serving_peers import LOOPBACK, http_request, read_response

GEARBOX = str(Path(sys.executable).with_name("gearbox"))
EXAMPLES = ("digits", "minilm")
BUDGET_MULTIPLES: tuple[float | None, ...] = (1.5, 2.0, 3.0, 5.0, 10.0, None)
BUDGET_WEIGHTS = (0.2, 0.2, 0.2, 0.15, 0.1, 0.15)
POLICIES = ("gearbox", "fp32-only", "fastest-only", "random")
SINGLE_VARIANT = ("fp32-only", "fastest-only")
MAX_CONNECTIONS = 64
"""Keep-alive connections the open-loop client opens before it starts; a request that finds
them all busy waits for one, and that wait counts against its budget."""
CLOSED_LOOP_CALLERS = 16
UNLOADED_REQUESTS = 150
ISOLATION_GAP_S = 0.02
"""Gap between the requests that measure unloaded latency: long enough for the machine to
go idle between them, as it does between sparse arrivals."""
ITEM_REPEATS = 3
"""Isolated requests per held-out item that set the item's feasibility floor (inputs of
different sizes only)."""
REFERENCE = "fp32"
"""The variant that the capacity is measured on, and that ``fp32-only`` pins."""
FEASIBLE_TARGET = 0.97
MISS_RATIO_TARGET = 3.0
SLICE_DRAIN_S = 1.0
"""Pause between two slices, for the previous policy's queue to drain."""


# --- the client process -----------------------------------------------------------------------
# One uvloop event loop speaking HTTP/1.1 over pre-opened keep-alive sockets, every request encoded
# before the clock starts and answers parsed after it stops: on 2 shared cores an HTTP library's
# own per-request work (aiohttp's, say) delays sends by more than the budgets being judged.


@dataclass(frozen=True)
class Workload:
    """The held-out inputs the benchmark sends, and how an answer to one is scored."""

    model: str
    inputs: list[dict[str, Any]]
    """One OIP request input per held-out item."""
    score: Callable[[int, dict[str, Any]], float]
    """The score of an answer (an OIP response) to item i: 1 or 0 for a correct class, the
    cosine to the reference variant's embedding for an encoder."""
    quality_name: str
    uniform: bool
    """Every item costs the same (fixed-size images): one unloaded latency stands for all."""

    def bodies(self, items: np.ndarray, budgets: list[float | None]) -> list[bytes]:
        bodies = []
        for item, budget in zip(items, budgets, strict=True):
            document: dict[str, Any] = {"inputs": [self.inputs[int(item)]]}
            if budget is not None:
                document["parameters"] = {"latency_budget_ms": budget}
            bodies.append(json.dumps(document).encode())
        return bodies


def digits_workload() -> Workload:
    from gearbox.compression.examples.digits import load_splits

    heldout = load_splits().heldout
    images = heldout.inputs["images"].astype(np.float32)
    labels = np.asarray(heldout.labels)
    inputs = [
        {"name": "images", "datatype": "FP32", "shape": [1, *image.shape],
         "data": image.ravel().tolist()}
        for image in images
    ]  # fmt: skip

    def correct(item: int, answer: dict[str, Any]) -> float:
        return float(int(np.argmax(answer["outputs"][0]["data"])) == int(labels[item]))

    return Workload("digits", inputs, correct, "accuracy", uniform=True)


def minilm_workload(base: str) -> Workload:
    """Held-out sentences, as text; each answer is scored against what the served ``fp32``
    answers for the same sentence (fetched here, one request at a time)."""
    from gearbox.compression.examples.minilm import split_sentences
    from gearbox.compression.quality import row_cosines

    sentences = split_sentences()[2]
    inputs = [
        {"name": "text", "datatype": "BYTES", "shape": [1], "data": [sentence]}
        for sentence in sentences
    ]
    references = []
    for document in inputs:
        request = urllib.request.Request(
            f"{base}/v2/models/minilm/versions/fp32/infer",
            data=json.dumps({"inputs": [document]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        references.append(np.asarray(answer["outputs"][0]["data"], dtype=np.float64))

    def cosine(item: int, answer: dict[str, Any]) -> float:
        embedding = np.asarray(answer["outputs"][0]["data"], dtype=np.float64)
        return float(row_cosines(embedding[None], references[item][None])[0])

    return Workload("minilm", inputs, cosine, "mean cosine to fp32", uniform=False)


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _exchange(connection: Connection, request: bytes) -> tuple[int, bytes, bool]:
    reader, writer = connection
    writer.write(request)
    return await read_response(reader)


async def _reopened(connection: Connection, port: int) -> Connection:
    """A fresh connection for one the server said it closes."""
    connection[1].close()
    return await asyncio.open_connection(LOOPBACK, port)


async def _replay(
    port: int, offsets: list[float], requests: list[bytes], limit_s: float
) -> list[dict[str, Any]]:
    """Sends request i at offsets[i] seconds from now, whatever happened to earlier ones.

    A request's clock starts when the client turns to send it: waiting for a free connection
    (every one busy with an unanswered request) counts against its budget, the event loop's
    timer granularity (about 1 ms) does not; that lateness is reported apart (``late_ms``).
    """
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(MAX_CONNECTIONS):
        idle.put_nowait(await asyncio.open_connection(LOOPBACK, port))
    results: list[dict[str, Any]] = [{} for _ in offsets]
    in_flight: set[asyncio.Task[None]] = set()
    start = time.perf_counter() + 0.2

    async def one(index: int, called: float, scheduled: float) -> None:
        record: dict[str, Any] = {"late_ms": (called - scheduled) * 1000}
        connection = await idle.get()
        try:
            status, body, closes = await asyncio.wait_for(
                _exchange(connection, requests[index]), limit_s
            )
            record["status"], record["body"] = status, body
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
            record["status"], closes = type(error).__name__, True
        record["ms"] = (time.perf_counter() - called) * 1000
        results[index] = record
        idle.put_nowait(await _reopened(connection, port) if closes else connection)

    for index, offset in enumerate(offsets):
        scheduled = start + offset
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(index, time.perf_counter(), scheduled))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight, timeout=limit_s)
    while not idle.empty():
        idle.get_nowait()[1].close()
    return results


async def _closed_loop(port: int, requests: list[bytes], seconds: float) -> float:
    """Requests/s answered 200 to CLOSED_LOOP_CALLERS callers that each send again as soon
    as answered."""
    done = 0
    end = time.perf_counter() + seconds

    async def caller(offset: int) -> None:
        nonlocal done
        connection = await asyncio.open_connection(LOOPBACK, port)
        index = offset
        while time.perf_counter() < end:
            status, _, closes = await _exchange(connection, requests[index % len(requests)])
            done += status == 200
            if closes:
                connection = await _reopened(connection, port)
            index += CLOSED_LOOP_CALLERS
        connection[1].close()

    started = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(CLOSED_LOOP_CALLERS)))
    return done / (time.perf_counter() - started)


async def _isolated(
    port: int, requests: list[bytes], count: int, warmup: int, gap_s: float
) -> list[tuple[float, float]]:
    """(client ms, the gateway's ``latency_ms``) of ``count`` requests sent alone, ``gap_s``
    apart, sample i of ``requests[i % len(requests)]``: what a request meets on an otherwise
    idle machine, where every hop may first have to wake a sleeping core (back to back, on the
    development VM, the same request took half as long)."""
    connection = await asyncio.open_connection(LOOPBACK, port)
    samples = []
    for index in range(warmup + count):
        await asyncio.sleep(gap_s)
        started = time.perf_counter()
        status, body, closes = await _exchange(
            connection, requests[(index - warmup) % len(requests)]
        )
        client_ms = (time.perf_counter() - started) * 1000
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        if closes:
            connection = await _reopened(connection, port)
        if index >= warmup:
            samples.append((client_ms, float(json.loads(body)["parameters"]["latency_ms"])))
    connection[1].close()
    return samples


def _client(task: dict[str, Any], out: Any) -> None:
    """Entry of the client process: runs one task, sends its result back."""
    import uvloop

    kind = task.pop("kind")
    run = {"replay": _replay, "closed": _closed_loop, "isolated": _isolated}[kind]
    out.send(uvloop.run(run(**task)))


def in_client_process(task: dict[str, Any]) -> Any:
    parent, child = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.get_context("spawn").Process(target=_client, args=(task, child))
    process.start()
    child.close()
    try:
        # EOF here means the client died (its traceback is on stderr).
        result = parent.recv()
    except EOFError:
        process.join(timeout=10)
        raise SystemExit(f"the client process failed (exit code {process.exitcode})") from None
    process.join(timeout=60)
    return result


# --- the driver -------------------------------------------------------------------------------


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _wait_ready(base: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"gearbox serve exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit("gearbox serve never became ready")


def _unloaded(
    port: int, model: str, variant: str, bodies: list[bytes], count: int
) -> list[tuple[float, float]]:
    """(client ms, ``latency_ms``) of ``count`` isolated requests pinned to the variant, sample
    i of ``bodies[i % len(bodies)]``."""
    path = f"/v2/models/{model}/versions/{variant}/infer"
    return in_client_process(
        {"kind": "isolated", "port": port,
         "requests": [http_request(port, path, body) for body in bodies],
         "count": count, "warmup": 20, "gap_s": ISOLATION_GAP_S}
    )  # fmt: skip


def _read_answers(results: list[dict[str, Any]], workload: Workload, items: np.ndarray) -> None:
    """Parses, after the run, which variant answered each request and the answer's score."""
    for record, item in zip(results, items, strict=True):
        body = record.pop("body", None)
        if record.get("status") == 200 and body is not None:
            answer = json.loads(body)
            record["variant"] = answer["model_version"]
            record["score"] = workload.score(int(item), answer)
            parameters = answer.get("parameters", {})
            record["predicted_ms"] = parameters.get("predicted_latency_ms")
            record["server_ms"] = parameters.get("latency_ms")


def _schedule(
    rng: np.random.Generator, rate: float, seconds: float
) -> tuple[list[float], list[float]]:
    """Poisson arrival offsets at rate / 2x rate / rate over the three thirds; and each
    request's rate phase."""
    offsets, phases = [], []
    now = 0.0
    while now < seconds:
        phase = 1 if seconds / 3 <= now < 2 * seconds / 3 else 0
        current = rate * (2 if phase else 1)
        now += float(rng.exponential(1 / current))
        if now < seconds:
            offsets.append(now)
            phases.append(phase)
    return offsets, phases


def _slices(offsets: Sequence[float], seconds: float, count: int) -> list[tuple[int, int, float]]:
    """The schedule cut into ``count`` equal spans of time: each one's first request, the
    index after its last, and the second it starts at."""
    bounds = [seconds * k / count for k in range(count + 1)]
    cuts = [int(np.searchsorted(offsets, bound)) for bound in bounds]
    return [(cuts[k], cuts[k + 1], bounds[k]) for k in range(count)]


def _rounds(policies: Sequence[str], count: int) -> list[list[str]]:
    """The order the policies run in, per slice: each round starts one policy later, so no
    policy always follows the same one (whose backlog, or whose idle machine, it inherits)."""
    return [[policies[(r + k) % len(policies)] for k in range(len(policies))] for r in range(count)]


@dataclass(frozen=True)
class CpuTimes:
    """The machine's CPU time so far (``/proc/stat``, seconds summed over cores)."""

    busy: float
    steal: float
    """Time the hypervisor ran something else while this VM wanted the core."""
    total: float

    @classmethod
    def now(cls) -> CpuTimes | None:
        """None where the kernel does not say (not Linux)."""
        try:
            with open("/proc/stat") as stat:
                fields = [float(v) for v in stat.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = fields
        tick = os.sysconf("SC_CLK_TCK")
        busy = user + nice + system + irq + softirq
        return cls(busy / tick, steal / tick, (busy + idle + iowait + steal) / tick)

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.busy - other.busy, self.steal - other.steal, self.total - other.total)

    def __add__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.busy + other.busy, self.steal + other.steal, self.total + other.total)


def _unloaded_met_share(samples_ms: np.ndarray, floors_ms: np.ndarray, fastest_ms: float) -> float:
    """The share of feasible budgets the fastest variant met with no load at all: its isolated
    requests (``samples_ms``, each with its item's floor) judged against the run's budget mix.
    No policy can be expected to do better under load; the machine's own noise sets it."""
    weights = [(m, w) for m, w in zip(BUDGET_MULTIPLES, BUDGET_WEIGHTS, strict=True) if m]
    feasible = met = 0.0
    for multiple, weight in weights:
        budget = multiple * fastest_ms
        judged = floors_ms <= budget
        feasible += weight * np.count_nonzero(judged)
        met += weight * np.count_nonzero(judged & (samples_ms <= budget))
    return met / feasible if feasible else 1.0


MISS_CAUSES = ("refused or failed", "predicted late", "gateway ran over", "outside the gateway")


def _miss_cause(record: dict[str, Any], budget_ms: float, allowance_ms: float) -> str:
    """Why a request missed its budget, from what the gateway said in its answer: no answer
    in time; the variant it chose was predicted not to fit (no variant did, or none in time);
    it was predicted to fit but the gateway's own span (``latency_ms``) took more than the
    budget less the transport allowance; or the gateway kept to that and the rest (HAProxy,
    the transport, the client) took more than the allowance."""
    if record.get("status") != 200:
        return MISS_CAUSES[0]
    predicted, span = record.get("predicted_ms"), record.get("server_ms")
    if predicted is not None and predicted + allowance_ms > budget_ms:
        return MISS_CAUSES[1]
    if span is not None and span + allowance_ms > budget_ms:
        return MISS_CAUSES[2]
    return MISS_CAUSES[3]


def _summarise(
    results: list[dict[str, Any]],
    budgets: list[float | None],
    feasible_from_ms: np.ndarray,
    quality: dict[str, float],
    seconds: float,
    multiples: Sequence[float | None] | None = None,
    phases: Sequence[int] | None = None,
    allowance_ms: float = 0.0,
) -> dict[str, Any]:
    """Per policy figures; request i's budget is feasible if it is at least
    ``feasible_from_ms[i]``, what the fastest variant took for its input unloaded. With the
    budgets' ``multiples`` of L and the schedule's ``phases`` (1: the spike), the misses are
    also counted by each, and by their cause (:func:`_miss_cause`, with the gateway's
    transport ``allowance_ms``)."""
    multiples = multiples if multiples is not None else [None] * len(results)
    phases = phases if phases is not None else [0] * len(results)
    by_budget: Counter[str] = Counter()
    by_phase: Counter[str] = Counter()
    by_variant: Counter[str] = Counter()
    by_cause: Counter[str] = Counter()
    feasible = met = 0
    scores = []
    qualities = []
    statuses: Counter[str] = Counter()
    latencies = []
    for record, budget, floor, multiple, phase in zip(
        results, budgets, feasible_from_ms, multiples, phases, strict=True
    ):
        ok = record.get("status") == 200
        statuses[str(record.get("status"))] += 1
        latencies.append(record["ms"])
        if ok:
            scores.append(record["score"])
            qualities.append(quality[record["variant"]])
        if budget is not None and budget >= floor:
            feasible += 1
            hit = ok and record["ms"] <= budget
            met += hit
            if not hit:
                by_budget[f"{multiple:g}L" if multiple is not None else "?"] += 1
                by_phase["spike" if phase else "base"] += 1
                by_variant[record.get("variant", "-")] += 1
                by_cause[_miss_cause(record, budget, allowance_ms)] += 1
    return {
        "requests": len(results),
        "feasible": feasible,
        "met": met,
        "met_share": met / feasible if feasible else 1.0,
        "misses": feasible - met,
        "quality": float(np.mean(scores)) if scores else 0.0,
        "mean_manifest_quality": float(np.mean(qualities)) if qualities else 0.0,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "throughput_rps": len(scores) / seconds,
        "statuses": dict(statuses),
        "late_p99_ms": float(np.percentile([r["late_ms"] for r in results], 99)),
        "variants": dict(Counter(r.get("variant", "-") for r in results)),
        "misses_by_budget": dict(by_budget),
        "misses_by_phase": dict(by_phase),
        "misses_by_variant": dict(by_variant),
        "misses_by_cause": dict(by_cause),
    }


def _share(fraction: float | None) -> str:
    return "?" if fraction is None else f"{100 * fraction:.0f} %"


def _markdown(report: dict[str, Any]) -> str:
    quality_name = report["quality_name"]
    lines = [
        f"Run of `{report['command']}` on {report['cores']} cores, seed {report['seed']}: "
        f"`{report['model']}`; L (fastest variant `{report['fastest']}`, unloaded: isolated "
        f"requests, at the client) = {report['fastest_ms']:.2f} ms; capacity (`fp32` pinned, "
        f"{CLOSED_LOOP_CALLERS} closed-loop callers) {report['capacity_rps']:.0f} req/s; "
        f"rate {report['rate_rps']:.0f} req/s, {2 * report['rate_rps']:.0f} req/s in the middle "
        f"third; {report['seconds']:g} s per policy, interleaved in {report['slices']} "
        f"slices; budgets {report['budgets']}; gateway served with --transport-allowance-ms "
        f"{report['transport_allowance_ms']:g}. Unloaded, the fastest variant's isolated "
        f"requests met {100 * report['unloaded_met_share']:.1f} % of these budgets: no policy "
        "can be expected to do better on this machine.",
        "",
        "| variant | manifest quality | unloaded client p50 | outside the gateway's clock |",
        "|---|---|---|---|",
    ]
    for name, figures in sorted(report["variants"].items()):
        lines.append(
            f"| {name} | {figures['quality']:.4f} | {figures['p50_ms']:.2f} ms | "
            f"{report['outside_ms'][name]:.2f} ms |"
        )
    lines += [
        "",
        f"| policy | budgets met (of feasible) | misses | {quality_name} | p50 / p95 / p99 | "
        "throughput | CPU busy / stolen | answered by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for policy in POLICIES:
        row = report["policies"][policy]
        used = ", ".join(f"{k} {v}" for k, v in sorted(row["variants"].items()))
        lines.append(
            f"| {policy} | {row['met']}/{row['feasible']} ({100 * row['met_share']:.1f} %) | "
            f"{row['misses']} | {row['quality']:.4f} | {row['p50_ms']:.2f} / "
            f"{row['p95_ms']:.2f} / {row['p99_ms']:.2f} ms | {row['throughput_rps']:.0f}/s | "
            f"{_share(row.get('cpu_busy_share'))} / {_share(row.get('cpu_steal_share'))} | "
            f"{used} |"
        )
    labels = [f"{m:g}L" for m in BUDGET_MULTIPLES if m is not None]
    lines += [
        "",
        "| policy | misses in the base load / the spike | misses by budget: "
        + ", ".join(labels) + " | misses by the variant that answered | misses by cause: "
        + ", ".join(MISS_CAUSES) + " |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for policy in POLICIES:
        row = report["policies"][policy]
        phase, budget = row.get("misses_by_phase", {}), row.get("misses_by_budget", {})
        cause = row.get("misses_by_cause", {})
        lines.append(
            f"| {policy} | {phase.get('base', 0)} / {phase.get('spike', 0)} | "
            + ", ".join(str(budget.get(label, 0)) for label in labels) + " | "
            + ", ".join(f"{k} {v}" for k, v in sorted(row.get("misses_by_variant", {}).items()))
            + " | " + ", ".join(str(cause.get(c, 0)) for c in MISS_CAUSES) + " |"
        )  # fmt: skip
    lines += ["", *(f"- {'PASS' if ok else 'FAIL'} {name}: {figure}" for name, ok, figure in
                    report["checks"])]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", choices=EXAMPLES, default="digits")
    parser.add_argument("--repo", type=Path)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--seconds", type=float, default=60.0, help="per policy")
    parser.add_argument("--rate", type=float, help="base rate (default: half the capacity)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--slices", type=int, default=8,
        help="cut each policy's run into this many spans of time and interleave the policies "
        "span by span, so that the machine's slow and fast spells fall on every policy alike "
        "(1: one policy after another)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--http-port", type=int, default=18200)
    parser.add_argument("--grpc-port", type=int, default=19200)
    parser.add_argument("--metrics-port", type=int, default=18280)
    parser.add_argument(
        "--transport-allowance-ms", type=float,
        help="gearbox serve's --transport-allowance-ms (default: measure the time unloaded "
        "requests spend outside the gateway's clock on a first server, then serve with it)",
    )  # fmt: skip
    parser.add_argument(
        "--device-classes", type=Path,
        help="gearbox serve's --device-classes: YAML file of device classes (default: cpu)",
    )  # fmt: skip
    parser.add_argument(
        "--serve-args", default="", metavar="ARGS",
        help="more arguments for gearbox serve, e.g. '--no-priority-lane' to compare against it",
    )  # fmt: skip
    args = parser.parse_args()
    if args.device_classes is not None and not args.device_classes.is_file():
        parser.error(f"--device-classes: no file {args.device_classes}")
    if args.reuse and args.repo is None:
        parser.error("--reuse needs --repo")
    if args.seconds <= 0 or args.seconds > 600:
        parser.error("--seconds must lie in (0, 600]")
    if not 1 <= args.slices <= 60:
        parser.error("--slices must lie in [1, 60]")
    repo = args.repo or Path(tempfile.mkdtemp(prefix="gearbox-slo-"))
    if not args.reuse:
        subprocess.run(
            [GEARBOX, "compress", "--example", args.example, "--repo", str(repo)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip

    workload: Workload | None = None
    unloaded: Unloaded | None = None
    allowance = args.transport_allowance_ms
    if allowance is None:
        with _gateway(repo, args, 0.0) as base:
            workload = _workload(args.example, base)
            unloaded = _measure_unloaded(args, base, workload)
        allowance = round(statistics.median(unloaded.outside_ms.values()), 3)
        print(f"time outside the gateway's clock, unloaded: {allowance:.3f} ms (the allowance)")
    with _gateway(repo, args, allowance) as base:
        workload = workload or _workload(args.example, base)
        unloaded = unloaded or _measure_unloaded(args, base, workload)
        report = run(args, base, workload, unloaded, allowance)
    print(_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.write_text(_markdown(report))
    return 0 if all(ok for _, ok, _ in report["checks"]) else 1


def _workload(example: str, base: str) -> Workload:
    return digits_workload() if example == "digits" else minilm_workload(base)


@contextlib.contextmanager
def _gateway(repo: Path, args: argparse.Namespace, allowance_ms: float) -> Iterator[str]:
    """The real ``gearbox serve`` on the repository (HAProxy ingress, loopback), stopped with
    SIGINT on the way out; yields its HTTP base URL."""
    base = f"http://127.0.0.1:{args.http_port}"
    log = Path(tempfile.mkstemp(prefix="gearbox-slo-serve-", suffix=".log")[1])
    server = subprocess.Popen(
        [GEARBOX, "serve", "--repo", str(repo), "--http-port", str(args.http_port),
         "--grpc-port", str(args.grpc_port), "--metrics-port", str(args.metrics_port),
         "--transport-allowance-ms", str(allowance_ms),
         *(["--device-classes", str(args.device_classes)] if args.device_classes else []),
         *shlex.split(args.serve_args)],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_ready(base, server, log)
        yield base
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()


def _served_quality(base: str, model: str) -> dict[str, float]:
    rows = _get(f"{base}/v2/models/{model}/variants")["variants"]
    return {r["variant"]: r["quality"]["value"] for r in rows if r["served"]}


@dataclass(frozen=True)
class Unloaded:
    """Isolated requests' latencies at the client."""

    p50_ms: dict[str, float]
    """Per variant, over the held-out items in turn."""
    outside_ms: dict[str, float]
    """Per variant, the median time outside the gateway's clock (client minus
    ``latency_ms``: the ingress, the transport, the client)."""
    fastest: str
    fastest_item_ms: np.ndarray
    """The fastest variant's median per held-out item: a budget below it is infeasible."""
    fastest_samples_ms: np.ndarray
    """The fastest variant's isolated requests, and"""
    fastest_sample_floors_ms: np.ndarray
    """the feasibility floor of each one's item."""


def _measure_unloaded(args: argparse.Namespace, base: str, workload: Workload) -> Unloaded:
    probes = workload.bodies(np.arange(len(workload.inputs)), [None] * len(workload.inputs))
    p50, outside, isolated = {}, {}, {}
    for variant in sorted(_served_quality(base, workload.model)):
        samples = _unloaded(args.http_port, workload.model, variant, probes, UNLOADED_REQUESTS)
        isolated[variant] = samples
        client = np.array([c for c, _ in samples])
        p50[variant] = float(np.percentile(client, 50))
        outside[variant] = float(np.percentile(client - np.array([g for _, g in samples]), 50))
    fastest = min(p50, key=p50.__getitem__)
    if workload.uniform:
        per_item = np.full(len(probes), p50[fastest])
        fastest_samples = np.array([c for c, _ in isolated[fastest]])
        sample_floors = np.full(len(fastest_samples), p50[fastest])
    else:
        # A long sentence costs the fastest variant more than L: judge it by its own time.
        samples = _unloaded(
            args.http_port, workload.model, fastest, probes, ITEM_REPEATS * len(probes)
        )
        client = np.array([c for c, _ in samples]).reshape(ITEM_REPEATS, len(probes))
        per_item = np.median(client, axis=0)
        fastest_samples = client.ravel()
        sample_floors = np.tile(per_item, ITEM_REPEATS)
    print("unloaded (isolated requests) client p50 / outside the clock, ms: " + ", ".join(
        f"{v} {p50[v]:.3f} / {outside[v]:.3f}" for v in p50
    ))  # fmt: skip
    return Unloaded(p50, outside, fastest, per_item, fastest_samples, sample_floors)


def run(
    args: argparse.Namespace,
    base: str,
    workload: Workload,
    unloaded: Unloaded,
    allowance_ms: float,
) -> dict[str, Any]:
    model = workload.model
    quality = _served_quality(base, model)
    fastest = unloaded.fastest
    fastest_ms = unloaded.p50_ms[fastest]
    print(f"L = {fastest_ms:.3f} ms ({fastest})")

    rng = np.random.default_rng(args.seed)
    pool = len(workload.inputs)
    capacity_bodies = workload.bodies(rng.integers(0, pool, 512), [None] * 512)
    reference_path = f"/v2/models/{model}/versions/{REFERENCE}/infer"
    capacity = in_client_process(
        {"kind": "closed", "port": args.http_port,
         "requests": [http_request(args.http_port, reference_path, b) for b in capacity_bodies],
         "seconds": 5.0}
    )  # fmt: skip
    rate = args.rate or capacity / 2
    print(
        f"capacity ({REFERENCE} pinned, {CLOSED_LOOP_CALLERS} closed-loop callers) "
        f"{capacity:.0f} req/s; base rate {rate:.0f}"
    )

    offsets, phases = _schedule(rng, rate, args.seconds)
    count = len(offsets)
    picks = rng.integers(0, pool, count)
    multiples = rng.choice(np.array(BUDGET_MULTIPLES, dtype=object), count, p=BUDGET_WEIGHTS)
    budgets = [None if m is None else round(float(m) * fastest_ms, 3) for m in multiples]
    routed = workload.bodies(picks, budgets)
    pinned = workload.bodies(picks, [None] * count)
    variants = sorted(quality)
    random_variants = [variants[i] for i in rng.integers(0, len(variants), count)]
    plans = {
        "gearbox": ([f"/v2/models/{model}/infer"] * count, routed),
        "fp32-only": ([reference_path] * count, pinned),
        "fastest-only": ([f"/v2/models/{model}/versions/{fastest}/infer"] * count, pinned),
        "random": ([f"/v2/models/{model}/versions/{v}/infer" for v in random_variants], pinned),
    }
    requests = {
        policy: [
            http_request(args.http_port, path, body)
            for path, body in zip(paths, bodies, strict=True)
        ]
        for policy, (paths, bodies) in plans.items()
    }
    results: dict[str, list[dict[str, Any]]] = {policy: [] for policy in plans}
    cpu: dict[str, CpuTimes | None] = {policy: CpuTimes(0.0, 0.0, 0.0) for policy in plans}
    slices = _slices(offsets, args.seconds, args.slices)
    orders = _rounds(list(plans), args.slices)
    for (first, end, starts_at), order in zip(slices, orders, strict=True):
        for policy in order:
            time.sleep(SLICE_DRAIN_S)
            before = CpuTimes.now()
            results[policy] += in_client_process(
                {"kind": "replay", "port": args.http_port,
                 "offsets": [offset - starts_at for offset in offsets[first:end]],
                 "requests": requests[policy][first:end], "limit_s": 30.0}
            )  # fmt: skip
            after = CpuTimes.now()
            spent = cpu[policy]
            cpu[policy] = None if spent is None or before is None or after is None else (
                spent + (after - before)
            )  # fmt: skip
        print(f"slice {starts_at:.0f}-{starts_at + args.seconds / args.slices:.0f} s done")

    policies = {}
    for policy in plans:
        _read_answers(results[policy], workload, picks)
        policies[policy] = _summarise(
            results[policy],
            budgets,
            unloaded.fastest_item_ms[picks],
            quality,
            args.seconds,
            list(multiples),
            phases,
            allowance_ms,
        )
        row = policies[policy]
        spent = cpu[policy]
        row["cpu_busy_share"] = spent.busy / spent.total if spent and spent.total else None
        row["cpu_steal_share"] = spent.steal / spent.total if spent and spent.total else None
        print(
            f"{policy:<13} met {row['met']}/{row['feasible']} ({100 * row['met_share']:.1f} %) "
            f"{workload.quality_name} {row['quality']:.4f} "
            f"p50/p99 {row['p50_ms']:.2f}/{row['p99_ms']:.2f} ms"
        )
    unloaded_share = _unloaded_met_share(
        unloaded.fastest_samples_ms, unloaded.fastest_sample_floors_ms, fastest_ms
    )
    print(f"the fastest variant unloaded would meet {100 * unloaded_share:.1f} % of the budgets")

    gearbox = policies["gearbox"]
    best = min(SINGLE_VARIANT, key=lambda p: policies[p]["misses"])
    ratio = policies[best]["misses"] / max(gearbox["misses"], 1)
    checks = [
        (
            f"gearbox meets >= {100 * FEASIBLE_TARGET:.0f} % of feasible budgets",
            gearbox["met_share"] >= FEASIBLE_TARGET,
            f"{100 * gearbox['met_share']:.1f} %",
        ),
        (
            f"gearbox has >= {MISS_RATIO_TARGET:g}x fewer misses than {best}",
            ratio >= MISS_RATIO_TARGET,
            f"{gearbox['misses']} vs {policies[best]['misses']} ({ratio:.1f}x)",
        ),
        (
            f"gearbox {workload.quality_name} >= {best}'s",
            gearbox["quality"] >= policies[best]["quality"],
            f"{gearbox['quality']:.4f} vs {policies[best]['quality']:.4f}",
        ),
    ]
    return {
        "command": " ".join(["bench/slo_bench.py", *sys.argv[1:]]),
        "cores": os.cpu_count(),
        "seed": args.seed,
        "seconds": args.seconds,
        "model": model,
        "quality_name": workload.quality_name,
        "fastest": fastest,
        "fastest_ms": fastest_ms,
        "capacity_rps": capacity,
        "transport_allowance_ms": allowance_ms,
        "outside_ms": {v: unloaded.outside_ms[v] for v in variants},
        "rate_rps": rate,
        "slices": args.slices,
        "unloaded_met_share": unloaded_share,
        "budgets": ", ".join("none" if m is None else f"{m:g}L" for m in BUDGET_MULTIPLES),
        "variants": {v: {"quality": quality[v], "p50_ms": unloaded.p50_ms[v]} for v in variants},
        "policies": policies,
        "checks": checks,
    }


if __name__ == "__main__":
    sys.exit(main())
