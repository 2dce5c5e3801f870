import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gearbox.compression import (
    ALL_RECIPES,
    CORE_RECIPES,
    ClusteredConfig,
    ComposedConfig,
    CompressionError,
    DistilledConfig,
    Fp32Config,
    Int8Config,
    InvalidArgumentError,
    LowRankConfig,
    PrunedConfig,
    QatConfig,
    SparseConfig,
    TechniqueConfig,
    apply_technique,
    resolve_recipes,
)
from gearbox.compression.surgery import count_parameters
from gearbox.compression.techniques import TechniqueInput, registered_config_types

ROUND_TRIP_CONFIGS = [
    Fp32Config(),
    Int8Config(),
    PrunedConfig(),
    DistilledConfig(),
    ClusteredConfig(),
    LowRankConfig(),
    SparseConfig(),
    QatConfig(epochs=1),
]


def op_types(artifact):
    return {node.op_type for node in onnx.load_from_string(artifact).graph.node}


def test_round_trip_covers_every_registered_technique():
    assert {type(config) for config in ROUND_TRIP_CONFIGS} == set(registered_config_types())


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS, ids=lambda c: c.name)
def test_technique_produces_a_runnable_onnx_artifact(conv_case, config):
    result = conv_case.apply(config)
    signature = conv_case.spec.signature

    onnx.checker.check_model(onnx.load_from_string(result.onnx))
    session = ort.InferenceSession(result.onnx, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == signature.input_names
    assert [o.name for o in session.get_outputs()] == signature.output_names
    batch = conv_case.data.heldout.take(3)
    [logits] = session.run(None, batch)
    assert logits.shape == (3, 10)
    assert signature.outputs[0].accepts(logits.shape)
    assert logits.dtype == signature.outputs[0].numpy_dtype
    assert np.all(np.isfinite(logits))
    assert result.param_count > 0

    fractions = [fraction for _, fraction in conv_case.progress[config]]
    assert fractions, "the technique reported no progress"
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions)


def test_fp32_counts_the_reference_models_parameters(conv_case):
    fp32 = conv_case.apply(Fp32Config())
    assert fp32.param_count == count_parameters(conv_case.model)
    assert fp32.details["export"]["verified"] is True


def test_int8_of_a_conv_model_is_static_qdq_and_smaller(conv_case):
    fp32 = conv_case.apply(Fp32Config())
    int8 = conv_case.apply(Int8Config())
    assert int8.details["mode"] == "static"
    assert int8.details["format"] == "QDQ"
    assert int8.details["calibration_samples"] == len(conv_case.data.calibration)
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(int8.onnx)
    assert len(int8.onnx) < len(fp32.onnx)
    assert int8.param_count == fp32.param_count


def test_int8_of_a_linear_only_model_is_dynamic_and_smaller(mlp_case):
    fp32 = mlp_case.apply(Fp32Config())
    assert "Conv" not in op_types(fp32.onnx)
    int8 = mlp_case.apply(Int8Config())
    assert int8.details["mode"] == "dynamic"
    assert "DynamicQuantizeLinear" in op_types(int8.onnx)
    assert len(int8.onnx) < len(fp32.onnx)
    session = ort.InferenceSession(int8.onnx, providers=["CPUExecutionProvider"])
    [logits] = session.run(None, mlp_case.data.heldout.take(3))
    assert logits.shape == (3, 10)


