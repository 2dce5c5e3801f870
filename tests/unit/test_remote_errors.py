"""A Gearbox error raised in another replica comes back as itself, message and all; any other
failure, and a replica that never answers, comes back as UNAVAILABLE naming the device class."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from typing import Any

import numpy as np
import pytest
from ray import serve
from ray.exceptions import RayTaskError

from gearbox.compression import ModelRepository
from gearbox.compression.devices import DeviceClass
from gearbox.compression.errors import (
    GearboxError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from gearbox.serving.catalog import Catalog
from gearbox.serving.config import BatchingConfig
from gearbox.serving.executor import BatchResult
from gearbox.serving.hosting import LocalBackend, RemoteBackend, unwrap_remote_error
from tests.unit.serving_fixtures import INPUT, MODEL, OUTPUT, PATIENCE_S, images, run_artifact


def _as_ray_raises_it(error: Exception) -> Exception:
    """What awaiting a handle call raises when the replica raised ``error``."""
    wrapped = RayTaskError("call", "Traceback ...", error, proctitle="t", pid=1, ip="127.0.0.1")
    # Ray ships the RayTaskError and builds the dual class where the caller awaits it.
    return pickle.loads(pickle.dumps(wrapped)).as_instanceof_cause()


@pytest.mark.parametrize(
    "raised", [NotFoundError("no request 'x'"), ResourceExhaustedError("queue full")]
)
def test_the_original_class_and_message_come_back(raised):
    error = _as_ray_raises_it(raised)
    assert isinstance(error, RayTaskError) and isinstance(error, type(raised))
    unwrapped = unwrap_remote_error(error, "the call")
    assert type(unwrapped) is type(raised)
    assert unwrapped.message == raised.message


def test_a_dual_error_whose_cause_is_lost_keeps_its_class():
    error = _as_ray_raises_it(NotFoundError("gone"))
    error.cause = "gone"  # what Ray Serve hands back for some replica errors
    unwrapped = unwrap_remote_error(error, "the call")
    assert type(unwrapped) is NotFoundError and unwrapped.message == "gone"


def test_anything_else_is_unavailable():
    unwrapped = unwrap_remote_error(_as_ray_raises_it(ValueError("boom")), "the ledger's report")
    assert isinstance(unwrapped, UnavailableError)
    assert "the ledger's report" in unwrapped.message and "ValueError" in unwrapped.message
    assert isinstance(unwrapped, GearboxError)


# --- RemoteBackend.infer through a real Ray Serve handle ---------------------------------------
#
# Ray Serve's local testing mode runs a deployment in this process, behind a real
# DeploymentHandle, without a Ray cluster. It hands a replica's exception back as raised (a
# cluster wraps it as above), so the dual classes Ray builds are raised by ``Replicas`` itself.
# The mode has no shutdown: a replica's threads are daemons and end with the test process.

POOL = "pool"
"""Another device class, run on the CPU (what a GPU pool is to the gateway)."""


@serve.deployment
class PoolReplicas:
    """What ``app.DeviceClassHost`` runs, without its repository updates: the pool's own
    :class:`LocalBackend` over the repository at ``root``."""

    def __init__(self, root: str) -> None:
        repository = ModelRepository(root)
        self._backend = LocalBackend(
            repository, Catalog.load(repository), DeviceClass(POOL), BatchingConfig()
        )

    async def infer(self, model: str, variant: str, inputs: dict) -> BatchResult:
        return await self._backend.infer(model, variant, inputs)

    def __del__(self) -> None:
        self._backend.close()


@pytest.fixture(scope="module")
def pool_host(tiny_repository: ModelRepository) -> Any:
    """A handle to the pool's replicas (one, in this process)."""
    return serve.run(
        PoolReplicas.bind(str(tiny_repository.root)),
        name="remote-errors-pool",
        _local_testing_mode=True,
    )


@serve.deployment
class Replicas:
    """A device class's replicas that fail as told: ``raised`` is raised by every call, or,
    without one, no call is ever answered (a replica stuck on a hung driver)."""

    def __init__(self, raised: Exception | None = None) -> None:
        self._raised = raised
        self.cancelled = threading.Event()

    async def infer(self, model: str, variant: str, inputs: dict) -> BatchResult:
        if self._raised is not None:
            raise self._raised
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise AssertionError("never answered")

    async def was_cancelled(self) -> bool:
        return self.cancelled.is_set()


