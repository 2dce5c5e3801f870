"""A/B experiments through the data plane and the HTTP adapter: arms, admin token, feedback.

The ledger is the real one, in this process (:class:`LedgerStore`) instead of behind a Serve
handle; the gateway replica's :class:`ReplicaExperiments` and :class:`Administration` are the
ones a replica builds.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from gearbox.serving.admin import Administration
from gearbox.serving.experiment_store import LedgerStore, ReplicaExperiments
from gearbox.serving.experiments import Experiment, ExperimentLedger
from gearbox.serving.rest.adapter import HttpAdapter
from gearbox.serving.router import Reason
from tests.unit.serving_fixtures import MODEL, Served, images, infer_request, run, started, until

TOKEN = "s3cret-token-of-32-characters!!"
AB = {
    "name": "small-vs-fp32",
    "model": MODEL,
    "arms": [{"variant": "fp32", "weight": 0.5}, {"variant": "small", "weight": 0.5}],
}


class Gateway:
    """A replica's stack with its experiments, spoken to over the HTTP adapter."""

    def __init__(self, stack: Served, experiments: ReplicaExperiments, ledger: ExperimentLedger):
        self.stack, self.experiments, self.ledger = stack, experiments, ledger
        self.http: HttpAdapter

    async def call(
        self, method: str, path: str, body: object = None, token: str | None = None
    ) -> tuple[int, Any]:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        raw = b"" if body is None else json.dumps(body).encode()
        path, _, query = path.partition("?")
        reply = await self.http.handle(method, path, headers, raw, query=query)
        return reply.status, json.loads(reply.body)

    async def infer(self, **parameters: Any) -> dict[str, Any]:
        body = {
            "inputs": [
                {"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8],
                 "data": images(1, seed=3).ravel().tolist()}
            ],
            "parameters": parameters,
        }  # fmt: skip
        status, answer = await self.call("POST", f"/v2/models/{MODEL}/infer", body)
        assert status == 200, answer
        return answer


def with_gateway(
    repository: Any, test: Callable[[Gateway], Awaitable[None]], token: str | None = TOKEN
) -> None:
    async def main() -> None:
        ledger = ExperimentLedger()
        experiments = ReplicaExperiments(LedgerStore(ledger), source="replica-1")
        async with started(repository, experiments=experiments, shadow_fraction=0.0) as stack:
            gateway = Gateway(stack, experiments, ledger)
            gateway.http = HttpAdapter(stack.plane, Administration(stack.plane, experiments, token))
            await test(gateway)

    run(main())


def test_a_created_experiment_assigns_sticky_arms_and_labels_the_metrics(tiny_repository):
    async def test(gateway: Gateway) -> None:
        status, created = await gateway.call("POST", "/v2/experiments", AB, TOKEN)
        assert status == 201, created
        assert Experiment.from_dict(created) == Experiment.from_dict(AB)
        answers = [await gateway.infer(routing_key=f"user-{i}") for i in range(40)]
        arms = {a["parameters"]["arm"] for a in answers}
        assert arms == {"fp32", "small"}
        for answer in answers:
            parameters = answer["parameters"]
            assert parameters["experiment"] == AB["name"]
            assert parameters["variant"] == parameters["arm"] == answer["model_version"]
            assert answer["id"]  # made up, so that feedback can name the request
        again = [await gateway.infer(routing_key=f"user-{i}") for i in range(40)]
        assert [a["parameters"]["arm"] for a in again] == [a["parameters"]["arm"] for a in answers]
        metrics = gateway.stack.metrics
        assert metrics.arms[-80:] == [a["parameters"]["arm"] for a in answers + again]
        assert {reason for *_, reason in metrics.selections[-80:]} == {Reason.EXPERIMENT}

    with_gateway(tiny_repository, test)


def test_a_pinned_version_stays_outside_the_experiment(tiny_repository):
    async def test(gateway: Gateway) -> None:
        await gateway.call("POST", "/v2/experiments", AB, TOKEN)
        status, answer = await gateway.call(
            "POST",
            f"/v2/models/{MODEL}/versions/int8/infer",
            {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8],
                         "data": [0.0] * 64}]},
        )  # fmt: skip
        assert status == 200
        assert "arm" not in answer["parameters"] and answer["model_version"] == "int8"
        assert gateway.stack.metrics.arms[-1] == ""

    with_gateway(tiny_repository, test)


def test_feedback_reaches_the_report_and_an_unknown_request_is_404(tiny_repository):
    async def test(gateway: Gateway) -> None:
        await gateway.call("POST", "/v2/experiments", AB, TOKEN)
        answers = [await gateway.infer(routing_key=f"k{i}") for i in range(30)]
        for answer in answers:
            predicted = int(np.argmax(answer["outputs"][0]["data"]))
            # fp32 is always right, small always wrong: a difference the report must find.
            label = predicted if answer["parameters"]["arm"] == "fp32" else predicted + 1
            status, reply = await gateway.call(
                "POST", "/v2/feedback", {"id": answer["id"], "label": label}
            )
            assert (status, reply) == (200, {"id": answer["id"], "recorded": True})
        status, reply = await gateway.call("POST", "/v2/feedback", {"id": "nope", "label": 1})
        assert status == 404 and "nope" in reply["error"]
        status, reply = await gateway.call("POST", "/v2/feedback", {"id": "x", "label": "3"})
        assert status == 400 and "label" in reply["error"]
        status, report = await gateway.call(
            "GET", f"/v2/experiments/{AB['name']}/report?confidence=0.9"
        )
        assert status == 200, report
        by_arm = {arm["name"]: arm for arm in report["arms"]}
        sent = {arm: sum(a["parameters"]["arm"] == arm for a in answers) for arm in by_arm}
        assert {name: arm["requests"] for name, arm in by_arm.items()} == sent
        assert by_arm["fp32"]["accuracy"] == 1.0 and by_arm["small"]["accuracy"] == 0.0
        assert report["confidence"] == 0.9

    with_gateway(tiny_repository, test)


