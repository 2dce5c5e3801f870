"""Benchmark of Gearbox's metrics: does PromQL's p95 per variant tell what callers saw, and
does shadow agreement cost the response path anything?

    .venv/bin/python bench/metrics_bench.py [--repo DIR [--reuse]] [--json PATH]
        [--requests 1000] [--warmup 100] [--shadow-requests 1500] [--rounds 2]
        [--http-port 18300] [--grpc-port 19300] [--metrics-port 18380]

Setup. With --reuse the `digits` repository at --repo is served as it is; otherwise
`gearbox compress --example digits` builds one (a temp dir by default). The gateway is deployed
as `gearbox serve` deploys it (a local Ray, the HAProxy ingress, `start_gateway`), and a real
Prometheus (Debian's package: `make prometheus`) scrapes it every second with the shipped
deploy/prometheus/prometheus.yml, its target set to this gateway. Everything binds 127.0.0.1.

1. PromQL p95 against the client's p95. Shadow off. For each ready variant (pinned) and for
   routed requests (latency_budget_ms 50): --warmup untimed requests, then --requests
   sequential HTTP requests on one keep-alive connection, each timed at the client. Once
   Prometheus has scraped the last of them, for each variant
   histogram_quantile(0.95, sum by (le, variant) (increase(
       gearbox_request_latency_seconds_bucket{model="digits"}[W])))
   over the measured window W. Check: |PromQL p95 - client p95| <= max(1 ms, 30 % of the
   client p95). Reported beside it: the p95 of the `latency_ms` the answers carried (the same
   clock as the histogram; the rest is the ingress and the client's own stack).

2. Shadow cost. The gateway is redeployed with shadow_fraction 0 and 1 in turns (--rounds
   each, alternating), and each time --shadow-requests sequential HTTP requests pinned to the
   fastest non-reference variant are timed at the client. With fraction 1 every answer is
   followed, once the device class is idle, by a run of the reference variant off the
   response path. Reported: client p50 / p95 / p99 per setting, pooled over rounds, and how
   many comparisons the replicas made (the agreement ledger's rows). Check: p50 and p95 with
   shadow within 10 % (or 0.1 ms) of without.

--json PATH writes every figure. Exit status 1 on a FAIL, 2 if the run could not be set up.
The machine this was written for has 2 cores shared with other work: read the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gearbox.compression import ModelRepository  # noqa: E402
from gearbox.compression.cluster import ray_session  # noqa: E402
from gearbox.compression.examples.digits import load_splits  # noqa: E402
from gearbox.serving.config import APP_NAME, GatewayConfig  # noqa: E402
from gearbox.serving.ingress import Ingress, ray_environment, session_state_dir  # noqa: E402
from gearbox.serving.metric_names import REQUEST_LATENCY  # noqa: E402
from gearbox.serving.server import LOOPBACK, start_gateway  # noqa: E402
from tests.fixtures.prometheus import PrometheusServer, prometheus_binary  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import HttpCaller, digits_repository_to_serve  # noqa: E402

MODEL = "digits"
REFERENCE = "fp32"
ROUTED = "routed"
BUDGET_MS = 50.0
GEARBOX = str(Path(sys.executable).with_name("gearbox"))
SCRAPE_INTERVAL_S = 1.0
MAX_GAP_MS = 1.0
MAX_GAP_SHARE = 0.30
SHADOW_SLACK = 0.10
SHADOW_SLACK_MS = 0.1


def _body(image: np.ndarray, **parameters: Any) -> bytes:
    tensor = {"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8],
              "data": image.ravel().tolist()}  # fmt: skip
    return json.dumps({"inputs": [tensor], "parameters": parameters}).encode()


def _path(variant: str) -> str:
    if variant == ROUTED:
        return f"/v2/models/{MODEL}/infer"
    return f"/v2/models/{MODEL}/versions/{variant}/infer"


def timed(port: int, variant: str, image: np.ndarray, warmup: int, requests: int) -> dict:
    """Client latencies (ms) and the `latency_ms` each answer carried, measured by a client
    process of its own (this one hosts Ray's driver, whose threads would delay its clock)."""
    body = _body(image, **({"latency_budget_ms": BUDGET_MS} if variant == ROUTED else {}))
    command = [sys.executable, __file__, "client", str(port), _path(variant), str(warmup),
               str(requests)]  # fmt: skip
    done = subprocess.run(command, input=body, capture_output=True, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the client failed: {done.stderr.decode(errors='replace')[-800:]}")
    return json.loads(done.stdout)


def client(port: int, path: str, warmup: int, requests: int) -> dict:
    """Sequential requests on one keep-alive connection, the body read from stdin."""
    caller = HttpCaller(port, path, sys.stdin.buffer.read())
    try:
        for _ in range(warmup):
            caller()
        latencies, told, chosen = [], [], set()
        for _ in range(requests):
            elapsed, raw = caller()
            answer = json.loads(raw)
            latencies.append(elapsed)
            told.append(answer["parameters"]["latency_ms"])
            chosen.add(answer["model_version"])
    finally:
        caller.close()
    return {"client_ms": latencies, "gateway_ms": told, "answered_by": sorted(chosen)}


def _cpu_ticks() -> list[int]:
    """The machine's CPU ticks by state, from /proc/stat (user, nice, system, idle, iowait,
    irq, softirq, steal)."""
    return [int(field) for field in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]


def _stolen_share(before: list[int], after: list[int]) -> float:
    """Share of the machine's CPU time the hypervisor took for others between two readings."""
    total = sum(after) - sum(before)
    return (after[7] - before[7]) / total if total else 0.0


def _quantiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(values, q)), 4) for q in (50, 95, 99)}


