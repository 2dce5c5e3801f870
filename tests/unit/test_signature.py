import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from gearbox.compression import CompressionError, InvalidArgumentError, Signature, TensorSpec
from gearbox.compression.errors import ErrorCode
from gearbox.compression.onnx_export import check_graph_signature, export_verified
from tests.unit.tiny_model import TinyConvNet, conv_spec, linear_onnx, tiny_splits

IMAGES = TensorSpec("images", "FP32", (-1, 1, 8, 8))
LOGITS = TensorSpec("logits", "FP32", (-1, 10))
SIGNATURE = Signature(inputs=(IMAGES,), outputs=(LOGITS,))


def test_tensor_spec_rejects_unknown_datatype_naming_it_and_the_tensor():
    with pytest.raises(InvalidArgumentError) as caught:
        TensorSpec("images", "FLOAT32", (-1, 8))
    message = caught.value.message
    assert "images" in message
    assert "unknown datatype 'FLOAT32'" in message
    assert "FP32" in message  # the known datatypes are listed
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize("shape", [(0, 8), (-2, 8), (4, -5)])
def test_tensor_spec_rejects_zero_or_negative_sizes(shape):
    with pytest.raises(InvalidArgumentError, match="may hold only positive sizes or -1"):
        TensorSpec("x", "FP32", shape)


def test_tensor_spec_rejects_empty_name():
    with pytest.raises(InvalidArgumentError, match="must not be empty"):
        TensorSpec("", "FP32", (1,))


def test_tensor_spec_normalises_shape_to_a_tuple_of_ints():
    spec = TensorSpec("x", "INT64", [np.int64(-1), 3])
    assert spec.shape == (-1, 3)
    assert all(type(d) is int for d in spec.shape)
    assert spec.numpy_dtype == np.dtype(np.int64)


def test_tensor_spec_accepts_dynamic_dimensions_only():
    assert IMAGES.accepts((1, 1, 8, 8))
    assert IMAGES.accepts((37, 1, 8, 8))
    assert not IMAGES.accepts((37, 1, 8, 4))
    assert not IMAGES.accepts((37, 64))


def test_signature_rejects_duplicate_names_across_inputs_and_outputs():
    with pytest.raises(InvalidArgumentError, match="repeats tensor names: images"):
        Signature(inputs=(IMAGES,), outputs=(TensorSpec("images", "FP32", (-1, 10)),))


def test_signature_rejects_duplicate_input_names():
    with pytest.raises(InvalidArgumentError, match="repeats tensor names: images"):
        Signature(inputs=(IMAGES, IMAGES), outputs=(LOGITS,))


def test_signature_needs_inputs_and_outputs():
    with pytest.raises(InvalidArgumentError, match="at least one input and one output"):
        Signature(inputs=(), outputs=(LOGITS,))
    with pytest.raises(InvalidArgumentError, match="at least one input and one output"):
        Signature(inputs=(IMAGES,), outputs=())


def test_check_inputs_accepts_a_matching_batch_and_counts_its_rows():
    assert SIGNATURE.check_inputs({"images": np.zeros((5, 1, 8, 8), np.float32)}, "request") == 5


def test_check_inputs_reports_an_empty_batch():
    with pytest.raises(InvalidArgumentError, match="the batch is empty"):
        SIGNATURE.check_inputs({"images": np.zeros((0, 1, 8, 8), np.float32)}, "request")


def test_check_inputs_reports_missing_input():
    with pytest.raises(InvalidArgumentError) as caught:
        SIGNATURE.check_inputs({}, "request 7")
    assert caught.value.message == "request 7: missing input(s) images"


def test_check_inputs_reports_extra_input():
    inputs = {"images": np.zeros((1, 1, 8, 8), np.float32), "mask": np.zeros(1, np.float32)}
    with pytest.raises(InvalidArgumentError) as caught:
        SIGNATURE.check_inputs(inputs, "request")
    assert caught.value.message == "request: unexpected input(s) mask (inputs: images)"


def test_check_inputs_reports_wrong_dtype():
    with pytest.raises(InvalidArgumentError) as caught:
        SIGNATURE.check_inputs({"images": np.zeros((2, 1, 8, 8), np.float64)}, "request")
    assert caught.value.message == (
        "request: input 'images' has datatype FP64, the model expects FP32"
    )


@pytest.mark.parametrize("shape", [(2, 1, 4, 4), (2, 64), (2, 1, 8, 8, 1)])
def test_check_inputs_reports_wrong_shape(shape):
    with pytest.raises(InvalidArgumentError) as caught:
        SIGNATURE.check_inputs({"images": np.zeros(shape, np.float32)}, "request")
    assert caught.value.message == (
        f"request: input 'images' has shape {list(shape)}, "
        "the model expects [-1, 1, 8, 8] (-1: any size)"
    )