@pytest.mark.parametrize(
    ("token", "status"), [(None, 401), ("wrong-token-of-enough-length", 401), (TOKEN, 201)]
)
def test_admin_calls_need_the_token(tiny_repository, token, status):
    async def test(gateway: Gateway) -> None:
        code, reply = await gateway.call("POST", "/v2/experiments", AB, token)
        assert code == status, reply
        if status != 201:
            assert "token" in reply["error"].lower() or "authorization" in reply["error"].lower()
            assert gateway.ledger.active() == ()
            code, _ = await gateway.call("DELETE", f"/v2/experiments/{AB['name']}", None, token)
            assert code == status
        code, listing = await gateway.call("GET", "/v2/experiments")
        assert code == 200 and len(listing["experiments"]) == (status == 201)

    with_gateway(tiny_repository, test)


def test_a_gateway_without_a_token_refuses_every_admin_call(tiny_repository):
    async def test(gateway: Gateway) -> None:
        code, reply = await gateway.call("POST", "/v2/experiments", AB, TOKEN)
        assert code == 403 and "GEARBOX_ADMIN_TOKEN" in reply["error"]

    with_gateway(tiny_repository, test, token=None)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({**AB, "arms": [{"variant": "fp32", "weight": 1}]}, 400, "arms"),
        ({**AB, "model": "nobody"}, 404, "nobody"),
        ({**AB, "arms": [{"variant": "fp32", "weight": 1}, {"variant": "pruned", "weight": 1}]},
         404, "rejected"),
        ({**AB, "arms": [{"variant": "fp32", "weight": 1}, {"variant": "ghost", "weight": 1}]},
         404, "ghost"),
    ],
)  # fmt: skip
def test_a_bad_experiment_is_refused_with_its_reason(tiny_repository, body, status, words):
    async def test(gateway: Gateway) -> None:
        code, reply = await gateway.call("POST", "/v2/experiments", body, TOKEN)
        assert code == status and words in reply["error"], reply
        assert gateway.ledger.active() == ()
        assert (await gateway.infer())["parameters"]["variant"] == "fp32"

    with_gateway(tiny_repository, test)


def test_ending_an_experiment_returns_its_traffic_to_the_router(tiny_repository):
    async def test(gateway: Gateway) -> None:
        await gateway.call("POST", "/v2/experiments", AB, TOKEN)
        assert "arm" in (await gateway.infer(routing_key="a"))["parameters"]
        code, reply = await gateway.call("DELETE", f"/v2/experiments/{AB['name']}", None, TOKEN)
        assert (code, reply) == (200, {"name": AB["name"], "active": False})
        answer = await gateway.infer(routing_key="a")
        assert "arm" not in answer["parameters"]
        assert gateway.stack.metrics.selections[-1][2] != Reason.EXPERIMENT
        code, reply = await gateway.call("DELETE", "/v2/experiments/none-such", None, TOKEN)
        assert code == 404
        code, report = await gateway.call("GET", f"/v2/experiments/{AB['name']}/report")
        assert code == 200 and report["ended"] is True

    with_gateway(tiny_repository, test)


def test_report_queries_and_unknown_admin_paths(tiny_repository):
    async def test(gateway: Gateway) -> None:
        await gateway.call("POST", "/v2/experiments", AB, TOKEN)
        for query in ("confidence=2", "confidence=abc"):
            code, reply = await gateway.call("GET", f"/v2/experiments/{AB['name']}/report?{query}")
            assert code == 400 and "confidence" in reply["error"]
        code, _ = await gateway.call("GET", "/v2/experiments/none/report")
        assert code == 404
        code, _ = await gateway.call("PUT", "/v2/experiments")
        assert code == 404

    with_gateway(tiny_repository, test)


def test_agreement_totals_travel_with_the_outcomes(tiny_repository):
    async def main() -> None:
        ledger = ExperimentLedger()
        experiments = ReplicaExperiments(LedgerStore(ledger), source="replica-1")
        async with started(tiny_repository, experiments=experiments, shadow_fraction=1.0) as stack:
            for _ in range(5):
                await stack.answer(infer_request(images(1), version="small"))
            # Shadow runs take only CPU time nothing else wants: on a busy machine, later.
            await until(lambda: sum(rows for *_, rows in stack.plane.agreement_totals()) > 0)
            await experiments.sync()
            matched, seen = ledger.agreement(MODEL, "small")
            assert seen > 0 and matched is not None

    run(main())


def test_feedback_for_an_answer_not_yet_handed_over_travels_with_it(tiny_repository):
    async def test(gateway: Gateway) -> None:
        await gateway.call("POST", "/v2/experiments", AB, TOKEN)
        answer = await gateway.infer(routing_key="fresh")
        assert gateway.ledger.requests_held == 0  # still in the replica's buffer
        code, _ = await gateway.call("POST", "/v2/feedback", {"id": answer["id"], "label": 3})
        assert code == 200
        code, reply = await gateway.call("POST", "/v2/feedback", {"id": answer["id"], "score": 1})
        assert code == 200
        await gateway.experiments.sync()
        report = gateway.ledger.report(AB["name"])
        arm = report.arm(answer["parameters"]["arm"])
        assert (arm.requests, arm.feedback) == (1, 1)
        code, reply = await gateway.call("POST", "/v2/feedback", {"id": answer["id"]})
        assert code == 400 and "exactly one" in reply["error"]

    with_gateway(tiny_repository, test)
