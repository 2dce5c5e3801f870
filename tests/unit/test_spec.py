import dataclasses
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest

from gearbox.compression import (
    CORE_RECIPES,
    DataSplits,
    InvalidArgumentError,
    ModelRepository,
    ModelSpec,
    Signature,
    Split,
    TensorSpec,
    TrainingConfig,
    compress,
    load_spec,
)
from gearbox.compression.examples import digits
from gearbox.compression.registration import verify_declared_signature
from gearbox.compression.spec import import_object
from tests.fixtures.declared_signatures import IMAGES, LOGITS, SCALE, declared
from tests.fixtures.declared_signatures import MODULE as FIXTURES
from tests.unit import tiny_model
from tests.unit.tiny_model import CONV_SIGNATURE, MODULE, conv_spec, mlp_spec


def test_helper_module_has_the_import_path_specs_use():
    assert MODULE == "tests.unit.tiny_model"
    assert import_object(f"{MODULE}:TinyConvNet", "model factory") is tiny_model.TinyConvNet


def test_import_object_resolves_dotted_attributes():
    forward = import_object(f"{MODULE}:TinyConvNet.forward", "model factory")
    assert forward is tiny_model.TinyConvNet.forward


@pytest.mark.parametrize("path", ["tests.unit.tiny_model", ":TinyConvNet", "tests.unit:"])
def test_import_object_requires_module_colon_attribute(path):
    with pytest.raises(InvalidArgumentError) as caught:
        import_object(path, "model factory")
    assert caught.value.message == (
        f"model factory '{path}' is not an import path of the form package.module:attribute"
    )


def test_import_object_reports_missing_module():
    with pytest.raises(InvalidArgumentError) as caught:
        import_object("no_such_module_xyz:factory", "data provider")
    message = caught.value.message
    assert message.startswith("cannot import data provider 'no_such_module_xyz:factory': ")
    assert "No module named 'no_such_module_xyz'" in message


def test_import_object_reports_missing_attribute():
    with pytest.raises(InvalidArgumentError) as caught:
        import_object(f"{MODULE}:NoSuchNet", "model factory")
    assert caught.value.message == (
        f"cannot import model factory '{MODULE}:NoSuchNet': "
        f"module '{MODULE}' has no attribute 'NoSuchNet'"
    )


def test_load_spec_calls_a_function_and_records_its_source():
    spec = load_spec(f"{MODULE}:conv_spec")
    assert isinstance(spec, ModelSpec)
    assert spec.name == "tiny-conv"
    assert spec.source == f"{MODULE}:conv_spec"


def test_load_spec_accepts_a_spec_object():
    spec = load_spec(f"{MODULE}:CONV_SPEC")
    assert spec == conv_spec()


def test_load_spec_rejects_something_that_is_not_a_model_spec():
    with pytest.raises(InvalidArgumentError) as caught:
        load_spec(f"{MODULE}:not_a_spec")
    assert caught.value.message == (
        f"model spec '{MODULE}:not_a_spec' gave str, not a gearbox ModelSpec"
    )


def test_load_spec_reports_a_failing_spec_function():
    with pytest.raises(InvalidArgumentError) as caught:
        load_spec(f"{MODULE}:spec_that_fails")
    assert caught.value.message == (
        f"model spec '{MODULE}:spec_that_fails' failed: spec factory exploded"
    )


def test_load_spec_reports_a_missing_module():
    with pytest.raises(InvalidArgumentError, match="cannot import model spec 'nowhere:spec'"):
        load_spec("nowhere:spec")


def _spec(name="tiny", task="classification"):
    return ModelSpec(
        name=name,
        model_factory=f"{MODULE}:TinyConvNet",
        signature=CONV_SIGNATURE,
        data_provider=f"{MODULE}:tiny_splits",
        task=task,
    )


@pytest.mark.parametrize("name", ["tiny", "tiny-conv_2.0", "A1"])
def test_model_spec_accepts_valid_names(name):
    assert _spec(name).name == name


@pytest.mark.parametrize("name", ["", "has space", "a/b", "../up", "ünïcode?", "x:y"])
def test_model_spec_rejects_invalid_names(name):
    with pytest.raises(InvalidArgumentError, match="must be non-empty letters, digits"):
        _spec(name)


