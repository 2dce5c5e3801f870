import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from gearbox.compression import InvalidArgumentError
from gearbox.compression.surgery import count_parameters
from gearbox.compression.techniques import (
    TechniqueInput,
    apply_technique,
    config_from_params,
    config_to_params,
)
from gearbox.compression.techniques.sparse import (
    MagnitudePruner,
    SparseConfig,
    SparsitySchedule,
    decode_artifact,
    decode_tensor,
    encode_artifact,
    encode_bitmap,
    encode_csr,
    encode_tensor,
    pruned_count,
    schedule_for,
    weight_initializers,
    without_negative_zeros,
)
from tests.unit.tiny_encoder import encoder_spec


def initializer_arrays(artifact):
    graph = onnx.load_from_string(artifact).graph
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}


def bits(array):
    return array.view(f"u{array.dtype.itemsize}")


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"sparsity": 0.5, "initial_sparsity": 0.6},
        {"initial_sparsity": -0.1},
        {"begin_fraction": 0.6, "end_fraction": 0.6},
        {"begin_fraction": 0.7, "end_fraction": 0.5},
        {"end_fraction": 1.5},
        {"begin_fraction": -0.1},
        {"power": 0.0},
        {"update_every_steps": 0},
        {"finetune_epochs": 0},
        {"finetune_learning_rate_scale": 0.0},
    ],
)
def test_config_rejects_values_out_of_range(fields):
    with pytest.raises(InvalidArgumentError):
        SparseConfig(**fields)


def test_config_accepts_its_bounds_and_round_trips_through_params():
    SparseConfig(sparsity=0.0)
    SparseConfig(sparsity=0.99, initial_sparsity=0.99, begin_fraction=0.0, end_fraction=1.0)
    config = SparseConfig(sparsity=0.9, initial_sparsity=0.1, update_every_steps=3)
    params = config_to_params(config)
    assert params["technique"] == "sparsify"
    assert params["name"] == "sparse"
    assert config_from_params(params) == config


def test_schedule_ordering_is_checked_in_steps_too():
    with pytest.raises(InvalidArgumentError):
        SparsitySchedule(0.0, 0.8, begin_step=5, end_step=5)


# --- schedule -------------------------------------------------------------------------------


def test_schedule_is_tf_polynomial_decay_from_initial_to_final():
    schedule = SparsitySchedule(0.1, 0.8, begin_step=10, end_step=30, power=3)
    assert schedule.sparsity_at(0) == pytest.approx(0.1)
    assert schedule.sparsity_at(10) == pytest.approx(0.1)
    assert schedule.sparsity_at(20) == pytest.approx(0.8 + (0.1 - 0.8) * 0.5**3)
    assert schedule.sparsity_at(30) == pytest.approx(0.8)
    assert schedule.sparsity_at(100) == pytest.approx(0.8)
    values = [schedule.sparsity_at(step) for step in range(40)]
    assert all(later >= earlier for earlier, later in itertools.pairwise(values))
    assert values[11] - values[10] > values[29] - values[28]  # fast at first, slow at the end


def test_schedule_updates_every_frequency_steps_and_at_its_end():
    schedule = SparsitySchedule(0.0, 0.8, begin_step=2, end_step=13, update_every_steps=5)
    assert [step for step in range(20) if schedule.updates_at(step)] == [2, 7, 12, 13]


def test_schedule_for_resolves_fractions_of_the_finetuning_steps():
    schedule = schedule_for(SparseConfig(begin_fraction=0.25, end_fraction=0.75), 100)
    assert (schedule.begin_step, schedule.end_step) == (25, 75)
    tiny = schedule_for(SparseConfig(end_fraction=0.1), 2)
    assert tiny.begin_step < tiny.end_step


# --- masks during training ------------------------------------------------------------------


