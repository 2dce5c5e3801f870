"""Sentence encoders: pooling, transformer export and fusion, int8 with sensitive nodes kept,
distillation to fewer layers, and the embedding quality gate, on a tiny BERT built here."""

from itertools import pairwise

import numpy as np
import onnx
import pytest
import torch

from gearbox.compression import (
    CPU,
    DistilledConfig,
    Fp32Config,
    Int8Config,
    InvalidArgumentError,
    ModelSpec,
    apply_technique,
)
from gearbox.compression.evaluation import Evaluation
from gearbox.compression.examples.minilm import docstring_sentences, keep_layers
from gearbox.compression.onnx_export import run_onnx, transformer_shape
from gearbox.compression.pipeline import VariantBuild, _gate
from gearbox.compression.quality import row_cosines
from gearbox.compression.techniques import CompressedModel, TechniqueInput
from gearbox.compression.techniques.int8 import unfuse_attention, unfuse_bias_gelu
from gearbox.compression.training import _bucketed_by_length, distill, layer_loss, predict
from tests.unit.tiny_encoder import HIDDEN, LAYERS, encoder_spec, tiny_encoder

SPEC = encoder_spec()
DATA = SPEC.load_data()


def _inputs(model, parent=None, parent_params=None) -> TechniqueInput:
    return TechniqueInput(
        spec=SPEC,
        data=DATA,
        reference_model=model,
        parent_artifact=parent,
        parent_param_count=parent_params,
    )


@pytest.fixture(scope="module")
def fp32():
    return apply_technique(Fp32Config(), _inputs(tiny_encoder()))


