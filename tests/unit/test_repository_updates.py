"""A variant that cannot load is left out while the others serve; a repository update is
served without a restart and without a failed request."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from gearbox.compression.errors import UnavailableError
from gearbox.compression.repository import ARTIFACT_FILE, MANIFEST_FILE, sha256_hex
from gearbox.serving.catalog import Catalog
from gearbox.serving.dataplane import UNAVAILABLE_STATE
from gearbox.serving.inference import InferResponse
from tests.unit.serving_fixtures import (
    DEVICE,
    MODEL,
    READY,
    REFERENCE,
    VARIANTS,
    Served,
    images,
    infer_request,
    linear_onnx,
    publish_tiny_repository,
    run,
    run_artifact,
    started,
    variant_manifest,
)

BROKEN = "int8"


def _tamper(repository, variant: str) -> bytes:
    """Flips the artifact's last byte; returns the original bytes."""
    artifact = repository.root / MODEL / variant / ARTIFACT_FILE
    original = artifact.read_bytes()
    artifact.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    return original


def _index(served: Served) -> dict[str, tuple[str, str]]:
    return {
        row.version: (row.state, row.reason)
        for row in served.plane.repository_index()
        if row.name == MODEL
    }


async def _update(served: Served, catalog: Catalog) -> None:
    """What a replica does on a repository update."""
    await served.backend.update(catalog)
    served.plane.serve(served.backend.served(catalog))


def test_a_tampered_artifact_is_left_out_and_reported_while_the_others_serve(tmp_path):
    repository = publish_tiny_repository(tmp_path / "repo")
    _tamper(repository, BROKEN)

    async def scenario() -> None:
        async with started(repository) as served:
            assert served.plane.ready()
            assert "sha256" in served.backend.unavailable[(MODEL, BROKEN)]
            state, reason = _index(served)[BROKEN]
            assert state == UNAVAILABLE_STATE and "sha256" in reason
            metadata = served.plane.model_metadata(MODEL)
            assert BROKEN not in metadata.versions
            assert set(metadata.versions) == set(READY) - {BROKEN}
            assert f"{BROKEN}: " in str(metadata.parameters["unavailable_variants"])
            assert served.metrics.loaded[(MODEL, BROKEN, DEVICE)] is False
            assert served.metrics.loaded[(MODEL, REFERENCE, DEVICE)] is True
            assert not served.plane.model_ready(MODEL, BROKEN)
            with pytest.raises(UnavailableError, match="sha256"):
                await served.answer(infer_request(version=BROKEN))
            for variant in set(READY) - {BROKEN}:
                response = await served.answer(infer_request(version=variant))
                assert response.version == variant
            routed = await served.answer(infer_request(latency_budget_ms=1.0))
            assert routed.version != BROKEN

    run(scenario())


def test_an_artifact_onnx_runtime_refuses_is_left_out(tmp_path):
    repository = publish_tiny_repository(tmp_path / "repo")
    directory = repository.root / MODEL / BROKEN
    garbage = b"this is not an ONNX model"
    (directory / ARTIFACT_FILE).write_bytes(garbage)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["sha256"] = sha256_hex(garbage)  # its checksum holds; ONNX Runtime refuses it
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))

    async def scenario() -> None:
        async with started(repository) as served:
            reason = served.backend.unavailable[(MODEL, BROKEN)]
            assert reason.startswith(f"failed to load on {DEVICE}")
            assert _index(served)[BROKEN][0] == UNAVAILABLE_STATE
            assert await served.answer(infer_request(version=REFERENCE))

    run(scenario())


def test_a_repaired_artifact_is_served_after_an_update_with_no_request_failing(tmp_path):
    repository = publish_tiny_repository(tmp_path / "repo")
    original = _tamper(repository, BROKEN)

    async def scenario() -> None:
        async with started(repository) as served:
            assert BROKEN not in served.plane.model_metadata(MODEL).versions
            (repository.root / MODEL / BROKEN / ARTIFACT_FILE).write_bytes(original)
            answered: list[InferResponse] = []
            updating = asyncio.Event()

            async def steady_traffic() -> None:
                while not updating.is_set() or len(answered) < 20:
                    answered.append(await served.answer(infer_request(latency_budget_ms=5.0)))

            traffic = asyncio.create_task(steady_traffic())
            await _update(served, Catalog.load(repository))
            updating.set()
            await traffic  # raises if any request failed
            assert (MODEL, BROKEN) not in served.backend.unavailable
            assert _index(served)[BROKEN][0] == "READY"
            assert served.metrics.loaded[(MODEL, BROKEN, DEVICE)] is True
            data = images(2, seed=3)
            response = await served.answer(infer_request(data, version=BROKEN))
            expected = run_artifact(repository, BROKEN, data)
            np.testing.assert_allclose(response.outputs[0].data, expected, rtol=1e-5, atol=1e-6)

    run(scenario())


def test_a_republished_variant_answers_from_its_new_artifact(tmp_path):
    repository = publish_tiny_repository(tmp_path / "repo")
    data = images(2, seed=4)

    async def scenario() -> None:
        async with started(repository) as served:
            before = (await served.answer(infer_request(data, version=BROKEN))).outputs[0].data
            seed = next(v for v in VARIANTS if v.name == BROKEN)
            artifact = linear_onnx(seed.seed + 40)
            repository.publish_variant(variant_manifest(seed, artifact), artifact)
            await _update(served, Catalog.load(repository))
            after = (await served.answer(infer_request(data, version=BROKEN))).outputs[0].data
            assert after.tolist() != before.tolist()
            expected = run_artifact(repository, BROKEN, data)
            np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-6)

    run(scenario())


def test_an_unloaded_model_stops_serving_and_says_why_until_it_is_loaded_again(tmp_path):
    repository = publish_tiny_repository(tmp_path / "repo")

    async def scenario() -> None:
        async with started(repository) as served:
            catalog = Catalog.load(repository)
            await _update(served, catalog.without_models([MODEL], "unloaded on request"))
            assert not served.plane.model_ready(MODEL)
            assert {state for state, _ in _index(served).values()} == {UNAVAILABLE_STATE}
            with pytest.raises(UnavailableError):
                await served.answer(infer_request())
            assert served.metrics.loaded[(MODEL, REFERENCE, DEVICE)] is False
            # Idle sessions of an unloaded model are released.
            assert not [v for m, v in served.backend.hosted if m == MODEL]
            await _update(served, catalog)
            assert served.plane.model_ready(MODEL)
            assert (await served.answer(infer_request())).version in READY

    run(scenario())
