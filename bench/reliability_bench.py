"""Reliability benchmark: fuzzed bad input over both protocols, and replicas killed under a
steady load. Writes docs/RELIABILITY.md.

    .venv/bin/python bench/reliability_bench.py [--repo DIR [--reuse]] [--cases 10000]
        [--kills 3] [--load-s 8] [--seed 0] [--markdown docs/RELIABILITY.md] [--json PATH]
        [--http-port 18400] [--grpc-port 19400] [--metrics-port 18480]

Setup. With --reuse the `digits` repository at --repo is served as it is; otherwise
`gearbox compress --example digits` builds one (a temp dir by default). The gateway is deployed
as `gearbox serve --replicas 2` deploys it: a local Ray of its own, Ray Serve's HAProxy ingress,
two gateway replicas. Everything binds 127.0.0.1.

1. Fuzzing. --cases requests per protocol, drawn by Hypothesis from the strategies in
   tests/fixtures/oip_fuzz.py (wrong datatypes, shape/length mismatches, negative or huge
   dimensions, NaN/Inf, wrong tensor counts, bad binary sizes, wrong parameter types,
   oversized payloads, invalid UTF-8, deep nesting, very long numbers; a share of valid
   requests among them), sent over HTTP (requests) and gRPC (the generated stub). Counted:
   what came back per protocol and per kind of case; server errors (5xx, INTERNAL, UNKNOWN,
   UNAVAILABLE, no answer); replicas that died (their processes, before and after).
   Targets: 0 server errors, 0 replica deaths.

2. Kills. --kills times: a steady load (two HTTP clients and one gRPC client, each sending
   one-row requests back to back) runs for --load-s seconds, one gateway replica's process is
   killed with SIGKILL, and the load runs on until Ray Serve has replaced it and --load-s
   more seconds have passed. Counted: requests sent, answered, lost (any request that did not
   get its answer), and the time from the kill to two running replicas again.
   Target: 0 lost requests.

Exit status 1 if a target is missed, 2 if the run could not be set up.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gearbox.compression.cluster import ray_session  # noqa: E402
from gearbox.compression.examples.digits import load_splits  # noqa: E402
from gearbox.serving.config import APP_NAME, GatewayConfig  # noqa: E402
from gearbox.serving.ingress import Ingress, ray_environment, session_state_dir  # noqa: E402
from gearbox.serving.server import LOOPBACK, start_gateway  # noqa: E402
from tests.fixtures.load import SteadyLoad  # noqa: E402
from tests.fixtures.oip_fuzz import fuzz_live  # noqa: E402
from tests.fixtures.processes import GATEWAY_REPLICA, cluster_processes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import digits_repository_to_serve  # noqa: E402

MODEL = "digits"
REPLICAS = 2
GEARBOX = str(Path(sys.executable).with_name("gearbox"))
RECOVERY_TIMEOUT_S = 300.0


def _replicas(gcs: str) -> list[int]:
    return sorted(cluster_processes(gcs, GATEWAY_REPLICA))


def _running() -> int:
    deployment = serve.status().applications[APP_NAME].deployments["Gateway"]
    return deployment.replica_states.get("RUNNING", 0)


def fuzz_phase(args: argparse.Namespace, gcs: str) -> dict[str, Any]:
    before = _replicas(gcs)
    started = time.perf_counter()
    report = fuzz_live(
        f"http://{LOOPBACK}:{args.http_port}",
        f"{LOOPBACK}:{args.grpc_port}",
        MODEL,
        args.cases,
        args.seed,
    )
    after = _replicas(gcs)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["replicas_before"] = len(before)
    report["replica_deaths"] = len(set(before) - set(after))
    return report


def kill_phase(args: argparse.Namespace, gcs: str) -> list[dict[str, Any]]:
    rows = load_splits().heldout.inputs["images"][:64]
    runs = []
    for _ in range(args.kills):
        victims = _replicas(gcs)
        if len(victims) != REPLICAS:
            raise RuntimeError(f"expected {REPLICAS} gateway replicas, found {len(victims)}")
        load = SteadyLoad(
            f"http://{LOOPBACK}:{args.http_port}", f"{LOOPBACK}:{args.grpc_port}", MODEL, rows
        ).start()
        try:
            time.sleep(args.load_s)
            killed_at = time.monotonic()
            os.kill(victims[0], signal.SIGKILL)
            deadline = killed_at + RECOVERY_TIMEOUT_S
            while not (
                victims[0] not in _replicas(gcs)
                and len(_replicas(gcs)) == REPLICAS
                and _running() == REPLICAS
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError("the killed replica was never replaced")
                time.sleep(0.1)
            recovered_s = time.monotonic() - killed_at
            time.sleep(args.load_s)
        finally:
            report = load.stop()
        crossing = [s for s in report.sent if s.started < killed_at < s.finished]
        runs.append(
            {
                "sent": len(report.sent),
                "answered": report.answered,
                "lost": len(report.failed()),
                "lost_outcomes": {k: n for k, n in report.outcomes().items() if k != "ok"},
                "lost_details": [
                    {
                        "protocol": s.protocol,
                        "after_kill_s": round(s.started - killed_at, 3),
                        "detail": s.detail,
                    }
                    for s in report.failed()
                ][:10],
                "in_flight_at_the_kill": len(crossing),
                "recovery_s": round(recovered_s, 1),
                "by_protocol": {
                    protocol: sum(1 for s in report.sent if s.protocol == protocol)
                    for protocol in ("http", "grpc")
                },
            }
        )
    return runs


def markdown(results: dict[str, Any]) -> str:
    fuzz, kills, machine = results["fuzz"], results["kills"], results["machine"]
    lines = [
        "# Reliability",
        "",
        "Made by `bench/reliability_bench.py` (run it again to refresh this page):",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"Run on {machine['date']}, {machine['cores']} cores ({machine['platform']}), against a "
        f"gateway of {REPLICAS} replicas behind Ray Serve's HAProxy ingress serving the "
        "`digits` example.",
        "",
        "## Bad input",
        "",
        f"{fuzz['cases_per_protocol']:,} cases per protocol, drawn by Hypothesis (seed "
        f"{fuzz['seed']}) from `tests/fixtures/oip_fuzz.py`. Server errors are 5xx over HTTP, "
        "INTERNAL / UNKNOWN / UNAVAILABLE / DEADLINE_EXCEEDED / DATA_LOSS over gRPC, or no "
        "answer at all.",
        "",
        "| Protocol | Cases | Server errors | Unexpected answers | Healthy after | Seconds |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for protocol in ("http", "grpc"):
        figures = fuzz[protocol]
        unexpected = sum(figures["unexpected_answers_by_label"].values())
        lines.append(
            f"| {protocol.upper()} | {figures['cases']:,} | {figures['server_errors']} | "
            f"{unexpected} | {'yes' if figures['healthy_after'] else 'NO'} | "
            f"{figures['seconds']} |"
        )
    lines += [
        "",
        f"Gateway replicas before: {fuzz['replicas_before']}; died during the fuzzing: "
        f"{fuzz['replica_deaths']}.",
    ]
    for protocol in ("http", "grpc"):
        figures = fuzz[protocol]
        statuses = sorted(figures["by_status"])
        lines += [
            "",
            f"### What came back over {protocol.upper()}, by kind of case",
            "",
            "| Case | " + " | ".join(statuses) + " |",
            "|---|" + "---:|" * len(statuses),
        ]
        for label, counts in figures["by_label_status"].items():
            cells = " | ".join(str(counts.get(status, "")) for status in statuses)
            lines.append(f"| {label} | {cells} |")
        if figures["server_error_examples"]:
            lines += ["", "Server errors seen:", ""]
            lines += [
                f"- {e['label']}: {e['status']}: {e['detail']}"
                for e in figures["server_error_examples"]
            ]
    lines += [
        "",
        "## Replicas killed under load",
        "",
        "Each run: two HTTP clients and one gRPC client send one-row requests back to back; "
        "one gateway replica's process is killed with SIGKILL mid-run. A request is lost when "
        "its client got no answer (an error status or a broken connection). Recovery: from "
        "the kill to two running replicas again.",
        "",
        "| Run | Sent | Answered | Lost | In flight at the kill | Recovery (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for index, run in enumerate(kills, 1):
        lines.append(
            f"| {index} | {run['sent']:,} | {run['answered']:,} | {run['lost']} | "
            f"{run['in_flight_at_the_kill']} | {run['recovery_s']} |"
        )
    lost = [(index, d) for index, run in enumerate(kills, 1) for d in run["lost_details"]]
    if lost:
        lines += ["", "What the lost requests' clients got (seconds after the kill):", ""]
        lines += [
            f"- run {index}, {d['protocol']}, {d['after_kill_s']:+.3f} s: {d['detail']}"
            for index, d in lost
        ]
    lines += [
        "",
        "Requests in flight on the killed replica are sent again to the other one by the "
        "ingress (inference is idempotent; Gearbox sets HAProxy's `retry-on` to connection "
        "failures and empty or broken answers, and its launcher makes HAProxy wait for each "
        "request's body before forwarding it, without which HAProxy cannot resend it), and new "
        "connections go to the live replica until the replacement is ready.",
        "",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, help="digits repository (default: build one)")
    parser.add_argument("--reuse", action="store_true", help="skip compression, serve --repo")
    parser.add_argument("--cases", type=int, default=10_000, help="fuzz cases per protocol")
    parser.add_argument("--kills", type=int, default=3, help="replicas killed, one per run")
    parser.add_argument("--load-s", type=float, default=8.0, help="load before and after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "RELIABILITY.md")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--http-port", type=int, default=18400)
    parser.add_argument("--grpc-port", type=int, default=19400)
    parser.add_argument("--metrics-port", type=int, default=18480)
    return parser


def main() -> int:
    args = _parser().parse_args()
    if args.reuse and args.repo is None:
        print("error: --reuse needs --repo", file=sys.stderr)
        return 2
    ports = {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
    repo_dir = digits_repository_to_serve(args.repo, args.reuse, ports)
    if repo_dir is None:
        return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with contextlib.ExitStack() as stack:
        state_dir = session_state_dir()
        stack.callback(shutil.rmtree, state_dir, ignore_errors=True)
        stack.enter_context(ray_session(None, env=ray_environment(Ingress.HAPROXY, state_dir)))
        stack.callback(serve.shutdown)
        gcs = ray.get_runtime_context().gcs_address
        config = GatewayConfig.create(
            repo_dir, metrics_port=args.metrics_port, replicas=REPLICAS, shadow_fraction=0
        )
        stack.callback(shutil.rmtree, config.metrics_directory, ignore_errors=True)
        start_gateway(config, args.http_port, args.grpc_port)
        print(f"fuzzing: {args.cases:,} cases per protocol", flush=True)
        fuzz = fuzz_phase(args, gcs)
        print(f"killing replicas: {args.kills} runs", flush=True)
        kills = kill_phase(args, gcs)
    results = {
        "command": " ".join(["python", "bench/reliability_bench.py", *sys.argv[1:]]),
        "machine": {
            "date": datetime.date.today().isoformat(),
            "cores": os.cpu_count(),
            "platform": platform.machine(),
        },
        "fuzz": fuzz,
        "kills": kills,
    }
    page = markdown(results)
    args.markdown.write_text(page)
    print(page)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    missed = (
        fuzz["server_errors"] > 0
        or fuzz["replica_deaths"] > 0
        or any(run["lost"] for run in kills)
        or not (fuzz["http"]["healthy_after"] and fuzz["grpc"]["healthy_after"])
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
