import numpy as np
import onnxruntime as ort
import pytest
import torch

from gearbox.compression import CompressionError
from gearbox.compression.onnx_export import export_verified, run_onnx, verify_against_torch
from gearbox.compression.training import predict
from tests.unit.tiny_model import TinyConvNet, conv_spec, tiny_splits, unexportable_spec


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    model = TinyConvNet().eval()
    spec = conv_spec()
    data = tiny_splits()
    return model, spec, data, export_verified(model, spec, data.heldout)


def test_exported_artifact_reproduces_torch(exported):
    model, _, data, artifact = exported
    session = ort.InferenceSession(artifact, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    images = data.train.inputs["images"][:5]
    [actual] = session.run(None, {"images": images})
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4)


def test_exported_artifact_keeps_the_batch_dimension_dynamic(exported):
    _, spec, data, artifact = exported
    session = ort.InferenceSession(artifact, providers=["CPUExecutionProvider"])
    for rows in (1, 2, 7):
        [logits] = session.run(None, data.heldout.take(rows))
        assert logits.shape == (rows, 10)
    outputs = run_onnx(artifact, spec, data.heldout, batch_size=10)
    assert outputs.shape == (len(data.heldout), 10)


def test_verification_catches_an_artifact_of_another_model(exported):
    model, spec, data, artifact = exported
    torch.manual_seed(1)
    other = TinyConvNet().eval()
    assert not np.allclose(predict(other, spec, data.heldout), predict(model, spec, data.heldout))
    with pytest.raises(CompressionError, match="ONNX Runtime output differs from torch"):
        verify_against_torch(artifact, other, spec, data.heldout)


def test_a_model_that_cannot_be_exported_raises_compression_error():
    spec = unexportable_spec()
    with pytest.raises(CompressionError) as caught:
        export_verified(spec.build_model(), spec, tiny_splits().heldout)
    message = caught.value.message
    assert message.startswith("model 'unexportable': ONNX export failed")
    assert "\n" not in message