def test_pruned_weights_are_the_smallest_and_stay_zero_through_optimiser_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    weights = {"first": model[0].weight, "last": model[2].weight}
    schedule = SparsitySchedule(0.0, 0.75, begin_step=0, end_step=4, update_every_steps=2)
    pruner = MagnitudePruner(weights, schedule)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    other_optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    inputs, targets = torch.randn(8, 16), torch.randn(8, 4)
    with pruner.attached():
        for step in range(1, 7):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(inputs), targets).backward()
            optimizer.step()
            other_optimizer.step()  # trains none of the weights: must not count as a step
            assert pruner.steps_done == step
            for name, weight in weights.items():
                last_update = max(done for done in range(step + 1) if schedule.updates_at(done))
                expected = pruned_count(weight.numel(), schedule.sparsity_at(last_update))
                assert int((weight == 0).sum()) == expected, name
    assert pruner.mask_updates == 3  # after steps 0, 2 and 4
    for weight in weights.values():
        kept = weight.detach() != 0
        assert torch.all(weight.detach().abs()[kept] > 0)
        assert int((~kept).sum()) == pruned_count(weight.numel(), 0.75)
    # The hook is gone after the block: further steps leave the pruned weights to move.
    optimizer.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()
    optimizer.step()
    assert pruner.steps_done == 6
    assert int((weights["first"] == 0).sum()) < pruned_count(weights["first"].numel(), 0.75)


def test_first_mask_prunes_the_smallest_magnitudes():
    weight = nn.Parameter(torch.tensor([[0.5, -0.1, 2.0, -3.0], [0.05, 1.0, -0.2, 0.3]]))
    pruner = MagnitudePruner({"w": weight}, SparsitySchedule(0.5, 0.5, 0, 1))
    pruner.finish()
    expected = torch.tensor([[0.5, 0.0, 2.0, -3.0], [0.0, 1.0, 0.0, 0.0]])
    assert torch.equal(weight.detach(), expected)
    assert not torch.signbit(weight.detach()[weight == 0]).any()


# --- the technique, end to end --------------------------------------------------------------


CONV_CONFIG = SparseConfig(sparsity=0.8)
MLP_CONFIG = SparseConfig(sparsity=0.9, update_every_steps=1)


@pytest.mark.parametrize(
    ("case_name", "config"), [("conv_case", CONV_CONFIG), ("mlp_case", MLP_CONFIG)]
)
def test_exported_graph_has_the_target_sparsity_in_every_weight_tensor(request, case_name, config):
    case = request.getfixturevalue(case_name)
    result = case.apply(config)
    weights = weight_initializers(onnx.load_from_string(result.onnx))
    assert weights, "no Conv/Gemm/MatMul weight found in the exported graph"
    for name, array in weights.items():
        assert abs(int((array == 0).sum()) - config.sparsity * array.size) <= 1, name
        assert result.details["layer_sparsity"][name] == pytest.approx((array == 0).mean())
    zeros = sum(int((a == 0).sum()) for a in weights.values())
    total = sum(a.size for a in weights.values())
    assert result.details["achieved_sparsity"] == pytest.approx(zeros / total)
    assert result.details["target_sparsity"] == config.sparsity
    assert "no faster" in result.details["latency"]
    assert result.details["export"]["verified"] is True
    assert result.param_count == count_parameters(case.model)


def test_sparse_graph_runs_in_onnx_runtime_and_keeps_the_signature(conv_case):
    result = conv_case.apply(CONV_CONFIG)
    onnx.checker.check_model(onnx.load_from_string(result.onnx))
    session = ort.InferenceSession(result.onnx, providers=["CPUExecutionProvider"])
    signature = conv_case.spec.signature
    assert [i.name for i in session.get_inputs()] == signature.input_names
    assert [o.name for o in session.get_outputs()] == signature.output_names
    [logits] = session.run(None, conv_case.data.heldout.take(5))
    assert logits.shape == (5, 10)
    assert np.all(np.isfinite(logits))
    fractions = [fraction for _, fraction in conv_case.progress[CONV_CONFIG]]
    assert fractions and fractions == sorted(fractions)
    assert all(0.0 <= f <= 0.85 for f in fractions)