def test_signature_json_round_trip():
    signature = Signature(
        inputs=(IMAGES, TensorSpec("mask", "BOOL", (-1, 8))),
        outputs=(LOGITS, TensorSpec("ids", "INT64", (-1,))),
    )
    data = signature.to_json()
    assert data == {
        "inputs": [
            {"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]},
            {"name": "mask", "datatype": "BOOL", "shape": [-1, 8]},
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "ids", "datatype": "INT64", "shape": [-1]},
        ],
    }
    restored = Signature.from_json(json.loads(json.dumps(data)))
    assert restored == signature
    assert restored.input_names == ["images", "mask"]
    assert restored.output_names == ["logits", "ids"]


def test_signature_from_json_validates_its_tensors():
    data = SIGNATURE.to_json()
    data["inputs"][0]["datatype"] = "FLOAT"
    with pytest.raises(InvalidArgumentError, match="unknown datatype 'FLOAT'"):
        Signature.from_json(data)


# --- an exported graph against the declared signature ---------------------------------------


def _graph(mutate) -> bytes:
    """tiny_model's hand-built ``images -> logits`` graph, changed by ``mutate(model)``."""
    model = onnx.load_from_string(linear_onnx())
    mutate(model)
    return model.SerializeToString()


def _output(model: onnx.ModelProto) -> onnx.TypeProto.Tensor:
    return model.graph.output[0].type.tensor_type


def _rename_output(model: onnx.ModelProto) -> None:
    model.graph.node[-1].output[0] = "scores"
    model.graph.output[0].name = "scores"


def _add_output(model: onnx.ModelProto) -> None:
    model.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["n"]))


def _rename_input(model: onnx.ModelProto) -> None:
    model.graph.node[0].input[0] = "pixels"
    model.graph.input[0].name = "pixels"


def _three_classes(model: onnx.ModelProto) -> None:
    _output(model).shape.dim[1].dim_value = 3


def _extra_output_dim(model: onnx.ModelProto) -> None:
    _output(model).shape.dim.add().dim_param = "extra"


def _fixed_input_batch(model: onnx.ModelProto) -> None:
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2


def _fixed_output_batch(model: onnx.ModelProto) -> None:
    _output(model).shape.dim[0].dim_value = 2


def _double_output(model: onnx.ModelProto) -> None:
    _output(model).elem_type = TensorProto.DOUBLE


def test_graph_check_accepts_the_declared_graph_and_an_exported_one():
    check_graph_signature(linear_onnx(), conv_spec(), "fp32")
    torch.manual_seed(0)
    exported = export_verified(TinyConvNet(), conv_spec(), tiny_splits().heldout)
    check_graph_signature(exported, conv_spec(), "fp32")


GRAPH_MISMATCHES = [
    (_rename_output, "the ONNX graph's outputs are (scores), declared (logits)"),
    (_add_output, "the ONNX graph's outputs are (logits, extra), declared (logits)"),
    (_rename_input, "the ONNX graph's inputs are (pixels), declared (images)"),
    (
        _three_classes,
        "ONNX graph output 'logits' has shape [-1, 3], declared [-1, 10] (-1: any size)",
    ),
    (
        _extra_output_dim,
        "ONNX graph output 'logits' has shape [-1, 10, -1], declared [-1, 10] (-1: any size)",
    ),
    (
        _fixed_input_batch,
        "ONNX graph input 'images' has shape [2, 1, 8, 8], declared [-1, 1, 8, 8] (-1: any size)",
    ),
    (_double_output, "ONNX graph output 'logits' has datatype FP64, declared FP32"),
]


@pytest.mark.parametrize(("mutate", "named"), GRAPH_MISMATCHES)
def test_graph_check_names_the_tensor_that_differs(mutate, named):
    with pytest.raises(CompressionError) as caught:
        check_graph_signature(_graph(mutate), conv_spec(), "int8")
    assert caught.value.message == f"model 'tiny-conv', variant 'int8': {named}"


def test_graph_check_accepts_a_fixed_output_size_declared_dynamic():
    # The declaration is looser than the graph, not wrong: every answer fits it.
    check_graph_signature(_graph(_fixed_output_batch), conv_spec(), "fp32")


def test_check_inputs_names_what_was_given_in_place_of_a_missing_input():
    with pytest.raises(InvalidArgumentError) as caught:
        SIGNATURE.check_inputs({"pixels": np.zeros((1, 64), np.float32)}, "request")
    assert caught.value.message == "request: missing input(s) images (given: pixels)"
