"""The ``gearbox demo`` workload: held-out examples at a range of latency budgets, over both
protocols, and the report of which variant answered each budget and at what quality.

``digits`` sends one held-out image per request and scores top-1 against its label; ``minilm``
sends one held-out sentence as text (the gateway tokenizes it) and scores the cosine of the
answer to the reference variant's embedding of the same sentence.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np
from rich.table import Table

from gearbox.compression.errors import UnavailableError
from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.grpc.generated import grpc_service_pb2_grpc as pb_grpc

DIGITS_BUDGETS_MS: tuple[float | None, ...] = (None, 50.0, 5.0, 1.0, 0.5, 0.25, 0.1)
SENTENCE_BUDGETS_MS: tuple[float | None, ...] = (None, 100.0, 20.0, 12.0, 8.0, 5.0, 2.0)


@dataclass(frozen=True)
class DemoInput:
    """One request's single input tensor, as values both protocols can carry."""

    name: str
    datatype: str
    shape: list[int]
    values: list[float] | list[str]


class Workload(Protocol):
    model: str
    quality_name: str
    budgets_ms: Sequence[float | None]

    def __len__(self) -> int: ...

    def request(self, index: int) -> DemoInput: ...

    def quality(self, index: int, output: np.ndarray) -> float: ...


@dataclass(frozen=True)
class DigitsWorkload:
    images: np.ndarray
    labels: np.ndarray
    model: str = "digits"
    quality_name: str = "accuracy"
    budgets_ms: Sequence[float | None] = DIGITS_BUDGETS_MS

    def __len__(self) -> int:
        return len(self.images)

    def request(self, index: int) -> DemoInput:
        image = self.images[index : index + 1]
        return DemoInput("images", "FP32", list(image.shape), image.ravel().tolist())

    def quality(self, index: int, output: np.ndarray) -> float:
        return float(output.argmax() == self.labels[index])


@dataclass(frozen=True)
class SentenceWorkload:
    """Sentences as text; ``reference`` holds the reference variant's embedding of each."""

    sentences: Sequence[str]
    reference: np.ndarray
    model: str = "minilm"
    quality_name: str = "cosine to fp32"
    budgets_ms: Sequence[float | None] = SENTENCE_BUDGETS_MS

    def __len__(self) -> int:
        return len(self.sentences)

    def request(self, index: int) -> DemoInput:
        return DemoInput("text", "BYTES", [1], [self.sentences[index]])

    def quality(self, index: int, output: np.ndarray) -> float:
        answer, reference = output.ravel(), self.reference[index].ravel()
        return float(answer @ reference / (np.linalg.norm(answer) * np.linalg.norm(reference)))


@dataclass(frozen=True)
class BudgetReport:
    budget_ms: float | None
    requests: int
    variants: Counter[str]
    server_p50_ms: float
    client_p50_ms: float
    met: int
    quality: float
    """Mean quality of the answers (accuracy, or cosine to the reference)."""