def promql_p95(prometheus: PrometheusServer, window_s: float) -> dict[str, float]:
    expr = (
        f"histogram_quantile(0.95, sum by (le, variant) (increase("
        f'{REQUEST_LATENCY.name}_bucket{{model="{MODEL}"}}[{int(window_s)}s])))'
    )
    return {k: v * 1000 for k, v in prometheus.values(expr, by="variant").items()}


def p95_phase(args: argparse.Namespace, prometheus: PrometheusServer, variants: list[str]):
    image = load_splits().heldout.inputs["images"][0]
    figures: dict[str, Any] = {}
    for variant in [*variants, ROUTED]:
        # The series must exist before the window opens: increase() needs a first sample.
        timed(args.http_port, variant, image, args.warmup, 1)
        prometheus.wait_for_scrapes(2)
        opened = time.time()
        cpu_before = _cpu_ticks()
        run = timed(args.http_port, variant, image, 0, args.requests)
        stolen = _stolen_share(cpu_before, _cpu_ticks())
        time.sleep(1.2)  # the replica writes its figures every second
        prometheus.wait_for_scrapes(2)
        window = time.time() - opened + SCRAPE_INTERVAL_S
        by_variant = promql_p95(prometheus, window)
        (served,) = run["answered_by"] if len(run["answered_by"]) == 1 else (None,)
        client_p95 = float(np.percentile(run["client_ms"], 95))
        promql = by_variant.get(served) if served else None
        allowed = max(MAX_GAP_MS, MAX_GAP_SHARE * client_p95)
        outside = [c - g for c, g in zip(run["client_ms"], run["gateway_ms"], strict=True)]
        figures[variant] = {
            "answered_by": run["answered_by"],
            "client": _quantiles(run["client_ms"]),
            "latency_ms": _quantiles(run["gateway_ms"]),
            "outside_clock": _quantiles(outside),
            "cpu_stolen_share": round(stolen, 3),
            "promql_p95_ms": None if promql is None else round(promql, 4),
            "allowed_gap_ms": round(allowed, 4),
            "ok": promql is not None and abs(promql - client_p95) <= allowed,
        }
    return figures


def redeploy(config: GatewayConfig, args: argparse.Namespace) -> None:
    with contextlib.suppress(Exception):
        serve.delete(APP_NAME)
    start_gateway(config, args.http_port, args.grpc_port)


def shadow_phase(args: argparse.Namespace, config: GatewayConfig, variant: str) -> dict:
    image = load_splits().heldout.inputs["images"][1]
    pooled: dict[float, list[float]] = {0.0: [], 1.0: []}
    rounds: list[dict[str, Any]] = []
    order = [0.0, 1.0]
    for round_index in range(args.rounds):
        for fraction in order if round_index % 2 == 0 else order[::-1]:
            redeploy(dataclasses.replace(config, shadow_fraction=fraction), args)
            run = timed(args.http_port, variant, image, args.warmup, args.shadow_requests)
            pooled[fraction] += run["client_ms"]
            rounds.append({"shadow_fraction": fraction, "client": _quantiles(run["client_ms"])})
    without, with_shadow = _quantiles(pooled[0.0]), _quantiles(pooled[1.0])
    ok = all(
        with_shadow[q] <= without[q] * (1 + SHADOW_SLACK) + SHADOW_SLACK_MS for q in ("p50", "p95")
    )
    return {"variant": variant, "rounds": rounds, "without": without, "with": with_shadow,
            "ok": ok}  # fmt: skip