def _normalized_matmul_model(rng):
    """x -> LayerNormalization (one outlier channel) -> MatMul, as a transformer has it."""
    from onnx import TensorProto, helper, numpy_helper

    gamma = np.ones(16, np.float32)
    gamma[3] = 40.0  # the outlier channel that sets a per-tensor activation scale
    initializers = [
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(np.zeros(16, np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_int8_smoothing_keeps_the_fp32_function_and_moves_outliers_onto_weights():
    from gearbox.compression.techniques.int8 import smooth_normalized_inputs

    rng = np.random.default_rng(0)
    model = _normalized_matmul_model(rng)
    rows = {"x": rng.standard_normal((32, 16)).astype(np.float32)}
    before = ort.InferenceSession(model.SerializeToString()).run(None, rows)[0]
    assert smooth_normalized_inputs(model, rows, alpha=0.5) == ["proj"]
    after = ort.InferenceSession(model.SerializeToString()).run(None, rows)[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    mul = next(node for node in model.graph.node if node.op_type == "Mul")
    inverse = next(t for t in model.graph.initializer if t.name == mul.input[1])
    scale = 1.0 / onnx.numpy_helper.to_array(inverse)
    assert int(np.argmax(scale)) == 3  # the outlier channel is divided the most


def test_int8_config_rejects_a_smoothing_alpha_outside_0_1_and_no_sensitivity_rows():
    with pytest.raises(InvalidArgumentError, match="smoothing_alpha"):
        Int8Config(smoothing_alpha=1.5)
    assert Int8Config(smoothing_alpha=None).smoothing_alpha is None
    with pytest.raises(InvalidArgumentError, match="sensitivity_rows"):
        Int8Config(sensitivity_rows=0)


def test_int8_mode_can_be_forced(mlp_case):
    int8 = apply_technique(
        Int8Config(name="int8-static", mode="static"), mlp_case.inputs(Int8Config())
    )
    assert int8.details["mode"] == "static"
    assert "QuantizeLinear" in op_types(int8.onnx)


def test_int8_without_its_parent_artifact_is_refused(conv_case):
    inputs = TechniqueInput(
        spec=conv_case.spec, data=conv_case.data, reference_model=conv_case.model
    )
    with pytest.raises(InvalidArgumentError) as caught:
        apply_technique(Int8Config(), inputs)
    assert caught.value.message == (
        "variant 'int8' transforms variant 'fp32', whose artifact is missing"
    )


def test_pruned_has_fewer_parameters_than_fp32(conv_case):
    fp32 = conv_case.apply(Fp32Config())
    pruned = conv_case.apply(PrunedConfig())
    assert pruned.param_count < fp32.param_count
    assert pruned.details["params_before"] == fp32.param_count
    assert pruned.details["pruned_layers"] == 2
    assert pruned.details["finetune_epochs"] == 1


def test_distilled_has_fewer_parameters_than_fp32(conv_case):
    fp32 = conv_case.apply(Fp32Config())
    distilled = conv_case.apply(DistilledConfig())
    assert distilled.param_count < fp32.param_count
    assert distilled.details["student"] == "tests.unit.tiny_model:TinyConvStudent"
    assert distilled.details["teacher_params"] == fp32.param_count
    assert distilled.details["epochs"] == 1


def test_a_composed_recipe_chains_its_steps_into_one_artifact(conv_case):
    fp32 = conv_case.apply(Fp32Config())
    pruned = conv_case.apply(PrunedConfig())
    recipe = ComposedConfig(steps=(PrunedConfig(), DistilledConfig(), Int8Config()))
    composed = conv_case.apply(recipe)

    assert list(composed.details) == ["pruned", "distilled", "export", "int8"]
    # The pruned network itself is distilled (not the spec's student), then quantised.
    assert composed.details["distilled"]["student"] == "the result of pruned"
    assert composed.param_count == pruned.param_count < fp32.param_count
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(composed.onnx)
    assert len(composed.onnx) < len(pruned.onnx)
    session = ort.InferenceSession(composed.onnx, providers=["CPUExecutionProvider"])
    [logits] = session.run(None, conv_case.data.heldout.take(4))
    assert logits.shape == (4, 10) and np.all(np.isfinite(logits))


def test_a_step_after_one_that_exports_its_own_graph_is_refused(conv_case):
    recipe = ComposedConfig(steps=(SparseConfig(finetune_epochs=1), PrunedConfig()))
    with pytest.raises(CompressionError, match="exports its own graph"):
        conv_case.apply(recipe)


def test_distilled_without_a_student_factory_shrinks_the_teacher(mlp_case):
    fp32 = mlp_case.apply(Fp32Config())
    distilled = mlp_case.apply(DistilledConfig())
    assert distilled.details["student"] == "teacher architecture at width 0.25"
    assert distilled.param_count < fp32.param_count


class UnregisteredConfig(TechniqueConfig):
    pass


def test_a_config_without_a_handler_is_refused(conv_case):
    with pytest.raises(InvalidArgumentError, match="no technique is registered for"):
        apply_technique(UnregisteredConfig(name="mystery"), conv_case.inputs(Fp32Config()))


@pytest.mark.parametrize(
    "make",
    [
        lambda: PrunedConfig(amount=0.0),
        lambda: PrunedConfig(amount=1.0),
        lambda: Int8Config(mode="fast"),
        lambda: Int8Config(calibration_method="magic"),
        lambda: DistilledConfig(temperature=0.0),
        lambda: DistilledConfig(soft_weight=1.5),
        lambda: DistilledConfig(width=1.0),
    ],
)
def test_configs_validate_their_parameters(make):
    with pytest.raises(InvalidArgumentError):
        make()


def names(recipes):
    return [recipe.name for recipe in recipes]


def test_resolve_recipes_defaults_to_the_core_list():
    assert resolve_recipes(None) == CORE_RECIPES
    assert resolve_recipes("") == CORE_RECIPES
    assert resolve_recipes("  ") == CORE_RECIPES
    assert names(CORE_RECIPES) == ["fp32", "int8", "pruned", "distilled"]


def test_resolve_recipes_all():
    resolved = resolve_recipes("all")
    assert resolved == ALL_RECIPES
    assert resolve_recipes(" all ") == ALL_RECIPES
    # "all" tries every technique Gearbox has, each variant once.
    assert {type(recipe) for recipe in resolved} >= set(registered_config_types())
    assert len(set(names(resolved))) == len(resolved)


def test_resolve_recipes_rejects_unknown_names_listing_the_known_ones():
    with pytest.raises(InvalidArgumentError) as caught:
        resolve_recipes("fp32,nope,int4")
    message = caught.value.message
    assert message.startswith("unknown variant 'nope', 'int4' (known: ")
    for known in names(ALL_RECIPES):
        assert known in message
    assert "'all'" in message


def test_resolve_recipes_brings_in_the_parent_of_int8():
    assert names(resolve_recipes("int8")) == ["fp32", "int8"]


def test_resolve_recipes_always_builds_the_reference_first():
    assert names(resolve_recipes("pruned")) == ["fp32", "pruned"]
    assert names(resolve_recipes(" distilled , int8 ")) == ["fp32", "distilled", "int8"]
    assert names(resolve_recipes("fp32,fp32")) == ["fp32"]
