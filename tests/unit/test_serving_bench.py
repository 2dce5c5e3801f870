"""The serving benchmark's reading of a py-spy profile of the gateway replica (no server)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    sys.path.insert(0, str(ROOT / "bench"))  # the benchmarks import their sibling modules
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # their dataclasses look their module up by name
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


peers = _load("serving_peers")
bench = _load("serving_bench")

LOOP = "thread (101): AsyncIO Thread: default"
WORKER = "thread (102): gearbox-cpu-standard-0"
# py-spy's raw format, as `record --format raw --threads` writes it: one stack per line.
RAW = "\n".join(
    [
        f"{LOOP};Thread.run (threading.py:982);call_asgi (ray/serve/_private/replica.py:3309);"
        "Gateway.__call__ (serving/app.py:120);loads (json/__init__.py:346) 300",
        f"{LOOP};Thread.run (threading.py:982);call_asgi (ray/serve/_private/replica.py:3309) 200",
        f"{LOOP};Thread.run (threading.py:982);send (uvicorn/protocols/http/httptools_impl.py:524)"
        " 150",
        f"{LOOP};Thread.run (threading.py:982);DeviceExecutor._run_inline (serving/executor.py:244)"
        ";Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:406) 50",
        f"{LOOP};Thread.run (threading.py:982);_run_once (asyncio/base_events.py:1922) 100",
        f"{WORKER};Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:406) 400",
        "",
    ]
)


def test_event_loop_samples_go_to_the_innermost_frame_with_an_owner():
    profile = peers.attribute_samples(RAW, seconds=4.0, rate_hz=250)  # 1,000 possible samples
    # json's frames count for Gearbox, which called them; the inline session for ONNX Runtime.
    assert profile["event_loop"] == {
        "Gearbox": 0.3,
        "Ray Serve": 0.2,
        "uvicorn and Starlette": 0.15,
        "asyncio and the rest": 0.1,
        "ONNX Runtime": 0.05,
    }
    assert profile["threads"] == {
        "AsyncIO Thread: default": 0.8,
        "gearbox-cpu-standard-0": 0.4,
    }


def test_the_replica_lines_give_time_per_request_and_the_framework_ceiling():
    profile = peers.attribute_samples(RAW, seconds=4.0, rate_hz=250)
    profile["requests_per_s"] = 500.0
    lines = bench.replica_lines(profile, in_process_rps=2000.0)
    assert "busy 80%" in lines[0]
    assert "Gearbox 0.600 ms" in lines[0]  # 30 % of each second over 500 requests
    assert "gearbox-cpu-standard-0 40%" in lines[1]
    # Ray Serve 0.4 ms + uvicorn 0.3 ms a request: at most 1,429 req/s, 0.71x of 2,000.
    assert "0.700 ms" in lines[2] and "1429 req/s" in lines[2] and "0.71x" in lines[2]


@pytest.mark.parametrize(
    ("profile", "says"),
    [
        ({"error": "py-spy failed: Permission denied"}, "Permission denied"),
        ({"threads": {}, "event_loop": {}, "requests_per_s": 0.0}, "no samples"),
    ],
)
def test_a_missing_profile_is_said_not_hidden(profile, says):
    [line] = bench.replica_lines(profile, in_process_rps=1000.0)
    assert says in line