def _fastest_non_reference(repository: ModelRepository) -> Any:
    ready = [m for m in repository.variants(MODEL) if m.is_ready and m.variant != REFERENCE]

    def p50(manifest: Any) -> float:
        figures = manifest.latency_at("cpu", 1)
        return figures["p50"] if figures is not None else float("inf")

    return min(ready, key=p50)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, help="digits repository (default: build one)")
    parser.add_argument("--reuse", action="store_true", help="skip compression, serve --repo")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--shadow-requests", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--http-port", type=int, default=18300)
    parser.add_argument("--grpc-port", type=int, default=19300)
    parser.add_argument("--metrics-port", type=int, default=18380)
    return parser


def main() -> int:
    if sys.argv[1:2] == ["client"]:
        port, path, warmup, requests = sys.argv[2:6]
        print(json.dumps(client(int(port), path, int(warmup), int(requests))))
        return 0
    args = _parser().parse_args()
    if args.reuse and args.repo is None:
        print("error: --reuse needs --repo", file=sys.stderr)
        return 2
    if prometheus_binary() is None:
        print("error: prometheus is not installed (make prometheus)", file=sys.stderr)
        return 2
    ports = {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
    repo_dir = digits_repository_to_serve(args.repo, args.reuse, ports)
    if repo_dir is None:
        return 2
    repository = ModelRepository(repo_dir)
    variants = sorted(m.variant for m in repository.variants(MODEL) if m.is_ready)
    shadowed = _fastest_non_reference(repository).variant
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with contextlib.ExitStack() as stack:
        state_dir = session_state_dir()
        stack.callback(shutil.rmtree, state_dir, ignore_errors=True)
        stack.enter_context(ray_session(None, env=ray_environment(Ingress.HAPROXY, state_dir)))
        stack.callback(serve.shutdown)
        config = GatewayConfig.create(repo_dir, metrics_port=args.metrics_port, shadow_fraction=0)
        stack.callback(shutil.rmtree, config.metrics_directory, ignore_errors=True)
        start_gateway(config, args.http_port, args.grpc_port)
        prometheus = PrometheusServer(f"{LOOPBACK}:{args.metrics_port}", SCRAPE_INTERVAL_S)
        stack.callback(prometheus.stop)
        prometheus.wait_scraping()
        p95 = p95_phase(args, prometheus, variants)
        shadow = shadow_phase(args, config, shadowed)
    results = {"p95": p95, "shadow": shadow}
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    failed = [v for v, f in p95.items() if not f["ok"]] + ([] if shadow["ok"] else ["shadow"])
    return 1 if failed else 0


def report(results: dict[str, Any]) -> str:
    lines = [
        "PromQL p95 against the client's (ms; the gap allowed is max(1 ms, 30 %))",
        f"{'variant':<10} {'client p50':>10} {'client p95':>10} {'latency_ms p95':>14} "
        f"{'PromQL p95':>10} {'allowed':>8}  result   outside the clock p50 / p95   stolen",
    ]
    for variant, f in results["p95"].items():
        promql = "-" if f["promql_p95_ms"] is None else f"{f['promql_p95_ms']:.3f}"
        outside = f["outside_clock"]
        lines.append(
            f"{variant:<10} {f['client']['p50']:>10.3f} {f['client']['p95']:>10.3f} "
            f"{f['latency_ms']['p95']:>14.3f} {promql:>10} {f['allowed_gap_ms']:>8.3f}  "
            f"{'OK  ' if f['ok'] else 'FAIL'}   {outside['p50']:>6.3f} / {outside['p95']:<6.3f}"
            f"        {f['cpu_stolen_share']:.0%}"
        )
    shadow = results["shadow"]
    lines += [
        "",
        f"Shadow agreement's cost to the response path ({shadow['variant']}, client ms, "
        "pooled over rounds)",
        f"{'shadow':<10} {'p50':>8} {'p95':>8} {'p99':>8}",
    ]
    for name, figures in (("off", shadow["without"]), ("every", shadow["with"])):
        lines.append(
            f"{name:<10} {figures['p50']:>8.3f} {figures['p95']:>8.3f} {figures['p99']:>8.3f}"
        )
    lines.append(f"result: {'OK' if shadow['ok'] else 'FAIL'} (within 10 % or 0.1 ms)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