def test_storage_decodes_to_exactly_the_served_graph_and_is_smaller(mlp_case):
    result = mlp_case.apply(MLP_CONFIG)
    storage = encode_artifact(result.onnx)
    assert result.storage_bytes == storage.nbytes
    assert result.storage_bytes < len(result.onnx)
    assert result.details["storage_format"]["storage_bytes"] == result.storage_bytes
    decoded = decode_artifact(storage)
    served, rebuilt = initializer_arrays(result.onnx), initializer_arrays(decoded)
    assert served.keys() == rebuilt.keys()
    for name, array in served.items():
        assert rebuilt[name].dtype == array.dtype and rebuilt[name].shape == array.shape
        assert np.array_equal(bits(rebuilt[name]), bits(array)), name
    assert decoded == result.onnx
    batch = mlp_case.data.heldout.take(8)
    original = ort.InferenceSession(result.onnx, providers=["CPUExecutionProvider"])
    restored = ort.InferenceSession(decoded, providers=["CPUExecutionProvider"])
    assert np.array_equal(original.run(None, batch)[0], restored.run(None, batch)[0])


# --- encodings ------------------------------------------------------------------------------


def sparse_array(shape, sparsity, seed=0):
    rng = np.random.default_rng(seed)
    array = rng.standard_normal(shape).astype(np.float32)
    array[rng.random(shape) < sparsity] = 0.0
    return array


def test_encoding_picks_bitmap_csr_or_dense_by_size_and_decodes_exactly():
    moderate = sparse_array((64, 32, 3, 3), 0.8)
    very_sparse = sparse_array((64, 300), 0.99, seed=1)
    dense = sparse_array((64,), 0.0, seed=2)
    bitmap = encode_tensor("moderate", moderate)
    csr = encode_tensor("very_sparse", very_sparse)
    assert bitmap is not None and bitmap.format == "bitmap"
    assert csr is not None and csr.format == "csr"
    assert csr.arrays["indices"].dtype == np.uint16  # 300 columns do not fit in a byte
    assert encode_tensor("dense", dense) is None
    assert bitmap.nbytes < moderate.nbytes and csr.nbytes < very_sparse.nbytes
    for encoded, original in ((bitmap, moderate), (csr, very_sparse)):
        decoded = decode_tensor(encoded)
        assert decoded.shape == original.shape and decoded.dtype == original.dtype
        assert np.array_equal(bits(decoded), bits(original))


def test_negative_zero_and_empty_rows_survive_encoding():
    array = np.zeros((6, 40), np.float32)
    array[1, 3] = -0.0
    array[4, 39] = 2.5
    array[5, 0] = np.float32(-1e-30)
    for encoded in (encode_bitmap("t", array), encode_csr("t", array)):
        assert np.array_equal(bits(decode_tensor(encoded)), bits(array)), encoded.format


def test_negative_zeros_left_by_batchnorm_folding_are_cleared_without_changing_outputs():
    weight = np.array([[0.0, -0.0, 1.5], [-0.0, -2.0, 0.0]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    original = model.SerializeToString()
    cleared = without_negative_zeros(original)
    cleared_weight = initializer_arrays(cleared)["w"]
    assert not np.signbit(cleared_weight[cleared_weight == 0]).any()
    assert np.array_equal(cleared_weight, weight)
    x = {"x": np.array([[3.0, -1.0]], np.float32)}
    run = lambda b: ort.InferenceSession(b, providers=["CPUExecutionProvider"]).run(None, x)[0]  # noqa: E731
    assert np.array_equal(run(original), run(cleared))
    assert without_negative_zeros(cleared) is cleared


def test_an_unlabelled_encoder_is_sparsified_and_its_storage_decodes_exactly():
    spec = encoder_spec()
    data = spec.load_data()
    assert data.train.labels is None
    torch.manual_seed(0)
    reference = spec.build_model()
    inputs = TechniqueInput(spec=spec, data=data, reference_model=reference)
    result = apply_technique(SparseConfig(sparsity=0.8, finetune_epochs=1), inputs)
    weights = weight_initializers(onnx.load_from_string(result.onnx))
    assert any(name.startswith("Attention") for name in weights)
    for name, array in weights.items():
        # Fused attention concatenates three separately pruned tensors: half a weight each.
        assert abs(int((array == 0).sum()) - 0.8 * array.size) <= 1.5, name
    assert result.storage_bytes < len(result.onnx)
    assert decode_artifact(encode_artifact(result.onnx)) == result.onnx