def test_the_encoder_mean_pools_the_real_tokens_and_normalises():
    encoder = tiny_encoder()
    rows = DATA.heldout.take(8)
    ids, mask = (torch.from_numpy(rows[name]) for name in ("input_ids", "attention_mask"))
    with torch.no_grad():
        embeddings = encoder(ids, mask).numpy()
        hidden = encoder.bert(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    for row in range(8):
        real = mask[row].numpy().astype(bool)
        expected = hidden[row][real].mean(axis=0)
        expected /= np.linalg.norm(expected)
        # Trimming padding columns before the encoder changes nothing.
        np.testing.assert_allclose(embeddings[row], expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)


def test_fp32_of_a_bert_is_fused_and_matches_torch(fp32):
    assert transformer_shape(tiny_encoder()).num_heads == 4
    assert fp32.details["export"]["exporter"] == "torchscript"
    assert fp32.details["export"]["fused_operators"]["Attention"] == LAYERS
    ops = {node.op_type for node in onnx.load_from_string(fp32.onnx).graph.node}
    assert {"Attention", "LayerNormalization"} <= ops
    assert "SkipLayerNormalization" not in ops  # slower on ONNX Runtime's CPU than Add + LN
    expected = predict(tiny_encoder(), SPEC, DATA.heldout)
    np.testing.assert_allclose(run_onnx(fp32.onnx, SPEC, DATA.heldout), expected, atol=1e-5)


def test_the_fused_graph_takes_any_batch_and_sequence_length(fp32):
    from gearbox.compression.devices import CPU

    session = CPU.create_session(fp32.onnx)
    for rows, length in ((1, 3), (5, 12), (2, 20)):
        feed = {
            "input_ids": np.full((rows, length), 7, dtype=np.int64),
            "attention_mask": np.ones((rows, length), dtype=np.int64),
        }
        assert session.run(None, feed)[0].shape == (rows, HIDDEN)


def test_unfusing_attention_keeps_the_function_padding_included(fp32):
    model = onnx.load_from_string(fp32.onnx)
    assert unfuse_attention(model) == LAYERS
    onnx.checker.check_model(model)
    ops = [node.op_type for node in model.graph.node]
    assert "Attention" not in ops
    assert ops.count("Softmax") == LAYERS
    rows = DATA.heldout.take(16)
    rows["attention_mask"][:, rows["attention_mask"].shape[1] // 2 :] = 0  # half padding
    fused = CPU.create_session(fp32.onnx).run(None, rows)[0]
    plain = CPU.create_session(model.SerializeToString()).run(None, rows)[0]
    np.testing.assert_allclose(plain, fused, atol=1e-5)


def test_unfusing_bias_gelu_keeps_the_function(fp32):
    model = onnx.load_from_string(fp32.onnx)
    assert (
        unfuse_bias_gelu(model) == fp32.details["export"]["fused_operators"]["BiasGelu"] == LAYERS
    )
    onnx.checker.check_model(model)
    ops = [node.op_type for node in model.graph.node]
    assert "BiasGelu" not in ops
    assert ops.count("Gelu") == LAYERS
    assert unfuse_bias_gelu(model) == 0  # nothing left to split
    rows = DATA.heldout.take(16)
    fused = CPU.create_session(fp32.onnx).run(None, rows)[0]
    plain = CPU.create_session(model.SerializeToString()).run(None, rows)[0]
    np.testing.assert_allclose(plain, fused, atol=1e-6)


def test_int8_folds_the_feed_forward_bias_into_the_quantised_matmul(fp32, tmp_path):
    # Every node quantised: which ones the sensitivity pass keeps in FP32 depends on the CPU
    # (without VNNI, ONNX Runtime's uint8 x int8 products saturate and lose more).
    every_node = Int8Config(min_calibration_cosine=None)
    int8 = apply_technique(every_node, _inputs(tiny_encoder(), fp32.onnx, fp32.param_count))
    assert int8.details["unfused_bias_gelu_nodes"] == LAYERS
    optimized = tmp_path / "optimized.onnx"
    CPU.create_session(int8.onnx, save_optimized_to=optimized)
    graph = onnx.load(optimized).graph
    producers = {output: node for node in graph.node for output in node.output}
    gelus = [node for node in graph.node if node.op_type == "Gelu"]
    assert len(gelus) == LAYERS
    assert "BiasGelu" not in {node.op_type for node in graph.node}
    # As ONNX Runtime runs it, each Gelu reads the quantised MatMul itself, bias included.
    assert {producers[node.input[0]].op_type for node in gelus} == {"DynamicQuantizeMatMul"}
    kept = Int8Config(min_calibration_cosine=None, unfuse_bias_gelu=False)
    fused = apply_technique(kept, _inputs(tiny_encoder(), fp32.onnx, fp32.param_count))
    assert "BiasGelu" in {node.op_type for node in onnx.load_from_string(fused.onnx).graph.node}
    assert "unfused_bias_gelu_nodes" not in fused.details


def test_int8_of_an_encoder_quantises_its_unfused_attention_projections(fp32):
    int8 = apply_technique(Int8Config(), _inputs(tiny_encoder(), fp32.onnx, fp32.param_count))
    assert int8.details["unfused_attention_nodes"] == LAYERS
    ops = {node.op_type for node in onnx.load_from_string(int8.onnx).graph.node}
    assert "QAttention" not in ops and "Attention" not in ops
    assert "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops
    kept = Int8Config(unfuse_attention=False)
    fused = apply_technique(kept, _inputs(tiny_encoder(), fp32.onnx, fp32.param_count))
    assert "QAttention" in {node.op_type for node in onnx.load_from_string(fused.onnx).graph.node}
    assert "unfused_attention_nodes" not in fused.details


def test_int8_keeps_the_most_sensitive_nodes_in_fp32_until_the_target_holds(fp32):
    strict = Int8Config(min_calibration_cosine=0.99999, max_excluded_fraction=0.5)
    # Nodes scored on the single row full quantisation moves most; judged on every row still.
    one_row = Int8Config(min_calibration_cosine=0.99999, max_excluded_fraction=0.5,
                         sensitivity_rows=1)  # fmt: skip
    loose = Int8Config(min_calibration_cosine=None)
    quantized = {
        config: apply_technique(config, _inputs(tiny_encoder(), fp32.onnx, fp32.param_count))
        for config in (strict, one_row, loose)
    }
    assert len(DATA.calibration) > 1
    assert quantized[loose].details["excluded_nodes"] == []
    excluded = quantized[strict].details["excluded_nodes"]
    assert excluded, "a near-perfect target must keep some node in FP32"
    quantized_graph = onnx.load_from_string(fp32.onnx)
    unfuse_attention(quantized_graph)  # as int8 does first
    assert set(excluded) <= {node.name for node in quantized_graph.graph.node}
    reference = run_onnx(fp32.onnx, SPEC, DATA.calibration)
    closeness = {
        config: float(np.min(row_cosines(run_onnx(result.onnx, SPEC, DATA.calibration), reference)))
        for config, result in quantized.items()
    }
    for config in (strict, one_row):
        assert closeness[config] == pytest.approx(
            quantized[config].details["calibration_min_cosine"], abs=1e-5
        )
        assert closeness[config] >= closeness[loose]
    assert quantized[one_row].details["excluded_nodes"]


def test_keep_layers_copies_the_chosen_teacher_layers():
    teacher = tiny_encoder()
    student = keep_layers(teacher, (0, 3))
    assert len(student.bert.encoder.layer) == 2
    for kept, source in zip(student.bert.encoder.layer, (0, 3), strict=True):
        original = teacher.bert.encoder.layer[source].state_dict()
        for name, value in kept.state_dict().items():
            assert torch.equal(value, original[name]), name
    assert len(teacher.bert.encoder.layer) == LAYERS  # the teacher is untouched
    with pytest.raises(InvalidArgumentError, match="indices of the teacher's 4 layers"):
        keep_layers(teacher, (0, 4))


def test_distilling_an_encoder_brings_the_student_closer_to_the_teacher():
    teacher = tiny_encoder()
    expected = predict(teacher, SPEC, DATA.heldout)
    untrained = predict(SPEC.build_student(), SPEC, DATA.heldout)
    result = apply_technique(DistilledConfig(), _inputs(teacher))
    trained = run_onnx(result.onnx, SPEC, DATA.heldout)
    assert np.mean(row_cosines(trained, expected)) > np.mean(row_cosines(untrained, expected))
    assert result.details["loss"] == (
        "1 - cosine to the teacher's embedding + hidden_weight * layer loss"
    )
    assert result.details["hidden_weight"] == 1.0
    assert result.details["epochs"] == SPEC.student_training.epochs
    assert result.param_count < result.details["teacher_params"]


def _layer_loss_on_heldout(student, teacher) -> float:
    rows = DATA.heldout.take(48)
    ids, mask = (torch.from_numpy(rows[name]) for name in ("input_ids", "attention_mask"))
    with torch.no_grad():
        return float(layer_loss(student.encode(ids, mask), teacher.encode(ids, mask)))


def test_a_student_cut_from_its_teacher_maps_its_layers_to_the_teachers():
    teacher = tiny_encoder()
    student = keep_layers(teacher, (1, 3))
    assert teacher.teacher_layers == (0, 1, 2, 3)
    assert student.teacher_layers == (1, 3)
    assert keep_layers(student, (1,)).teacher_layers == (3,)
    rows = DATA.heldout.take(4)
    ids, mask = (torch.from_numpy(rows[name]) for name in ("input_ids", "attention_mask"))
    with torch.no_grad():
        output = teacher.encode(ids, mask)
        torch.testing.assert_close(output.embedding, teacher(ids, mask))
    assert list(output.layer_outputs) == [0, 1, 2, 3]
    assert output.layer_outputs[3].shape == (4, int(mask.sum(dim=1).max()), HIDDEN)
    # The teacher against itself has no layer loss; a student's first layer, a copy of the
    # teacher's layer 1 fed by the same embeddings, matches it exactly too.
    assert _layer_loss_on_heldout(teacher, teacher) == pytest.approx(0.0, abs=1e-6)
    assert _layer_loss_on_heldout(student, teacher) > 0.0


def test_layer_by_layer_distillation_matches_the_teachers_layers_better_than_embeddings_alone():
    teacher = tiny_encoder()
    embeddings_only = apply_technique(DistilledConfig(hidden_weight=0.0), _inputs(teacher))
    assert embeddings_only.details["loss"] == "1 - cosine to the teacher's embedding"
    assert "hidden_weight" not in embeddings_only.details

    def trained(weight: float):
        student = SPEC.build_student()
        distill(
            student, teacher, SPEC, DATA.train, SPEC.student_training, epochs=3,
            temperature=1.0, soft_weight=1.0, hidden_weight=weight,
        )  # fmt: skip
        return student

    assert _layer_loss_on_heldout(trained(1.0), teacher) < _layer_loss_on_heldout(
        trained(0.0), teacher
    )


def test_a_negative_hidden_weight_is_refused():
    with pytest.raises(InvalidArgumentError, match="hidden_weight must be >= 0"):
        DistilledConfig(hidden_weight=-1.0)


def test_distillation_batches_hold_sentences_of_similar_length_each_row_once():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 65, (300,), generator=generator)
    order = torch.randperm(300, generator=generator)
    batches = _bucketed_by_length(order, lengths, batch_size=8, generator=generator)
    assert sorted(torch.cat(batches).tolist()) == list(range(300))
    assert sorted(len(batch) for batch in batches) == [4] + [8] * 37
    # One window (300 rows < 50 batches of 8): the batches cut a length-sorted order, so no
    # two of them overlap in length beyond a shared boundary value.
    spans = sorted((int(lengths[b].min()), int(lengths[b].max())) for b in batches)
    assert all(low <= high for low, high in spans)
    assert all(previous[1] <= following[0] for previous, following in pairwise(spans))
    # ...and the batches come in random order, not shortest first.
    assert [int(lengths[b].min()) for b in batches] != [low for low, _ in spans]


def test_docstring_sentences_keep_prose_and_drop_sections_fields_and_doctests():
    docstring = """Return the sum of the two arrays given to this function.

    Parameters
    ----------
    a : array_like
        The first array, added element by element to the second.

    Notes
    -----
    The sum is computed element by element in a single pass. Short one.

    Examples
    --------
    >>> add(1, 2)
    3
    """
    assert docstring_sentences(docstring) == [
        "Return the sum of the two arrays given to this function.",
        "The sum is computed element by element in a single pass.",
    ]


def _build(config, outputs) -> VariantBuild:
    return VariantBuild(
        config=config,
        compressed=CompressedModel(onnx=config.name.encode(), param_count=1, details={}),
        evaluation=Evaluation(quality=None, outputs=outputs),
        node="host/0",
        seconds=1.0,
    )


def test_the_embedding_gate_reads_the_mean_cosine_to_the_reference():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(32, HIDDEN))
    close = reference + 0.05 * rng.normal(size=reference.shape)
    far = reference + 0.8 * rng.normal(size=reference.shape)
    fp32 = _build(Fp32Config(), reference)
    ready = _gate(_build(Int8Config(), close), {}, fp32, SPEC, max_accuracy_drop=0.05)
    rejected = _gate(_build(DistilledConfig(), far), {}, fp32, SPEC, max_accuracy_drop=0.05)
    assert ready.status == "ready"
    assert ready.quality.metric == "cosine"
    assert ready.quality.reference == pytest.approx(1.0)
    assert ready.quality.value == pytest.approx(np.mean(row_cosines(close, reference)), abs=1e-6)
    assert ready.quality.agreement == ready.quality.value
    assert set(ready.quality.details) == {"min_cosine", "neighbour_agreement"}
    assert ready.to_json()["quality"]["min_cosine"] == ready.quality.details["min_cosine"]
    assert rejected.status == "rejected"
    assert rejected.reason.startswith("cosine ")


