"""Compression end to end on a real two-node Ray cluster, through the API and the CLI."""

from __future__ import annotations

import json
import signal
import time

import onnxruntime as ort
import pytest

from gearbox.compression import (
    CORE_RECIPES,
    ModelRepository,
    compress,
    load_spec,
    resolve_recipes,
)
from gearbox.compression.provenance import code_version
from gearbox.compression.recipe_file import apply_settings
from gearbox.compression.techniques import config_from_params
from tests.integration.conftest import run_gearbox, start_gearbox

MANIFEST_KEYS = {
    "model",
    "variant",
    "technique",
    "params",
    "parent",
    "status",
    "reason",
    "sha256",
    "size_bytes",
    "param_count",
    "quality",
    "latency_ms",
    "created_at",
    "build",
    "details",
    "storage_bytes",
}


def _assert_complete(repo: ModelRepository, model: str, variant: str) -> dict:
    raw = json.loads((repo.root / model / variant / "variant.json").read_text())
    assert raw.keys() >= MANIFEST_KEYS
    assert set(raw["quality"]) == {"metric", "value", "reference", "agreement"}
    assert set(raw["latency_ms"]["cpu"]) == {"1", "8"}
    for figures in raw["latency_ms"]["cpu"].values():
        assert 0 < figures["p50"] <= figures["p95"]
    manifest = repo.manifest(model, variant)
    artifact = repo.read_artifact(manifest)  # verifies sha256
    assert len(artifact) == raw["size_bytes"]
    session = ort.InferenceSession(artifact, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    return raw


def test_compress_builds_evaluates_and_publishes_core_variants(ray_address, tmp_path):
    repo = ModelRepository(tmp_path / "repo")
    spec = load_spec("tests.fixtures.specs:tiny_digits")

    report = compress(spec, repo, CORE_RECIPES, max_accuracy_drop=1.0)

    assert report.failed == {}
    assert [m.variant for m in report.published] == ["fp32", "int8", "pruned", "distilled"]
    model = json.loads((repo.root / "tiny-digits" / "model.json").read_text())
    assert model["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert model["reference_variant"] == "fp32"
    assert model["metric"] == "accuracy"

    manifests = {
        v: _assert_complete(repo, "tiny-digits", v) for v in ("fp32", "int8", "pruned", "distilled")
    }
    by_name = {recipe.name: recipe for recipe in CORE_RECIPES}
    fp32 = manifests["fp32"]
    assert fp32["status"] == "ready" and fp32["parent"] is None
    assert fp32["quality"]["agreement"] == 1.0
    assert fp32["quality"]["value"] == fp32["quality"]["reference"]
    assert manifests["int8"]["parent"] == "fp32"
    assert manifests["int8"]["details"]["mode"] == "static"
    assert manifests["int8"]["size_bytes"] < fp32["size_bytes"]
    for raw in manifests.values():
        assert config_from_params(raw["params"]) == by_name[raw["variant"]]
        assert raw["build"]["code_version"] == code_version()
        assert len(raw["build"]["inputs_digest"]) == 64
    assert manifests["pruned"]["param_count"] < fp32["param_count"]
    assert manifests["distilled"]["param_count"] < fp32["param_count"]
    # Variants ran in parallel tasks spread over both one-CPU nodes of the cluster.
    assert len({m["build"]["node"] for m in manifests.values()}) == 2


def test_a_composed_recipe_is_published_as_one_variant_named_after_its_steps(ray_address, tmp_path):
    repo = ModelRepository(tmp_path / "repo")
    spec = load_spec("tests.fixtures.specs:tiny_digits")

    report = compress(spec, repo, resolve_recipes("pruned-distilled-int8"), max_accuracy_drop=1.0)

    assert [m.variant for m in report.published] == ["fp32", "pruned-distilled-int8"]
    fp32 = _assert_complete(repo, "tiny-digits", "fp32")
    raw = _assert_complete(repo, "tiny-digits", "pruned-distilled-int8")
    assert raw["technique"] == "compose" and raw["parent"] == "fp32"
    assert [step["technique"] for step in raw["params"]["steps"]] == [
        "prune",
        "distill",
        "quantize",
    ]
    assert list(raw["details"]) == ["pruned", "distilled", "export", "int8"]
    assert raw["param_count"] < fp32["param_count"]
    assert raw["size_bytes"] < fp32["size_bytes"] / 2


def test_unchanged_variants_are_kept_and_only_what_changed_is_rebuilt(ray_address, tmp_path):
    repo = ModelRepository(tmp_path / "repo")
    spec = load_spec("tests.fixtures.specs:tiny_digits")
    recipes = resolve_recipes("int8,pruned")
    first = compress(spec, repo, recipes, max_accuracy_drop=1.0)
    assert [m.variant for m in first.published] == ["fp32", "int8", "pruned"]
    before = {m.variant: m for m in repo.variants("tiny-digits")}

    again = compress(spec, repo, recipes, max_accuracy_drop=1.0)

    assert again.published == []
    assert [m.variant for m in again.unchanged] == ["fp32", "int8", "pruned"]
    assert {m.variant: m for m in repo.variants("tiny-digits")} == before

    changed = compress(
        spec, repo, apply_settings(recipes, ["pruned.amount=0.25"]), max_accuracy_drop=1.0
    )

    assert [m.variant for m in changed.published] == ["pruned"]
    assert [m.variant for m in changed.unchanged] == ["fp32", "int8"]
    pruned = repo.manifest("tiny-digits", "pruned")
    assert pruned.params["amount"] == 0.25
    assert pruned.build["inputs_digest"] != before["pruned"].build["inputs_digest"]
    assert pruned.param_count > before["pruned"].param_count
    assert repo.manifest("tiny-digits", "int8") == before["int8"]

    rebuilt = compress(spec, repo, resolve_recipes("int8"), max_accuracy_drop=1.0, rebuild=True)
    assert [m.variant for m in rebuilt.published] == ["fp32", "int8"]


def test_an_interrupted_run_resumes_from_the_builds_it_finished(ray_address, tmp_path):
    repo = tmp_path / "repo"
    command = [
        "compress",
        "--spec",
        "tests.fixtures.specs:tiny_digits",
        "--repo",
        str(repo),
        "--variants",
        "int8,pruned,distilled",
        "--max-accuracy-drop",
        "1",
        "--address",
        ray_address,
    ]
    builds = repo / "tiny-digits" / ".builds"
    interrupted = start_gearbox(*command)
    try:
        deadline = time.monotonic() + 300
        while not (builds.is_dir() and any(p.name[0] != "." for p in builds.iterdir())):
            assert interrupted.poll() is None, "the run ended before any build was kept"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        interrupted.send_signal(signal.SIGKILL)
    finally:
        interrupted.wait(timeout=60)
    kept = {
        entry.name: json.loads((entry / "build.json").read_text())
        for entry in builds.iterdir()
        if entry.name[0] != "."
    }
    assert kept
    # What the killed run left is consistent: every variant listed is whole (its artifact
    # matches its manifest's sha256); nothing half-written is visible.
    interrupted_repository = ModelRepository(repo)
    for model in interrupted_repository.models():
        for manifest in interrupted_repository.variants(model):
            interrupted_repository.read_artifact(manifest)

    resumed = run_gearbox(*command)

    assert resumed.returncode == 0, resumed.stderr
    repository = ModelRepository(repo)
    manifests = {m.variant: m for m in repository.variants("tiny-digits")}
    assert sorted(manifests) == ["distilled", "fp32", "int8", "pruned"]
    by_digest = {m.build["inputs_digest"]: m for m in manifests.values()}
    for digest, build in kept.items():
        # Built once, by the interrupted run: the same node and the same build time.
        assert by_digest[digest].build["node"] == build["node"]
        assert by_digest[digest].build["seconds"] == round(build["seconds"], 2)
    assert not builds.exists(), "published builds stay cached"


def test_accuracy_gate_publishes_a_losing_variant_as_rejected(ray_address, tmp_path):
    repo = ModelRepository(tmp_path / "repo")
    spec = load_spec("tests.fixtures.specs:blind_student_digits")

    report = compress(spec, repo, resolve_recipes("distilled"), max_accuracy_drop=0.02)

    by_name = {m.variant: m for m in report.published}
    assert by_name["fp32"].status == "ready"
    distilled = repo.manifest("blind-student", "distilled")
    assert distilled.status == "rejected"
    assert distilled.quality.value < distilled.quality.reference - 0.02
    assert "below the reference" in distilled.reason and "0.0200" in distilled.reason


def test_cli_compresses_on_a_running_cluster_and_lists_variants(ray_address, tmp_path):
    repo = tmp_path / "repo"
    result = run_gearbox(
        "compress",
        "--spec",
        "tests.fixtures.specs:tiny_digits",
        "--repo",
        str(repo),
        "--variants",
        "int8",
        "--max-accuracy-drop",
        "1",
        "--address",
        ray_address,
    )
    assert result.returncode == 0, result.stderr
    assert "published 2 variant(s) of 'tiny-digits'" in result.stdout
    # Beside the variants only the trained reference's weights stay, for the next run.
    assert sorted(p.name for p in (repo / "tiny-digits").iterdir()) == [
        ".reference",
        "fp32",
        "int8",
        "model.json",
    ]

    listed = run_gearbox("variants", "--repo", str(repo))
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == ["fp32", "int8"]


def test_cli_export_failure_is_one_error_line_and_writes_nothing(ray_address, tmp_path):
    repo = tmp_path / "repo"
    result = run_gearbox(
        "compress",
        "--spec",
        "tests.fixtures.specs:unexportable",
        "--repo",
        str(repo),
        "--address",
        ray_address,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("gearbox:")]
    assert len(errors) == 1
    assert "reference variant 'fp32' failed" in errors[0]
    assert "ONNX export failed" in errors[0]
    assert list(repo.iterdir()) == []


@pytest.mark.slow
def test_digits_example_reaches_its_quality_and_every_variant_passes_the_gate(
    digits_repository,
):
    repository, result = digits_repository
    assert result.returncode == 0, result.stderr
    manifests = {m.variant: m for m in repository.variants("digits")}
    assert sorted(manifests) == ["distilled", "fp32", "int8", "pruned"]
    assert all(m.status == "ready" for m in manifests.values())
    assert manifests["fp32"].quality.value >= 0.97
    assert manifests["int8"].details["mode"] == "static"
    for variant in ("pruned", "distilled"):
        assert manifests[variant].param_count < manifests["fp32"].param_count


def test_cli_refuses_a_wrong_declared_output_shape_in_one_line_before_any_work(
    ray_address, tmp_path
):
    repo = tmp_path / "repo"
    result = run_gearbox(
        "compress",
        "--spec",
        "tests.fixtures.declared_signatures:two_classes_declared",
        "--repo",
        str(repo),
        "--address",
        ray_address,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("gearbox:")]
    assert errors == [
        "gearbox: error: model 'two-classes': declared output 'logits' has shape [-1, 2] but "
        "the model returns [2, 10] (train split, 2 rows; -1: any size)"
    ]
    assert "Traceback" not in result.stderr
    assert list(repo.iterdir()) == []
