"""Loading and unloading models on every replica: the control, the replicas that follow it,
and the model-repository endpoints over HTTP and gRPC (a real data plane in-process)."""

from __future__ import annotations

import json

import grpc
import pytest

from gearbox.compression.errors import NotFoundError, UnavailableError
from gearbox.serving.admin import Administration
from gearbox.serving.catalog import Catalog
from gearbox.serving.dataplane import UNAVAILABLE_STATE
from gearbox.serving.grpc.adapter import GrpcServicer
from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.repository_control import (
    LIVE_AFTER_S,
    ReplicaRepository,
    RepositoryControl,
    RepositoryState,
    gateway_update,
)
from gearbox.serving.rest.adapter import HttpAdapter
from tests.unit.serving_fixtures import (
    MODEL,
    READY,
    GrpcContext,
    VariantSeed,
    infer_request,
    linear_onnx,
    publish_tiny_repository,
    run,
    started,
    variant_manifest,
)

TOKEN = "a-token-long-enough-for-the-gateway"
BEARER = {"authorization": f"Bearer {TOKEN}"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _follower(
    control: RepositoryControl, name: str, applied: list[RepositoryState], built: bool = True
) -> ReplicaRepository:
    """A replica of ``control`` that records what it applies; ``built``: it was started
    from the control's current state (as a gateway replica is)."""

    async def apply(state: RepositoryState) -> None:
        applied.append(state)

    serving = (control.epoch, 0) if built else None
    return ReplicaRepository(control, apply, name, lambda: [MODEL, "other"], serving=serving)


async def _ignore(state: RepositoryState) -> None:
    """Applies nothing (a replica whose own updates do not matter to the test)."""


def test_a_load_returns_once_every_live_replica_serves_it():
    async def scenario() -> None:
        control = RepositoryControl()
        first, second = [], []
        here = _follower(control, "here", first)
        there = _follower(control, "there", second)
        await there.sync()  # heard from: a load must wait for it
        there.start()
        epoch = control.epoch
        try:
            generation = await here.unload(MODEL)
            assert generation == 1
            assert here.serving == there.serving == (epoch, 1)
            assert first == second == [RepositoryState(1, frozenset({MODEL}), epoch)]
            assert await here.load(MODEL) == 2
            assert there.serving == (epoch, 2)
            assert second[-1] == RepositoryState(2, frozenset(), epoch)
        finally:
            await there.stop()

    run(scenario())


def test_a_replica_that_stopped_answering_is_not_waited_for():
    async def scenario() -> None:
        clock = Clock()
        control = RepositoryControl(clock=clock)
        gone = _follower(control, "gone", [])
        await gone.sync()
        here = ReplicaRepository(
            control, _ignore, "here", lambda: [MODEL], serving=gone.serving, timeout_s=0.3
        )
        with pytest.raises(UnavailableError, match="gone"):
            await here.load(MODEL)  # "gone" is still live and never syncs again
        clock.now += LIVE_AFTER_S + 1
        assert await here.load(MODEL) == 2
        assert await control.behind((control.epoch, 2)) == []

    run(scenario())


def test_an_update_that_fails_keeps_the_generation_served_and_says_why():
    async def scenario() -> None:
        control = RepositoryControl()

        async def broken(state: RepositoryState) -> None:
            raise UnavailableError("the repository is unreadable")

        built = (control.epoch, 0)
        here = ReplicaRepository(control, broken, "here", lambda: [MODEL], serving=built)
        with pytest.raises(UnavailableError, match="unreadable"):
            await here.unload(MODEL)
        assert here.serving == built

    run(scenario())


def test_a_model_the_repository_does_not_hold_is_not_found_and_changes_nothing():
    async def scenario() -> None:
        control = RepositoryControl()
        here = _follower(control, "here", [])
        with pytest.raises(NotFoundError, match=f"'nope'.*{MODEL}"):
            await here.load("nope")
        assert (await control.sync("here", here.serving)).generation == 0

    run(scenario())


def test_a_starting_replica_serves_the_current_state_on_its_first_sync():
    async def scenario() -> None:
        control = RepositoryControl()
        await control.unload(MODEL)
        applied: list[RepositoryState] = []
        newcomer = _follower(control, "new", applied, built=False)
        await newcomer.sync()
        epoch = control.epoch
        assert newcomer.serving == (epoch, 1)
        assert applied == [RepositoryState(1, frozenset({MODEL}), epoch)]


def test_a_restarted_control_is_followed_though_it_counts_from_zero_again():
    async def scenario() -> None:
        applied: list[RepositoryState] = []

        async def apply(state: RepositoryState) -> None:
            applied.append(state)

        first = RepositoryControl()
        replica = ReplicaRepository(first, apply, "replica", lambda: [MODEL])
        for _ in range(3):
            await replica.unload(MODEL)
        # The control's deployment replica died and came back: it counts from 0 again, under
        # a new epoch, so its generation 0 is news to a replica that served generation 3.
        restarted = RepositoryControl()
        replica = ReplicaRepository(
            restarted, apply, "replica", lambda: [MODEL], serving=replica.serving
        )
        await replica.sync()
        assert applied[-1] == RepositoryState(0, frozenset(), restarted.epoch)
        state = await restarted.unload(MODEL)
        assert await restarted.behind(state.version) == ["replica"]
        await replica.sync()
        assert applied[-1] == state and replica.serving == state.version
        assert await restarted.behind(state.version) == []

    run(scenario())


# --- the endpoints, on a real data plane ---------------------------------------------------


def test_unload_and_load_over_http_and_grpc_change_what_is_served(tmp_path):
    repository = publish_tiny_repository(tmp_path / "repo")

    async def scenario() -> None:
        async with started(repository) as served:
            control = RepositoryControl()
            updates = ReplicaRepository(
                control,
                gateway_update(repository, served.backend, served.plane),
                "here",
                repository.models,
            )
            admin = Administration(served.plane, None, TOKEN, updates)
            http = HttpAdapter(served.plane, admin)
            servicer = GrpcServicer(served.plane, admin=admin)
            unload = f"/v2/repository/models/{MODEL}/unload"

            reply = await http.handle("POST", unload, {}, b"")
            assert reply.status == 401
            reply = await http.handle("POST", unload, BEARER, b'{"parameters": {"config": "{}"}}')
            assert reply.status == 400 and "config" in json.loads(reply.body)["error"]
            reply = await http.handle(
                "POST", unload, BEARER, b'{"parameters": {"unload_dependents": false}}'
            )
            assert reply.status == 200, reply.body
            assert not served.plane.model_ready(MODEL)
            index = served.plane.repository_index()
            states = {row.state for row in index if row.name == MODEL}
            assert states == {UNAVAILABLE_STATE}
            reasons = {row.version: row.reason for row in index if row.name == MODEL}
            assert all("unloaded" in reasons[variant] for variant in READY)

            context = GrpcContext([("authorization", f"Bearer {TOKEN}")])
            request = pb.RepositoryModelLoadRequest(model_name=MODEL)
            await servicer.RepositoryModelLoad(request, context)
            assert context.code is None, context.details
            assert served.plane.model_ready(MODEL)
            assert set(served.plane.model_metadata(MODEL).versions) == set(READY)

            refused = GrpcContext()
            await servicer.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name=MODEL), refused
            )
            assert refused.code == grpc.StatusCode.UNAUTHENTICATED
            missing = GrpcContext([("authorization", f"Bearer {TOKEN}")])
            await servicer.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name="nope"), missing
            )
            assert missing.code == grpc.StatusCode.NOT_FOUND
            assert served.plane.model_ready(MODEL)

    run(scenario())


def test_a_variant_published_while_serving_is_served_after_a_load(tmp_path):
    repository = publish_tiny_repository(tmp_path / "repo")

    async def scenario() -> None:
        async with started(repository) as served:
            updates = ReplicaRepository(
                RepositoryControl(),
                gateway_update(repository, served.backend, served.plane),
                "here",
                repository.models,
            )
            seed = VariantSeed("tiny-new", seed=7, quality=0.85, p50_ms=50.0)
            artifact = linear_onnx(seed.seed)
            repository.publish_variant(variant_manifest(seed, artifact), artifact)
            assert "tiny-new" not in served.plane.model_metadata(MODEL).versions
            await updates.load(MODEL)
            assert "tiny-new" in served.plane.model_metadata(MODEL).versions
            assert Catalog.load(repository).models[MODEL].ready == tuple(
                sorted((*READY, "tiny-new"))
            )
            answer = await served.answer(infer_request(version="tiny-new"))
            assert answer.version == "tiny-new"

    run(scenario())