def test_a_task_is_judged_by_its_own_metric():
    with pytest.raises(InvalidArgumentError, match="task 'embedding' is judged by metric 'cosine'"):
        ModelSpec(**{**SPEC.__dict__, "metric": "accuracy"})


PROFILED = {"cpu": {"1": {"p50": 7.0, "p95": 9.0}, "8": {"p50": 21.0, "p95": 25.0}}}


@pytest.fixture
def encoder_backend(tmp_path, fp32):
    """The tiny encoder's fp32, published with a profile of 7 ms at batch 1 and 21 ms at 8,
    in a gateway backend."""
    import dataclasses

    from gearbox.compression import ModelRecord, ModelRepository
    from gearbox.compression.devices import CPU
    from gearbox.serving.catalog import Catalog
    from gearbox.serving.config import BatchingConfig
    from gearbox.serving.hosting import LocalBackend
    from tests.unit.tiny_model import make_manifest

    repository = ModelRepository(tmp_path)
    repository.ensure_writable()
    repository.register_model(ModelRecord.for_spec(SPEC, reference_variant="fp32"))
    manifest = dataclasses.replace(make_manifest(fp32.onnx, model=SPEC.name), latency_ms=PROFILED)
    repository.publish_variant(manifest, fp32.onnx)
    catalog = Catalog.load(repository)
    backend = LocalBackend(repository, catalog, CPU, BatchingConfig())
    yield catalog, backend
    backend.close()