def _remote(tiny_repository: ModelRepository, handle: Any, **options: Any) -> RemoteBackend:
    return RemoteBackend(POOL, handle, Catalog.load(tiny_repository), **options)


def test_the_remote_hosts_answer_comes_back(tiny_repository, pool_host):
    backend = _remote(tiny_repository, pool_host)
    result = asyncio.run(backend.infer(MODEL, "int8", {INPUT: images(2)}))
    assert isinstance(result, BatchResult) and result.batch_rows == 2
    expected = run_artifact(tiny_repository, "int8", images(2))
    np.testing.assert_allclose(result.outputs[OUTPUT], expected, rtol=1e-5)
    assert backend.depth() == 0


def test_a_variant_the_remote_host_has_not_loaded_is_unavailable_there(tiny_repository, pool_host):
    # The router sends only variants it serves: one the class's replicas lack is one they
    # have not loaded yet (an update under way), so the request may be sent again.
    backend = _remote(tiny_repository, pool_host)
    with pytest.raises(UnavailableError) as raised:
        asyncio.run(backend.infer(MODEL, "no-such-variant", {INPUT: images(1)}))
    assert raised.value.message == (
        f"device class '{POOL}' does not serve it yet: "
        f"variant 'no-such-variant' of model '{MODEL}' is not hosted on {POOL}"
    )
    assert backend.depth() == 0


def test_a_session_failure_in_the_remote_host_is_unavailable_naming_the_class(
    tiny_repository, pool_host
):
    backend = _remote(tiny_repository, pool_host)
    wrong_dtype = {INPUT: images(1).astype(np.float64)}  # ONNX Runtime refuses it there
    with pytest.raises(UnavailableError) as raised:
        asyncio.run(backend.infer(MODEL, "int8", wrong_dtype))
    assert raised.value.message.startswith(f"device class '{POOL}' failed to answer: ")
    assert backend.depth() == 0


@pytest.mark.parametrize(
    ("raised", "expected", "message"),
    [
        (
            _as_ray_raises_it(ResourceExhaustedError("queue full")),
            ResourceExhaustedError,
            "queue full",
        ),
        (
            _as_ray_raises_it(NotFoundError("gone")),
            UnavailableError,
            f"device class '{POOL}' does not serve it yet: gone",
        ),
        (
            _as_ray_raises_it(KeyError("boom")),
            UnavailableError,
            f"device class '{POOL}' failed to answer: RayTaskError(KeyError)",
        ),
        (
            RuntimeError("actor died"),
            UnavailableError,
            f"device class '{POOL}' failed to answer: RuntimeError",
        ),
    ],
)
def test_what_a_cluster_raises_keeps_its_class_or_is_unavailable(
    tiny_repository, raised, expected, message
):
    handle = serve.run(
        Replicas.bind(raised), name="remote-errors-raising", _local_testing_mode=True
    )
    backend = _remote(tiny_repository, handle)
    with pytest.raises(GearboxError) as caught:
        asyncio.run(backend.infer(MODEL, "int8", {INPUT: images(1)}))
    assert type(caught.value) is expected
    assert caught.value.message == message
    assert backend.depth() == 0


def test_a_remote_that_never_answers_is_unavailable_after_the_timeout_and_cancelled(
    tiny_repository,
):
    handle = serve.run(Replicas.bind(), name="remote-errors-silent", _local_testing_mode=True)
    backend = _remote(tiny_repository, handle, timeout_s=0.1)

    async def main() -> tuple[UnavailableError, int]:
        with pytest.raises(UnavailableError) as raised:
            await backend.infer(MODEL, "int8", {INPUT: images(1)})
        depth = backend.depth()
        # The call was cancelled on the replica too: it works for nobody no longer.
        deadline = time.monotonic() + PATIENCE_S
        while not await handle.was_cancelled.remote():
            assert time.monotonic() < deadline, "the replica's call was never cancelled"
            await asyncio.sleep(0.001)
        return raised.value, depth

    error, depth = asyncio.run(main())
    assert error.message == (
        f"device class '{POOL}' did not answer within 0.1 s (remote_answer_timeout_s)"
    )
    assert depth == 0
