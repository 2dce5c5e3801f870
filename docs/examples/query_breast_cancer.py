"""Ask a running ``gearbox serve`` about held-out biopsies with the unmodified Triton clients.

From the repository root, while ``gearbox serve --repo cancer-repo`` runs:

    python -m docs.examples.query_breast_cancer            # HTTP on 127.0.0.1:8000
    python -m docs.examples.query_breast_cancer --grpc     # gRPC on 127.0.0.1:9000

It sends eight held-out rows in one request with a latency budget, prints which variant the
router chose and each row's predicted and true class, and exits non-zero if the gateway is not
ready or answers fewer than half of the rows correctly.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from docs.examples.breast_cancer import CLASSES, load_splits

MODEL = "breast-cancer"
ROWS = 8
REPORTED_PARAMETERS = ("variant", "latency_ms", "budget_met")


def _parameter(value: Any) -> Any:
    """A response parameter's value: plain JSON over HTTP, an InferParameter message over gRPC."""
    if isinstance(value, dict | str | int | float | bool):
        return value
    return getattr(value, value.WhichOneof("parameter_choice"))


def query(url: str, use_grpc: bool, latency_budget_ms: float) -> float:
    """Sends the held-out rows; returns the share of them answered with their true class."""
    heldout = load_splits().heldout
    rows, labels = heldout.inputs["measurements"][:ROWS], heldout.labels[:ROWS]
    client_module: Any = grpcclient if use_grpc else httpclient
    client = client_module.InferenceServerClient(url=url)
    if not client.is_model_ready(MODEL):
        raise SystemExit(f"{MODEL} is not ready at {url}")
    tensor = client_module.InferInput("measurements", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    result = client.infer(MODEL, [tensor], parameters={"latency_budget_ms": latency_budget_ms})
    response = result.get_response()
    parameters = response["parameters"] if isinstance(response, dict) else response.parameters
    figures = {name: _parameter(parameters[name]) for name in REPORTED_PARAMETERS}
    print(
        f"variant {figures['variant']}: {figures['latency_ms']:.3f} ms at the gateway, "
        f"budget {latency_budget_ms} ms met: {figures['budget_met']}"
    )
    predicted = result.as_numpy("logits").argmax(axis=1)
    for row, (guess, truth) in enumerate(zip(predicted, labels, strict=True)):
        print(f"  row {row}: predicted {CLASSES[guess]:<9} true {CLASSES[truth]}")
    return float(np.mean(predicted == labels))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", action="store_true", help="use gRPC instead of HTTP")
    parser.add_argument("--url", help="host:port (default 127.0.0.1:8000, or :9000 with --grpc)")
    parser.add_argument("--budget-ms", type=float, default=5.0, help="latency_budget_ms to send")
    args = parser.parse_args()
    url = args.url or ("127.0.0.1:9000" if args.grpc else "127.0.0.1:8000")
    accuracy = query(url, args.grpc, args.budget_ms)
    return 0 if accuracy >= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