def test_model_spec_rejects_hidden_names():
    with pytest.raises(InvalidArgumentError, match=re.escape("must not start with '.'")):
        _spec(".hidden")


def test_model_spec_rejects_unknown_task():
    with pytest.raises(InvalidArgumentError, match="unknown task 'regression'"):
        _spec(task="regression")


@pytest.mark.parametrize(
    "kwargs", [{"epochs": 0}, {"batch_size": 0}, {"learning_rate": 0.0}, {"learning_rate": -1}]
)
def test_training_config_rejects_nonsense(kwargs):
    with pytest.raises(InvalidArgumentError, match="training needs epochs >= 1"):
        TrainingConfig(**kwargs)


def test_build_model_and_student_use_the_factories():
    spec = conv_spec()
    assert isinstance(spec.build_model(), tiny_model.TinyConvNet)
    assert isinstance(spec.build_student(), tiny_model.TinyConvStudent)
    assert _spec().build_student() is None


def test_split_take_and_len():
    split = Split({"x": np.arange(10)}, np.arange(10))
    assert len(split) == 10
    assert split.take(3, offset=8)["x"].tolist() == [8, 9]


def test_load_data_returns_valid_splits():
    data = conv_spec().load_data()
    assert isinstance(data, DataSplits)
    assert len(data.train) == tiny_model.TRAIN_ROWS
    assert data.calibration.labels is None  # calibration needs no labels


def _load(provider):
    return conv_spec(data_provider=provider).load_data()


def test_load_data_requires_training_labels_for_classification():
    with pytest.raises(InvalidArgumentError) as caught:
        _load("splits_without_train_labels")
    assert caught.value.message == "model 'tiny-conv', train split needs one label per row"


def test_load_data_requires_one_label_per_row():
    with pytest.raises(InvalidArgumentError) as caught:
        _load("splits_with_short_heldout_labels")
    assert caught.value.message == "model 'tiny-conv', heldout split needs one label per row"


def test_load_data_rejects_inputs_of_the_wrong_shape():
    with pytest.raises(InvalidArgumentError) as caught:
        _load("splits_with_wrong_shape")
    assert caught.value.message == (
        "model 'tiny-conv', calibration split: input 'images' has shape [64, 1, 4, 4], "
        "the model expects [-1, 1, 8, 8] (-1: any size)"
    )


def test_load_data_rejects_inputs_of_the_wrong_dtype():
    with pytest.raises(InvalidArgumentError, match="train split: input 'images' has datatype FP64"):
        _load("splits_with_wrong_dtype")


def test_load_data_rejects_an_empty_split():
    with pytest.raises(InvalidArgumentError) as caught:
        _load("splits_with_empty_heldout")
    assert caught.value.message == (
        "model 'tiny-conv', heldout split: the batch is empty (first dimension 0)"
    )


def test_load_data_rejects_a_provider_returning_something_else():
    with pytest.raises(InvalidArgumentError) as caught:
        _load("provider_returning_dict")
    assert caught.value.message == (
        f"data provider '{MODULE}:provider_returning_dict' returned dict, not DataSplits"
    )


def test_load_data_reports_a_failing_provider():
    with pytest.raises(InvalidArgumentError) as caught:
        _load("provider_that_fails")
    assert caught.value.message == (
        f"data provider '{MODULE}:provider_that_fails' failed: the data disk is on fire"
    )


def test_load_data_reports_a_provider_that_cannot_be_imported():
    with pytest.raises(InvalidArgumentError, match="cannot import data provider"):
        _load("no_such_provider")


# --- the declared signature against what the model really takes and returns -----------------


def _verify(spec):
    verify_declared_signature(spec, spec.load_data())


def _refused(spec) -> str:
    """The one-line message compress() stops with, having written nothing to the repository."""
    with tempfile.TemporaryDirectory() as root:
        repository = ModelRepository(Path(root) / "repo")
        with pytest.raises(InvalidArgumentError) as caught:
            compress(spec, repository, CORE_RECIPES)
        assert list(repository.root.iterdir()) == []
    assert "\n" not in caught.value.message
    return caught.value.message


def test_the_examples_declare_what_their_models_take_and_return():
    _verify(digits.spec())
    _verify(conv_spec())
    _verify(mlp_spec())