def _predicted(backend, rows: int) -> float:
    from gearbox.serving.queue_model import variant_key

    return backend.times.batch_ms(variant_key(SPEC.name, "fp32"), "cpu", rows)


def test_a_replica_keeps_the_manifest_figures_of_a_model_with_dynamic_token_length(
    encoder_backend,
):
    import asyncio

    _, backend = encoder_backend
    asyncio.run(backend.warm_up())
    # Warmed on one-token zeros, which time no real sentence: the profile stands.
    assert _predicted(backend, 1) == pytest.approx(7.0)
    assert _predicted(backend, 8) == pytest.approx(21.0)
    assert backend.executor.hop_ms > 0


def test_the_gateways_own_warm_up_requests_leave_an_encoders_figures_alone(encoder_backend):
    import asyncio

    from gearbox.serving.dataplane import DataPlane
    from tests.unit.serving_fixtures import RecordingMetrics

    catalog, backend = encoder_backend

    async def warm() -> None:
        await backend.warm_up()
        plane = DataPlane(catalog, [backend], ["cpu"], RecordingMetrics(), shadow_fraction=0)
        await plane.warm_up()
        assert plane.ready()

    asyncio.run(warm())
    assert _predicted(backend, 1) == pytest.approx(7.0)


def test_distillation_leaves_a_students_frozen_parameters_as_they_are():
    teacher = tiny_encoder()
    student = SPEC.build_student()
    embeddings = student.bert.embeddings.word_embeddings.weight
    embeddings.requires_grad_(False)
    before = embeddings.detach().clone()
    layer_before = student.bert.encoder.layer[0].output.dense.weight.detach().clone()
    distill(
        student, teacher, SPEC, DATA.train, SPEC.student_training, epochs=1,
        temperature=1.0, soft_weight=1.0, hidden_weight=1.0,
    )  # fmt: skip
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, before)
    assert not torch.equal(student.bert.encoder.layer[0].output.dense.weight, layer_before)


def test_sessions_keep_add_and_layer_normalization_unfused(fp32, tmp_path):
    assert fp32.details["export"]["fused_operators"].get("SkipLayerNormalization", 0) == 0
    optimized = tmp_path / "optimized.onnx"
    CPU.create_session(fp32.onnx, save_optimized_to=optimized)
    operators = {node.op_type for node in onnx.load(optimized).graph.node}
    assert "LayerNormalization" in operators
    assert "SkipLayerNormalization" not in operators
