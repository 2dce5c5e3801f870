"""The v2 gRPC protocol: committed stubs are fresh and wire-compatible with tritonclient."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest
from tritonclient.grpc import service_pb2 as triton_pb2

from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.grpc.generated import grpc_service_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def generate_module():
    # protos/ is a directory of sources, not a package: load the script by path.
    path = REPO_ROOT / "protos" / "generate.py"
    spec = importlib.util.spec_from_file_location("gearbox_protos_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- freshness -----------------------------------------------------------------------------


def test_committed_stubs_are_fresh(generate_module):
    stale = generate_module.stale_files()
    assert not stale, (
        f"generated stubs are stale: {', '.join(stale)}; run `make generate` and commit them"
    )


def test_check_names_stale_and_leftover_files(generate_module, tmp_path, capsys):
    out = tmp_path / "generated"
    generate_module.generate(out)
    assert generate_module.main(["--out", str(out), "--check"]) == 0

    (out / "grpc_service_pb2.pyi").write_text("# edited by hand\n", encoding="utf-8")
    (out / "old_pb2.py").write_text("", encoding="utf-8")  # from a deleted .proto
    (out / "__init__.py").write_text("", encoding="utf-8")  # not generated: ignored
    assert generate_module.main(["--out", str(out), "--check"]) == 1
    err = capsys.readouterr().err
    assert "grpc_service_pb2.pyi" in err
    assert "old_pb2.py" in err
    assert "__init__.py" not in err
    assert "make generate" in err

    generate_module.generate(out)  # regenerating repairs both
    assert generate_module.stale_files(out) == []
    assert (out / "__init__.py").exists()


def test_grpc_stub_imports_its_messages_package_relative(generate_module, tmp_path):
    out = tmp_path / "generated"
    generate_module.generate(out)
    text = (out / "grpc_service_pb2_grpc.py").read_text(encoding="utf-8")
    assert "from . import grpc_service_pb2 as " in text
    assert "\nimport grpc_service_pb2" not in text


# --- service -------------------------------------------------------------------------------

METHODS = {
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStatistics",
    "ModelConfig",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
}


def test_service_descriptor():
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} == METHODS
    infer = service.methods_by_name["ModelInfer"]
    assert infer.input_type.full_name == "inference.ModelInferRequest"
    assert infer.output_type.full_name == "inference.ModelInferResponse"


def test_service_methods_are_triton_methods():
    # The gRPC method path (/inference.GRPCInferenceService/ModelInfer) is what goes on the wire.
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name
    assert hasattr(pb_grpc, "add_GRPCInferenceServiceServicer_to_server")
    assert hasattr(pb_grpc, "GRPCInferenceServiceStub")


def test_importable_beside_tritonclient():
    # Both register "grpc_service.proto" / inference.*; ours lives in a private pool.
    assert pb.ModelInferRequest is not triton_pb2.ModelInferRequest
    assert pb.DESCRIPTOR.pool is not triton_pb2.DESCRIPTOR.pool


# --- wire compatibility --------------------------------------------------------------------


def _triton_request():
    request = triton_pb2.ModelInferRequest(model_name="digits", model_version="3", id="req-7")
    request.parameters["latency_budget_ms"].int64_param = 25
    request.parameters["min_quality"].double_param = 0.95
    request.parameters["device_class"].string_param = "cpu"
    request.parameters["strict"].bool_param = True
    request.parameters["seed"].uint64_param = 2**63 + 5

    typed = request.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    typed.contents.fp32_contents.extend([1.5, -2.0, 0.25, 8.0])
    typed.parameters["binary_data_size"].int64_param = 16
    ids = request.inputs.add(name="ids", datatype="INT64", shape=[3])
    ids.contents.int64_contents.extend([-1, 0, 2**40])
    text = request.inputs.add(name="text", datatype="BYTES", shape=[2])
    text.contents.bytes_contents.extend([b"hello", b"\x00\xff"])
    flags = request.inputs.add(name="flags", datatype="BOOL", shape=[2])
    flags.contents.bool_contents.extend([True, False])
    small = request.inputs.add(name="small", datatype="INT8", shape=[2])
    small.contents.int_contents.extend([-128, 127])
    unsigned = request.inputs.add(name="u", datatype="UINT64", shape=[1])
    unsigned.contents.uint64_contents.append(2**64 - 1)
    unsigned32 = request.inputs.add(name="u32", datatype="UINT32", shape=[1])
    unsigned32.contents.uint_contents.append(2**32 - 1)
    wide = request.inputs.add(name="wide", datatype="FP64", shape=[1])
    wide.contents.fp64_contents.append(1e-300)

    out = request.outputs.add(name="logits")
    out.parameters["classification"].int64_param = 3
    request.outputs.add(name="probs")
    return request


def test_triton_request_parses_as_ours():
    request = _triton_request()
    ours = pb.ModelInferRequest.FromString(request.SerializeToString())

    assert (ours.model_name, ours.model_version, ours.id) == ("digits", "3", "req-7")
    params = ours.parameters
    assert params["latency_budget_ms"].WhichOneof("parameter_choice") == "int64_param"
    assert params["latency_budget_ms"].int64_param == 25
    assert params["min_quality"].double_param == 0.95
    assert params["device_class"].string_param == "cpu"
    assert params["strict"].WhichOneof("parameter_choice") == "bool_param"
    assert params["strict"].bool_param is True
    assert params["seed"].uint64_param == 2**63 + 5

    by_name = {t.name: t for t in ours.inputs}
    assert [t.name for t in ours.inputs] == [
        "x",
        "ids",
        "text",
        "flags",
        "small",
        "u",
        "u32",
        "wide",
    ]
    assert by_name["x"].datatype == "FP32"
    assert list(by_name["x"].shape) == [2, 2]
    assert list(by_name["x"].contents.fp32_contents) == [1.5, -2.0, 0.25, 8.0]
    assert by_name["x"].parameters["binary_data_size"].int64_param == 16
    assert list(by_name["ids"].contents.int64_contents) == [-1, 0, 2**40]
    assert list(by_name["text"].contents.bytes_contents) == [b"hello", b"\x00\xff"]
    assert list(by_name["flags"].contents.bool_contents) == [True, False]
    assert list(by_name["small"].contents.int_contents) == [-128, 127]
    assert list(by_name["u"].contents.uint64_contents) == [2**64 - 1]
    assert list(by_name["u32"].contents.uint_contents) == [2**32 - 1]
    assert list(by_name["wide"].contents.fp64_contents) == [1e-300]

    assert [o.name for o in ours.outputs] == ["logits", "probs"]
    assert ours.outputs[0].parameters["classification"].int64_param == 3

    # Nothing was dropped as an unknown field: re-serializing gives triton the same message.
    assert triton_pb2.ModelInferRequest.FromString(ours.SerializeToString()) == request


def test_triton_raw_request_parses_as_ours():
    # What tritonclient.grpc actually sends: raw_input_contents, no typed contents.
    request = triton_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    request.inputs.add(name="s", datatype="BYTES", shape=[1])
    raw_x = struct.pack("<3f", 1.0, 2.0, 3.0)
    raw_s = struct.pack("<I", 3) + b"abc"
    request.raw_input_contents.extend([raw_x, raw_s])

    ours = pb.ModelInferRequest.FromString(request.SerializeToString())
    assert list(ours.raw_input_contents) == [raw_x, raw_s]
    assert not ours.inputs[0].HasField("contents")
    assert struct.unpack("<3f", ours.raw_input_contents[0]) == (1.0, 2.0, 3.0)


def test_our_response_parses_as_triton():
    response = pb.ModelInferResponse(model_name="digits", model_version="3", id="req-7")
    response.parameters["variant"].string_param = "digits-int8"
    response.parameters["device_class"].string_param = "cpu"
    response.parameters["predicted_latency_ms"].double_param = 1.75
    response.parameters["budget_met"].bool_param = False
    response.parameters["batch"].int64_param = -4
    logits = response.outputs.add(name="logits", datatype="FP32", shape=[1, 2])
    logits.parameters["binary_data_size"].int64_param = 8
    label = response.outputs.add(name="label", datatype="INT64", shape=[1])
    label.contents.int64_contents.append(7)
    raw = struct.pack("<2f", 0.5, -0.5)
    response.raw_output_contents.append(raw)

    theirs = triton_pb2.ModelInferResponse.FromString(response.SerializeToString())
    assert (theirs.model_name, theirs.model_version, theirs.id) == ("digits", "3", "req-7")
    assert theirs.parameters["variant"].string_param == "digits-int8"
    assert theirs.parameters["device_class"].string_param == "cpu"
    assert theirs.parameters["predicted_latency_ms"].double_param == 1.75
    assert theirs.parameters["budget_met"].WhichOneof("parameter_choice") == "bool_param"
    assert theirs.parameters["budget_met"].bool_param is False
    assert theirs.parameters["batch"].int64_param == -4
    assert [(o.name, o.datatype, list(o.shape)) for o in theirs.outputs] == [
        ("logits", "FP32", [1, 2]),
        ("label", "INT64", [1]),
    ]
    assert theirs.outputs[0].parameters["binary_data_size"].int64_param == 8
    assert list(theirs.outputs[1].contents.int64_contents) == [7]
    assert list(theirs.raw_output_contents) == [raw]
    assert pb.ModelInferResponse.FromString(theirs.SerializeToString()) == response


def test_our_model_metadata_parses_as_triton():
    metadata = pb.ModelMetadataResponse(name="digits", versions=["1", "3"], platform="onnx")
    metadata.inputs.add(name="x", datatype="FP32", shape=[-1, 64])
    metadata.outputs.add(name="logits", datatype="FP32", shape=[-1, 10])
    metadata.outputs.add(name="label", datatype="INT64", shape=[-1])

    theirs = triton_pb2.ModelMetadataResponse.FromString(metadata.SerializeToString())
    assert theirs.name == "digits"
    assert list(theirs.versions) == ["1", "3"]
    assert theirs.platform == "onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in theirs.inputs] == [("x", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in theirs.outputs] == [
        ("logits", "FP32", [-1, 10]),
        ("label", "INT64", [-1]),
    ]
    assert pb.ModelMetadataResponse.FromString(theirs.SerializeToString()) == metadata


@pytest.mark.parametrize(
    ("ours", "theirs", "fields"),
    [
        (pb.ServerLiveResponse, triton_pb2.ServerLiveResponse, {"live": True}),
        (pb.ServerReadyResponse, triton_pb2.ServerReadyResponse, {"ready": True}),
        (pb.ModelReadyRequest, triton_pb2.ModelReadyRequest, {"name": "m", "version": "2"}),
        (pb.ModelReadyResponse, triton_pb2.ModelReadyResponse, {"ready": True}),
        (pb.ModelMetadataRequest, triton_pb2.ModelMetadataRequest, {"name": "m", "version": "2"}),
        (
            pb.ServerMetadataResponse,
            triton_pb2.ServerMetadataResponse,
            {"name": "gearbox", "version": "0.1.0", "extensions": ["parameters"]},
        ),
    ],
)
def test_small_messages_round_trip(ours, theirs, fields):
    mine = ours(**fields)
    parsed = theirs.FromString(mine.SerializeToString())
    for name, value in fields.items():
        got = getattr(parsed, name)
        assert (list(got) if isinstance(value, list) else got) == value
    assert ours.FromString(theirs(**fields).SerializeToString()) == mine