def test_a_declared_output_too_many_is_refused():
    spec = declared("TinyConvNet", outputs=(LOGITS, TensorSpec("features", "FP32", (-1, 64))))
    assert _refused(spec) == (
        "model 'declared': the signature declares 2 output(s) (logits, features) but the model "
        "returns 1 (train split, 2 rows)"
    )


def test_an_undeclared_extra_output_is_refused():
    assert _refused(declared("LogitsAndFeatures")) == (
        "model 'declared': the signature declares 1 output(s) (logits) but the model returns 2 "
        "(train split, 2 rows)"
    )


def test_an_output_the_model_names_otherwise_is_refused():
    assert _refused(declared("NamedScores")) == (
        "model 'declared': declared output #1 'logits' is named 'scores' by the model "
        "(train split, 2 rows)"
    )


@pytest.mark.parametrize(
    ("shape", "returned"), [((-1, 2), "[2, 10]"), ((-1, 10, 1), "[2, 10]"), ((4, 10), "[2, 10]")]
)
def test_an_output_shape_the_model_does_not_return_is_refused(shape, returned):
    spec = declared("TinyConvNet", outputs=(TensorSpec("logits", "FP32", shape),))
    assert _refused(spec) == (
        f"model 'declared': declared output 'logits' has shape {list(shape)} but the model "
        f"returns {returned} (train split, 2 rows; -1: any size)"
    )


def test_dimensions_declared_dynamic_are_not_compared():
    _verify(declared("TinyConvNet", outputs=(TensorSpec("logits", "FP32", (-1, -1)),)))


def test_an_output_datatype_the_model_does_not_return_is_refused():
    assert _refused(declared("DoubleLogits")) == (
        "model 'declared': declared output 'logits' has datatype FP32 but the model returns FP64 "
        "(train split, 2 rows)"
    )


def test_an_input_name_the_data_lacks_is_refused():
    spec = declared("TinyConvNet", inputs=(TensorSpec("pixels", "FP32", (-1, 1, 8, 8)),))
    assert _refused(spec) == (
        "model 'declared', train split: missing input(s) pixels (given: images)"
    )


def test_inputs_declared_out_of_forwards_order_are_refused():
    spec = declared(
        "ScaledLogits", inputs=(SCALE, IMAGES), data_provider=f"{FIXTURES}:scaled_splits"
    )
    assert _refused(spec) == (
        "model 'declared': declared input 'scale' is input #1, but ScaledLogits.forward takes "
        "'scale' as argument #2 (images, scale): declare the inputs in forward's order"
    )
    _verify(dataclasses.replace(spec, signature=Signature((IMAGES, SCALE), (LOGITS,))))


def test_more_inputs_than_forward_takes_are_refused():
    spec = declared(
        "TinyConvNet", inputs=(IMAGES, SCALE), data_provider=f"{FIXTURES}:scaled_splits"
    )
    assert _refused(spec) == (
        "model 'declared': the signature declares 2 input(s) (images, scale) but "
        "TinyConvNet.forward takes (images)"
    )


def test_an_input_shape_the_model_cannot_take_is_refused():
    spec = declared(
        "tests.unit.tiny_model:TinyConvNet",
        inputs=(TensorSpec("pixels", "FP32", (-1, 64)),),
        data_provider="tests.unit.tiny_model:tiny_flat_splits",
    )
    message = _refused(spec)
    assert message.startswith(
        "model 'declared': the model fails on the declared inputs (pixels FP32 [2, 64]; "
        "train split): RuntimeError: "
    )


def test_an_input_datatype_the_model_cannot_take_is_refused():
    spec = declared(
        "TinyConvNet",
        inputs=(TensorSpec("images", "FP64", (-1, 1, 8, 8)),),
        data_provider=f"{FIXTURES}:float64_splits",
    )
    assert _refused(spec).startswith(
        "model 'declared': the model fails on the declared inputs (images FP64 [2, 1, 8, 8]; "
        "train split): RuntimeError: "
    )


def test_a_factory_that_makes_no_torch_module_is_refused():
    spec = declared("tests.unit.tiny_model:not_a_spec")
    assert _refused(spec) == (
        "model factory 'tests.unit.tiny_model:not_a_spec' returned str, not a torch.nn.Module"
    )
