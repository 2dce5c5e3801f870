"""The Pareto search end to end: Ray Tune trials on the two-node cluster, the gate, the front
published to a repository."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from gearbox.compression import ModelRepository, load_spec
from gearbox.compression.pareto import ParetoPoint, pareto_front, plot_front, point_of
from gearbox.compression.search import default_space, draw_points, search
from gearbox.compression.techniques import (
    ComposedConfig,
    DistilledConfig,
    Int8Config,
    PrunedConfig,
    config_from_params,
    config_to_params,
)

GATE = 0.05


def test_search_publishes_a_front_of_ready_variants_inside_the_gate(ray_address, tmp_path):
    repo = ModelRepository(tmp_path / "repo")
    spec = load_spec("tests.fixtures.specs:tiny_digits")

    report = search(spec, repo, trials=4, max_accuracy_drop=GATE, seed=0, finetune_epochs=1)

    assert len(report.trials) == 4
    assert len({t.variant for t in report.trials}) == 4, "the trials' recipes are distinct"
    assert not [t for t in report.trials if t.status == "failed"], report.trials
    # Two one-CPU nodes, one CPU per trial: the trials ran on both.
    assert len({t.node for t in report.trials}) == 2

    reference = repo.manifest(spec.name, "fp32")
    assert reference.is_ready and report.published[0].variant == "fp32"
    front = [repo.manifest(spec.name, name) for name in report.front]
    assert front, [(t.variant, t.status, t.quality) for t in report.trials]
    assert sorted(m.variant for m in report.published) == sorted(["fp32", *report.front])
    rows = spec.load_data().heldout.inputs["images"]
    for manifest in front:
        assert manifest.variant.startswith("search-")
        assert manifest.is_ready
        assert manifest.quality.value >= reference.quality.value - GATE
        assert manifest.parent == "fp32"
        assert config_from_params(manifest.params).name == manifest.variant
        assert manifest.build["search"]["seed"] == 0
        artifact = repo.read_artifact(manifest)  # verifies the sha256
        session = ort.InferenceSession(artifact, providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"images": rows})
        assert logits.shape == (len(rows), 10) and np.isfinite(logits).all()

    # Nothing published is dominated by another candidate or by the reference; every trial
    # left out is dominated, or outside the gate.
    device = next(iter(reference.latency_ms))
    judged = {t.variant: t for t in report.trials}
    points = [point_of(m, device) for m in (reference, *front)]
    assert {p.name for p in pareto_front(points)} >= set(report.front)
    for trial in judged.values():
        if trial.status == "outside the gate":
            assert trial.quality < reference.quality.value - GATE
            assert not (repo.root / spec.name / trial.variant).exists()
        elif trial.status == "dominated":
            assert not (repo.root / spec.name / trial.variant).exists()
            left_out = ParetoPoint(
                trial.variant, trial.quality, trial.latency_p50_ms, trial.stored_bytes
            )
            assert any(p.dominates(left_out) for p in points)

    figure = plot_front(repo.variants(spec.name), tmp_path / "front.png", max_accuracy_drop=GATE)
    texts = [text.get_text() for text in figure.axes[0].texts]
    assert all(any(text.startswith(f"{name},") for text in texts) for name in report.front)
    assert (tmp_path / "front.png").read_bytes().startswith(b"\x89PNG")


def test_points_are_distinct_seeded_and_capped_at_the_grid():
    space = default_space(load_spec("tests.fixtures.specs:tiny_digits"))
    grid = space.points()
    drawn = draw_points(space, 10, seed=3)
    assert len({tuple(sorted(p.items())) for p in drawn}) == 10
    assert drawn == draw_points(space, 10, seed=3)
    assert drawn != draw_points(space, 10, seed=4)
    assert len(draw_points(space, 10 * len(grid), seed=0)) == len(grid)


def test_a_point_becomes_a_recipe_named_after_its_steps():
    spec = load_spec("tests.fixtures.specs:tiny_digits")
    space = default_space(spec)
    point = {
        "technique": "pruned",
        "pruned.amount": 0.6,
        "pruned.teacher_temperature": 4.0,
        "int8": True,
    }
    config = space.candidate(point, spec, epochs=3)
    assert isinstance(config, ComposedConfig)
    assert config.name == "search-pruned60-distilled-t4-int8"
    pruned, distilled, int8 = config.steps
    assert isinstance(pruned, PrunedConfig) and pruned.amount == 0.6
    assert isinstance(distilled, DistilledConfig) and distilled.temperature == 4.0
    assert distilled.epochs == 3 and isinstance(int8, Int8Config)
    alone = space.candidate({**point, "pruned.teacher_temperature": None, "int8": False}, spec, 3)
    assert alone == PrunedConfig(name="search-pruned60", amount=0.6, finetune_epochs=3)
    # The manifest's params rebuild the same recipe.
    assert config_from_params(config_to_params(config)) == config
