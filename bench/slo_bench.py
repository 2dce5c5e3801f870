"""SLO benchmark: do callers' latency budgets hold under open-loop load with a spike?

    .venv/bin/python bench/slo_bench.py [--repo DIR [--reuse]] [--seconds 60] [--rate R]
        [--seed 7] [--json PATH] [--markdown PATH]
        [--http-port 18200] [--grpc-port 19200] [--metrics-port 18280]

1. Serves the `digits` repository (``--reuse``: the one at --repo; otherwise
   ``gearbox compress --example digits`` builds one) with the real ``gearbox serve`` console
   script, HAProxy ingress, bound to 127.0.0.1, and stops it with SIGINT at the end.
2. Measures, from a separate client process, every ready variant's unloaded end-to-end latency
   at the client (pinned, sequential); the fastest p50 is L.
3. Builds one schedule, replayable from --seed: Poisson arrivals (exponential gaps) at half the
   measured capacity for the first third of --seconds, twice that (a spike) for the middle
   third, half again for the last; each request carries one held-out digit and a budget drawn
   from 1.5L, 2L, 3L, 5L, 10L or none. A budget is *feasible* if it is at least L (the fastest
   variant meets it unloaded). Capacity is measured first with a short closed-loop run of the
   same request mix through the router (--rate overrides the half-capacity rate).
4. Replays that schedule once per policy against the same server, from a separate client
   process: ``gearbox`` (routed, the budget sent as ``latency_budget_ms``), ``fp32-only``,
   ``fastest-only`` (pinned to the fastest variant) and ``random`` (each request pinned to a
   uniformly drawn ready variant). Open loop: a request is sent at its scheduled time whatever
   happened to earlier ones.
5. Judges at the client: a request meets its budget only if an HTTP 200 arrived within the
   budget, counted from its *scheduled* send time (an open-loop caller waits from when it
   wanted to send; the client's own lateness in sending is reported separately). 429s and
   errors are misses. Per policy: budgets met of the feasible, misses, accuracy against the
   labels and the mean manifest quality of the answering variants, p50/p95/p99 from the
   scheduled time, throughput.
Targets (PASS/FAIL, exit 1 on FAIL): gearbox meets >= 97 % of feasible budgets over the whole
run; it has >= 3x fewer misses than the best single-variant policy (fp32-only, fastest-only),
at equal or better accuracy than that policy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

GEARBOX = str(Path(sys.executable).with_name("gearbox"))
MODEL = "digits"
BUDGET_MULTIPLES: tuple[float | None, ...] = (1.5, 2.0, 3.0, 5.0, 10.0, None)
BUDGET_WEIGHTS = (0.2, 0.2, 0.2, 0.15, 0.1, 0.15)
POLICIES = ("gearbox", "fp32-only", "fastest-only", "random")
SINGLE_VARIANT = ("fp32-only", "fastest-only")
MAX_CONNECTIONS = 64
FEASIBLE_TARGET = 0.97
MISS_RATIO_TARGET = 3.0


# --- the client process -----------------------------------------------------------------------


def _bodies(images: np.ndarray, budgets: list[float | None]) -> list[bytes]:
    bodies = []
    for image, budget in zip(images, budgets, strict=True):
        document: dict[str, Any] = {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "FP32",
                    "shape": [1, *image.shape],
                    "data": image.ravel().tolist(),
                }
            ]
        }
        if budget is not None:
            document["parameters"] = {"latency_budget_ms": budget}
        bodies.append(json.dumps(document).encode())
    return bodies


async def _replay(
    base: str, offsets: list[float], paths: list[str], bodies: list[bytes], limit_s: float
) -> list[dict[str, Any]]:
    """Sends request i at offsets[i] seconds from now; returns per request what came back."""
    import aiohttp

    results: list[dict[str, Any]] = [{} for _ in offsets]
    connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=limit_s)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as session:
        start = time.perf_counter() + 0.2

        async def one(index: int) -> None:
            scheduled = start + offsets[index]
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            record: dict[str, Any] = {"late_ms": (sent - scheduled) * 1000}
            try:
                async with session.post(paths[index], data=bodies[index], headers=headers) as r:
                    payload = await r.read()
                    record["status"] = r.status
                    if r.status == 200:
                        answer = json.loads(payload)
                        record["variant"] = answer["model_version"]
                        record["top1"] = int(np.argmax(answer["outputs"][0]["data"]))
            except (aiohttp.ClientError, TimeoutError) as error:
                record["status"] = type(error).__name__
            record["ms"] = (time.perf_counter() - scheduled) * 1000
            results[index] = record

        await asyncio.gather(*(one(i) for i in range(len(offsets))))
    return results


async def _closed_loop(base: str, path: str, bodies: list[bytes], seconds: float) -> float:
    """Requests/s of 16 callers that each send again as soon as answered."""
    import aiohttp

    done = 0
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(base) as session:
        end = time.perf_counter() + seconds

        async def caller(offset: int) -> None:
            nonlocal done
            i = offset
            while time.perf_counter() < end:
                async with session.post(path, data=bodies[i % len(bodies)], headers=headers) as r:
                    await r.read()
                    done += r.status == 200
                i += 16

        started = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(16)))
        return done / (time.perf_counter() - started)


def _client(task: dict[str, Any], out: Any) -> None:
    """Entry of the client process: runs one task, sends its result back."""
    import uvloop

    if task["kind"] == "replay":
        result = uvloop.run(
            _replay(task["base"], task["offsets"], task["paths"], task["bodies"], task["limit"])
        )
    else:
        result = uvloop.run(
            _closed_loop(task["base"], task["path"], task["bodies"], task["seconds"])
        )
    out.send(result)


def in_client_process(task: dict[str, Any]) -> Any:
    parent, child = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.get_context("spawn").Process(target=_client, args=(task, child))
    process.start()
    result = parent.recv()
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


def _unloaded_p50(base: str, variant: str, body: bytes, requests: int = 200) -> float:
    import http.client

    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port))
    samples = []
    for i in range(requests + 50):
        started = time.perf_counter()
        connection.request(
            "POST", f"/v2/models/{MODEL}/versions/{variant}/infer", body,
            {"content-type": "application/json"},
        )  # fmt: skip
        connection.getresponse().read()
        if i >= 50:
            samples.append((time.perf_counter() - started) * 1000)
    connection.close()
    return float(np.percentile(samples, 50))


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


def _summarise(
    results: list[dict[str, Any]],
    budgets: list[float | None],
    labels: np.ndarray,
    quality: dict[str, float],
    fastest_ms: float,
    seconds: float,
) -> dict[str, Any]:
    feasible = met = 0
    correct = answered = 0
    qualities = []
    statuses: Counter[str] = Counter()
    latencies = []
    for record, budget, label in zip(results, budgets, labels, strict=True):
        ok = record.get("status") == 200
        statuses[str(record.get("status"))] += 1
        latencies.append(record["ms"])
        if ok:
            answered += 1
            correct += record["top1"] == int(label)
            qualities.append(quality[record["variant"]])
        if budget is not None and budget >= fastest_ms:
            feasible += 1
            met += ok and record["ms"] <= budget
    return {
        "requests": len(results),
        "feasible": feasible,
        "met": met,
        "met_share": met / feasible if feasible else 1.0,
        "misses": feasible - met,
        "accuracy": correct / max(answered, 1),
        "mean_manifest_quality": float(np.mean(qualities)) if qualities else 0.0,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "throughput_rps": answered / seconds,
        "statuses": dict(statuses),
        "late_p99_ms": float(np.percentile([r["late_ms"] for r in results], 99)),
        "variants": dict(Counter(r.get("variant", "-") for r in results)),
    }


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Run of `{report['command']}` on {report['cores']} cores, seed {report['seed']}: "
        f"L (fastest variant `{report['fastest']}`, unloaded, at the client) = "
        f"{report['fastest_ms']:.2f} ms; capacity {report['capacity_rps']:.0f} req/s; rate "
        f"{report['rate_rps']:.0f} req/s, {2 * report['rate_rps']:.0f} req/s in the middle "
        f"third; {report['seconds']:g} s per policy; budgets {report['budgets']}.",
        "",
        "| variant | manifest accuracy | unloaded client p50 |",
        "|---|---|---|",
    ]
    for name, figures in sorted(report["variants"].items()):
        lines.append(f"| {name} | {figures['quality']:.4f} | {figures['p50_ms']:.2f} ms |")
    lines += [
        "",
        "| policy | budgets met (of feasible) | misses | accuracy | p50 / p95 / p99 | "
        "throughput | answered by |",
        "|---|---|---|---|---|---|---|",
    ]
    for policy in POLICIES:
        row = report["policies"][policy]
        used = ", ".join(f"{k} {v}" for k, v in sorted(row["variants"].items()))
        lines.append(
            f"| {policy} | {row['met']}/{row['feasible']} ({100 * row['met_share']:.1f} %) | "
            f"{row['misses']} | {row['accuracy']:.4f} | {row['p50_ms']:.2f} / "
            f"{row['p95_ms']:.2f} / {row['p99_ms']:.2f} ms | {row['throughput_rps']:.0f}/s | "
            f"{used} |"
        )
    lines += ["", *(f"- {'PASS' if ok else 'FAIL'} {name}: {figure}" for name, ok, figure in
                    report["checks"])]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--seconds", type=float, default=60.0, help="per policy")
    parser.add_argument("--rate", type=float, help="base rate (default: half the capacity)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--http-port", type=int, default=18200)
    parser.add_argument("--grpc-port", type=int, default=19200)
    parser.add_argument("--metrics-port", type=int, default=18280)
    args = parser.parse_args()
    if args.reuse and args.repo is None:
        parser.error("--reuse needs --repo")
    if args.seconds <= 0 or args.seconds > 600:
        parser.error("--seconds must lie in (0, 600]")
    repo = args.repo or Path(tempfile.mkdtemp(prefix="gearbox-slo-"))
    if not args.reuse:
        subprocess.run(
            [GEARBOX, "compress", "--example", MODEL, "--repo", str(repo)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip

    from gearbox.compression.examples.digits import load_splits

    heldout = load_splits().heldout
    images = heldout.inputs["images"].astype(np.float32)
    labels = np.asarray(heldout.labels)
    base = f"http://127.0.0.1:{args.http_port}"
    log = Path(tempfile.mkstemp(prefix="gearbox-slo-serve-", suffix=".log")[1])
    server = subprocess.Popen(
        [GEARBOX, "serve", "--repo", str(repo), "--http-port", str(args.http_port),
         "--grpc-port", str(args.grpc_port), "--metrics-port", str(args.metrics_port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_ready(base, server, log)
        report = run(args, base, images, labels)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    print(_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.write_text(_markdown(report))
    return 0 if all(ok for _, ok, _ in report["checks"]) else 1


def run(
    args: argparse.Namespace, base: str, images: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    rows = _get(f"{base}/v2/models/{MODEL}/variants")["variants"]
    quality = {r["variant"]: r["quality"]["value"] for r in rows if r["served"]}
    probe = _bodies(images[:1], [None])[0]
    p50 = {variant: _unloaded_p50(base, variant, probe) for variant in sorted(quality)}
    fastest = min(p50, key=p50.__getitem__)
    fastest_ms = p50[fastest]
    print(f"unloaded client p50 per variant: {p50}; L = {fastest_ms:.3f} ms ({fastest})")

    rng = np.random.default_rng(args.seed)
    mix_budgets = [
        None if m is None else round(m * fastest_ms, 3)
        for m in rng.choice(np.array(BUDGET_MULTIPLES, dtype=object), 512, p=BUDGET_WEIGHTS)
    ]
    mix_bodies = _bodies(images[rng.integers(0, len(images), 512)], mix_budgets)
    capacity = in_client_process(
        {"kind": "closed", "base": base, "path": f"/v2/models/{MODEL}/infer",
         "bodies": mix_bodies, "seconds": 5.0}
    )  # fmt: skip
    rate = args.rate or capacity / 2
    print(f"capacity (routed, 16 closed-loop callers) {capacity:.0f} req/s; base rate {rate:.0f}")

    offsets, _phases = _schedule(rng, rate, args.seconds)
    count = len(offsets)
    picks = rng.integers(0, len(images), count)
    multiples = rng.choice(np.array(BUDGET_MULTIPLES, dtype=object), count, p=BUDGET_WEIGHTS)
    budgets = [None if m is None else round(float(m) * fastest_ms, 3) for m in multiples]
    routed = _bodies(images[picks], budgets)
    pinned = _bodies(images[picks], [None] * count)
    variants = sorted(quality)
    random_variants = [variants[i] for i in rng.integers(0, len(variants), count)]
    plans = {
        "gearbox": ([f"/v2/models/{MODEL}/infer"] * count, routed),
        "fp32-only": ([f"/v2/models/{MODEL}/versions/fp32/infer"] * count, pinned),
        "fastest-only": ([f"/v2/models/{MODEL}/versions/{fastest}/infer"] * count, pinned),
        "random": ([f"/v2/models/{MODEL}/versions/{v}/infer" for v in random_variants], pinned),
    }
    policies = {}
    for policy, (paths, bodies) in plans.items():
        time.sleep(2)  # let the previous policy's queue drain
        results = in_client_process(
            {"kind": "replay", "base": base, "offsets": offsets, "paths": paths,
             "bodies": bodies, "limit": 30.0}
        )  # fmt: skip
        policies[policy] = _summarise(
            results, budgets, labels[picks], quality, fastest_ms, args.seconds
        )
        row = policies[policy]
        print(
            f"{policy:<13} met {row['met']}/{row['feasible']} ({100 * row['met_share']:.1f} %) "
            f"accuracy {row['accuracy']:.4f} p50/p99 {row['p50_ms']:.2f}/{row['p99_ms']:.2f} ms"
        )

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
            f"gearbox accuracy >= {best}'s",
            gearbox["accuracy"] >= policies[best]["accuracy"],
            f"{gearbox['accuracy']:.4f} vs {policies[best]['accuracy']:.4f}",
        ),
    ]
    return {
        "command": " ".join(["bench/slo_bench.py", *sys.argv[1:]]),
        "cores": os.cpu_count(),
        "seed": args.seed,
        "seconds": args.seconds,
        "fastest": fastest,
        "fastest_ms": fastest_ms,
        "capacity_rps": capacity,
        "rate_rps": rate,
        "budgets": ", ".join("none" if m is None else f"{m:g}L" for m in BUDGET_MULTIPLES),
        "variants": {v: {"quality": quality[v], "p50_ms": p50[v]} for v in variants},
        "policies": policies,
        "checks": checks,
    }


if __name__ == "__main__":
    sys.exit(main())