class DemoClients:
    """One keep-alive HTTP connection and one gRPC channel, as a real caller would hold."""

    def __init__(self, http_address: str, grpc_address: str) -> None:
        host, port = http_address.removeprefix("http://").rsplit(":", 1)
        self._http = http.client.HTTPConnection(host, int(port), timeout=30)
        self._channel = grpc.insecure_channel(grpc_address)
        self._grpc = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def infer_http(
        self, model: str, tensor: DemoInput, parameters: dict[str, float | str], version: str = ""
    ) -> tuple[np.ndarray, dict[str, object]]:
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": tensor.name,
                        "datatype": tensor.datatype,
                        "shape": tensor.shape,
                        "data": tensor.values,
                    }
                ],
                "parameters": parameters,
            }
        )
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        self._http.request("POST", path, body, {"content-type": "application/json"})
        response = self._http.getresponse()
        payload = json.loads(response.read())
        if response.status != 200:
            raise UnavailableError(f"demo request failed: HTTP {response.status} {payload}")
        output = payload["outputs"][0]
        return np.asarray(output["data"]).reshape(output["shape"]), payload["parameters"]

    def infer_grpc(
        self, model: str, tensor: DemoInput, parameters: dict[str, float | str]
    ) -> tuple[np.ndarray, dict[str, object]]:
        request = pb.ModelInferRequest(model_name=model)
        message = request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if tensor.datatype == "BYTES":
            message.contents.bytes_contents.extend(str(v).encode() for v in tensor.values)
        else:
            message.contents.fp32_contents.extend(tensor.values)  # type: ignore[arg-type]
        for key, value in parameters.items():
            if isinstance(value, str):
                request.parameters[key].string_param = value
            else:
                request.parameters[key].double_param = value
        # A gRPC deadline is a budget to the gateway: a call that names none sends none, so
        # that it is answered like its HTTP twin (by the reference variant).
        reply = self._grpc.ModelInfer(request, timeout=30 if parameters else None)
        output = reply.outputs[0]
        values = np.asarray(output.contents.fp32_contents).reshape(list(output.shape))
        params = {
            k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in reply.parameters.items()
        }
        return values, params

    def close(self) -> None:
        self._http.close()
        self._channel.close()


def sentence_workload(
    http_address: str, grpc_address: str, sentences: Sequence[str], reference_variant: str
) -> SentenceWorkload:
    """The sentences with the reference variant's embedding of each, asked of the gateway."""
    clients = DemoClients(http_address, grpc_address)
    try:
        reference = np.stack(
            [
                clients.infer_http(
                    "minilm", DemoInput("text", "BYTES", [1], [s]), {}, reference_variant
                )[0][0]
                for s in sentences
            ]
        )
    finally:
        clients.close()
    return SentenceWorkload(sentences, reference)


def run_workload(
    http_address: str, grpc_address: str, workload: Workload, requests_per_budget: int = 60
) -> list[BudgetReport]:
    """Sends ``requests_per_budget`` single-example requests per budget, alternating protocols."""
    clients = DemoClients(http_address, grpc_address)
    reports = []
    try:
        for budget in workload.budgets_ms:
            parameters: dict[str, float | str] = {}
            if budget is not None:
                parameters["latency_budget_ms"] = budget
            variants: Counter[str] = Counter()
            server, client, quality = [], [], []
            met = 0
            for i in range(requests_per_budget):
                index = i % len(workload)
                infer = clients.infer_http if i % 2 == 0 else clients.infer_grpc
                started = time.perf_counter()
                output, answer = infer(workload.model, workload.request(index), parameters)
                client.append((time.perf_counter() - started) * 1000)
                variants[str(answer["variant"])] += 1
                server.append(float(answer["latency_ms"]))  # type: ignore[arg-type]
                met += bool(answer["budget_met"])
                quality.append(workload.quality(index, output))
            reports.append(
                BudgetReport(
                    budget,
                    requests_per_budget,
                    variants,
                    statistics.median(server),
                    statistics.median(client),
                    met,
                    statistics.fmean(quality),
                )
            )
    finally:
        clients.close()
    return reports


def report_table(reports: Sequence[BudgetReport], workload: Workload) -> Table:
    table = Table(
        title=f"Routing by latency budget ({workload.model}, held-out examples, HTTP and gRPC "
        "alternating)"
    )
    table.add_column("budget", justify="right")
    table.add_column("answered by")
    table.add_column("gateway p50", justify="right")
    table.add_column("client p50", justify="right")
    table.add_column("budget met", justify="right")
    table.add_column(workload.quality_name, justify="right")
    for report in reports:
        answered = ", ".join(f"{name} x{count}" for name, count in report.variants.most_common())
        table.add_row(
            "none" if report.budget_ms is None else f"{report.budget_ms:g} ms",
            answered,
            f"{report.server_p50_ms:.3f} ms",
            f"{report.client_p50_ms:.2f} ms",
            f"{report.met}/{report.requests}",
            f"{report.quality:.4f}",
        )
    return table
