"""The ``gearbox demo`` workload: held-out digits at a range of latency budgets, over both
protocols, and the report of which variant answered each budget."""

from __future__ import annotations

import http.client
import json
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from rich.table import Table

from gearbox.compression.errors import UnavailableError
from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.grpc.generated import grpc_service_pb2_grpc as pb_grpc

DEMO_BUDGETS_MS: tuple[float | None, ...] = (None, 50.0, 5.0, 1.0, 0.5, 0.25, 0.1)


@dataclass(frozen=True)
class BudgetReport:
    budget_ms: float | None
    requests: int
    variants: Counter[str]
    server_p50_ms: float
    client_p50_ms: float
    met: int
    correct: int


class _Clients:
    """One keep-alive HTTP connection and one gRPC channel, as a real caller would hold."""

    def __init__(self, http_address: str, grpc_address: str) -> None:
        host, port = http_address.removeprefix("http://").rsplit(":", 1)
        self._http = http.client.HTTPConnection(host, int(port), timeout=30)
        self._channel = grpc.insecure_channel(grpc_address)
        self._grpc = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def infer_http(
        self, model: str, image: np.ndarray, parameters: dict[str, float | str]
    ) -> tuple[np.ndarray, dict[str, object]]:
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "FP32",
                        "shape": list(image.shape),
                        "data": image.ravel().tolist(),
                    }
                ],
                "parameters": parameters,
            }
        )
        self._http.request(
            "POST", f"/v2/models/{model}/infer", body, {"content-type": "application/json"}
        )
        response = self._http.getresponse()
        payload = json.loads(response.read())
        if response.status != 200:
            raise UnavailableError(f"demo request failed: HTTP {response.status} {payload}")
        output = payload["outputs"][0]
        return np.asarray(output["data"]).reshape(output["shape"]), payload["parameters"]

    def infer_grpc(
        self, model: str, image: np.ndarray, parameters: dict[str, float | str]
    ) -> tuple[np.ndarray, dict[str, object]]:
        request = pb.ModelInferRequest(model_name=model)
        tensor = request.inputs.add(name="images", datatype="FP32", shape=list(image.shape))
        tensor.contents.fp32_contents.extend(image.ravel().tolist())
        for key, value in parameters.items():
            if isinstance(value, str):
                request.parameters[key].string_param = value
            else:
                request.parameters[key].double_param = value
        # A gRPC deadline is a budget to the gateway: a call that names none sends none, so
        # that it is answered like its HTTP twin (by the reference variant).
        reply = self._grpc.ModelInfer(request, timeout=30 if parameters else None)
        output = reply.outputs[0]
        logits = np.asarray(output.contents.fp32_contents).reshape(list(output.shape))
        params = {
            k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in reply.parameters.items()
        }
        return logits, params

    def close(self) -> None:
        self._http.close()
        self._channel.close()


def run_workload(
    http_address: str,
    grpc_address: str,
    images: np.ndarray,
    labels: np.ndarray,
    budgets: Sequence[float | None] = DEMO_BUDGETS_MS,
    requests_per_budget: int = 60,
    model: str = "digits",
) -> list[BudgetReport]:
    """Sends ``requests_per_budget`` single-image requests per budget, alternating protocols."""
    clients = _Clients(http_address, grpc_address)
    reports = []
    try:
        for budget in budgets:
            parameters: dict[str, float | str] = {}
            if budget is not None:
                parameters["latency_budget_ms"] = budget
            variants: Counter[str] = Counter()
            server, client = [], []
            met = correct = 0
            for i in range(requests_per_budget):
                index = i % len(images)
                image = images[index : index + 1]
                infer = clients.infer_http if i % 2 == 0 else clients.infer_grpc
                started = time.perf_counter()
                logits, answer = infer(model, image, parameters)
                client.append((time.perf_counter() - started) * 1000)
                variants[str(answer["variant"])] += 1
                server.append(float(answer["latency_ms"]))
                met += bool(answer["budget_met"])
                correct += int(logits.argmax() == labels[index])
            reports.append(
                BudgetReport(
                    budget,
                    requests_per_budget,
                    variants,
                    statistics.median(server),
                    statistics.median(client),
                    met,
                    correct,
                )
            )
    finally:
        clients.close()
    return reports


def report_table(reports: Sequence[BudgetReport]) -> Table:
    table = Table(title="Routing by latency budget (held-out digits, HTTP and gRPC alternating)")
    table.add_column("budget", justify="right")
    table.add_column("answered by")
    table.add_column("gateway p50", justify="right")
    table.add_column("client p50", justify="right")
    table.add_column("budget met", justify="right")
    table.add_column("accuracy", justify="right")
    for report in reports:
        answered = ", ".join(f"{name} x{count}" for name, count in report.variants.most_common())
        table.add_row(
            "none" if report.budget_ms is None else f"{report.budget_ms:g} ms",
            answered,
            f"{report.server_p50_ms:.3f} ms",
            f"{report.client_p50_ms:.2f} ms",
            f"{report.met}/{report.requests}",
            f"{report.correct / report.requests:.3f}",
        )
    return table
