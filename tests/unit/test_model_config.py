"""Triton's model configuration and repository index: a real data plane, both adapters, and
tritonclient's own parsing of what they answer."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
import tritonclient.grpc.aio as triton_grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import model_config_pb2 as triton_config_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.utils import InferenceServerException

from gearbox.compression import ModelRecord, ModelRepository
from gearbox.compression.techniques import Fp32Config, TechniqueInput, apply_technique
from gearbox.serving.clock import add_inference_service
from gearbox.serving.grpc.adapter import GrpcServicer
from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.rest.adapter import HttpAdapter
from tests.unit.serving_fixtures import (
    BROKEN_MODEL,
    INPUT,
    MODEL,
    OUTPUT,
    READY,
    REJECTED,
    GrpcContext,
    Served,
    run,
    started,
    triton_http_client,
)
from tests.unit.tiny_encoder import (
    TEXT_MAX_TOKENS,
    text_encoder_spec,
    tiny_encoder,
    tiny_tokenizer_json,
)
from tests.unit.tiny_model import make_manifest

INDEX = [
    {"name": BROKEN_MODEL, "version": "fp32", "state": "UNAVAILABLE"},
    *(
        {"name": MODEL, "version": v, "state": "UNAVAILABLE" if v == REJECTED else "READY"}
        for v in sorted((*READY, REJECTED))
    ),
]
"""The tiny repository's index without reasons, in its order (by model, then variant)."""


def request(adapter: HttpAdapter, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    reply = run(adapter.handle(method, path, {}, body))
    assert reply.headers["content-type"] == "application/json"
    return reply.status, json.loads(reply.body)


def without_reasons(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "reason"} for row in rows]


# --- HTTP ---------------------------------------------------------------------------------


def test_http_config_is_tritons_json(served: Served):
    status, config = request(HttpAdapter(served.plane), "GET", f"/v2/models/{MODEL}/config")
    assert status == 200
    assert config == {
        "name": MODEL,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        # Any number of rows per request: the batch dimension stays in dims as -1.
        "max_batch_size": 0,
        "input": [
            {"name": INPUT, "data_type": "TYPE_FP32", "dims": [-1, 1, 8, 8], "optional": False}
        ],
        "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [-1, 10]}],
        "parameters": {
            "variants": {"string_value": ",".join(READY)},
            "reference_variant": {"string_value": "fp32"},
            "task": {"string_value": "classification"},
            "metric": {"string_value": "accuracy"},
        },
    }
    # tritonclient's own message takes the document (json_format is strict on names).
    parsed = json_format.ParseDict(config, triton_config_pb2.ModelConfig())
    assert parsed.input[0].data_type == triton_config_pb2.TYPE_FP32
    assert list(parsed.input[0].dims) == [-1, 1, 8, 8]


def test_http_config_of_a_variant_and_of_a_model_with_none_ready(served: Served):
    http = HttpAdapter(served.plane)
    _, whole = request(http, "GET", f"/v2/models/{MODEL}/config")
    status, variant = request(http, "GET", f"/v2/models/{MODEL}/versions/int8/config")
    assert (status, variant) == (200, whole)
    status, broken = request(http, "GET", f"/v2/models/{BROKEN_MODEL}/config")
    assert status == 200
    assert broken["parameters"]["variants"] == {"string_value": ""}


@pytest.mark.parametrize(
    ("path", "names"),
    [
        ("/v2/models/nope/config", "model 'nope' not found"),
        (f"/v2/models/{MODEL}/versions/int4/config", "variant 'int4'"),
        (f"/v2/models/{MODEL}/versions/{REJECTED}/config", "rejected"),
    ],
)
def test_http_config_of_the_unknown_is_404(served: Served, path: str, names: str):
    status, document = request(HttpAdapter(served.plane), "GET", path)
    assert status == 404
    assert names in document["error"]


def test_http_repository_index_lists_every_variant_with_its_state(served: Served):
    http = HttpAdapter(served.plane)
    status, index = request(http, "POST", "/v2/repository/index")
    assert status == 200
    assert without_reasons(index) == INDEX
    reasons = {(row["name"], row["version"]): row.get("reason") for row in index}
    assert reasons[(BROKEN_MODEL, "fp32")] == "rejected at compression: does not export"
    assert "agreement 0.41" in reasons[(MODEL, REJECTED)]
    assert reasons[(MODEL, "fp32")] is None  # as Triton: no reason where there is none

    assert request(http, "POST", "/v2/repository/index", b"{}")[1] == index
    status, ready = request(http, "POST", "/v2/repository/index", b'{"ready": true}')
    assert status == 200
    assert ready == [row for row in INDEX if row["state"] == "READY"]
    for row in index:
        json_format.ParseDict(row, triton_pb2.RepositoryIndexResponse.ModelIndex())


@pytest.mark.parametrize(
    ("method", "body", "status"),
    [("POST", b'{"ready": "yes"}', 400), ("POST", b"[true]", 400), ("GET", b"", 404)],
)
def test_http_repository_index_refuses_what_it_cannot_read(
    served: Served, method: str, body: bytes, status: int
):
    assert request(HttpAdapter(served.plane), method, "/v2/repository/index", body)[0] == status


def test_repository_index_says_loading_before_the_warm_up(tiny_repository: ModelRepository):
    async def scenario() -> list[Any]:
        async with started(tiny_repository, warm=False) as stack:
            return stack.plane.repository_index(), stack.plane.repository_index(ready=True)

    index, ready = asyncio.run(scenario())
    assert [(r.version, r.state) for r in index if r.name == MODEL] == [
        (v, "UNAVAILABLE" if v == REJECTED else "LOADING") for v in sorted((*READY, REJECTED))
    ]
    assert ready == []


def test_tritonclient_http_reads_config_and_index(served: Served):
    http = HttpAdapter(served.plane)
    client, stub = triton_http_client(http)
    config = client.get_model_config(MODEL)
    variant = client.get_model_config(MODEL, "small")
    index = client.get_model_repository_index()
    with pytest.raises(InferenceServerException, match="'nope'") as missing:
        client.get_model_config("nope")
    client.close()
    assert stub.requests == [
        ("GET", f"/v2/models/{MODEL}/config"),
        ("GET", f"/v2/models/{MODEL}/versions/small/config"),
        ("POST", "/v2/repository/index"),
        ("GET", "/v2/models/nope/config"),
    ]
    assert missing.value.status() == "404"
    assert config == variant
    assert config["input"][0]["dims"] == [-1, 1, 8, 8]
    assert without_reasons(index) == INDEX


# --- a text model ---------------------------------------------------------------------------

SPEC = text_encoder_spec()


@pytest.fixture(scope="module")
def text_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    tokenizer = tiny_tokenizer_json()
    repository = ModelRepository(tmp_path_factory.mktemp("text-config-repo"))
    repository.ensure_writable()
    repository.register_model(
        ModelRecord.for_spec(SPEC, reference_variant="fp32", tokenizer=tokenizer), tokenizer
    )
    built = apply_technique(
        Fp32Config(),
        TechniqueInput(spec=SPEC, data=SPEC.load_data(), reference_model=tiny_encoder()),
    )
    repository.publish_variant(make_manifest(built.onnx, model=SPEC.name), built.onnx)
    return repository


def test_a_text_model_reports_sentences_and_token_ids_as_alternatives(text_repository):
    async def scenario() -> Any:
        async with started(text_repository, shadow_fraction=0) as stack:
            path = f"/v2/models/{SPEC.name}/config"
            return await HttpAdapter(stack.plane).handle("GET", path, {}, b"")

    reply = asyncio.run(scenario())
    status, config = reply.status, json.loads(reply.body)
    assert status == 200
    assert [(t["name"], t["data_type"], t["dims"], t["optional"]) for t in config["input"]] == [
        ("text", "TYPE_STRING", [-1], True),
        ("input_ids", "TYPE_INT64", [-1, -1], True),
        ("attention_mask", "TYPE_INT64", [-1, -1], True),
    ]
    assert config["parameters"]["text_input"] == {"string_value": "text"}
    assert config["parameters"]["max_tokens"] == {"string_value": str(TEXT_MAX_TOKENS)}


# --- gRPC -----------------------------------------------------------------------------------


def grpc_config(served: Served, name: str, version: str = "") -> tuple[Any, GrpcContext]:
    context = GrpcContext()
    message = pb.ModelConfigRequest(name=name, version=version)
    return run(GrpcServicer(served.plane).ModelConfig(message, context)), context


def grpc_index(
    served: Served, ready: bool = False, repository: str = ""
) -> tuple[Any, GrpcContext]:
    context = GrpcContext()
    message = pb.RepositoryIndexRequest(repository_name=repository, ready=ready)
    return run(GrpcServicer(served.plane).RepositoryIndex(message, context)), context


def test_grpc_config_reads_in_tritonclient_as_http_says(served: Served):
    reply, context = grpc_config(served, MODEL)
    assert context.code is None
    theirs = triton_pb2.ModelConfigResponse.FromString(reply.SerializeToString()).config
    _, document = request(HttpAdapter(served.plane), "GET", f"/v2/models/{MODEL}/config")
    assert theirs == json_format.ParseDict(document, triton_config_pb2.ModelConfig())
    assert (theirs.name, theirs.platform, theirs.backend) == (
        MODEL,
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert theirs.input[0].data_type == triton_config_pb2.TYPE_FP32
    assert list(theirs.output[0].dims) == [-1, 10]
    assert theirs.parameters["variants"].string_value == ",".join(READY)


def test_grpc_config_of_the_unknown_is_not_found(served: Served):
    reply, context = grpc_config(served, "nope")
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in (context.details or "")
    assert reply == pb.ModelConfigResponse()
    _, context = grpc_config(served, MODEL, REJECTED)
    assert context.code == grpc.StatusCode.NOT_FOUND


def test_grpc_index_reads_in_tritonclient_as_http_says(served: Served):
    http = HttpAdapter(served.plane)
    for ready, body in ((False, b""), (True, b'{"ready": true}')):
        reply, context = grpc_index(served, ready)
        assert context.code is None
        theirs = triton_pb2.RepositoryIndexResponse.FromString(reply.SerializeToString())
        _, rows = request(http, "POST", "/v2/repository/index", body)
        assert theirs == json_format.ParseDict(
            {"models": rows}, triton_pb2.RepositoryIndexResponse()
        )
        assert len(theirs.models) == (len(READY) if ready else len(INDEX))
    _, context = grpc_index(served, repository="elsewhere")
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT


def _same_fields(ours: Descriptor, theirs: Descriptor) -> None:
    assert ours.full_name == theirs.full_name
    for field in ours.fields:
        other = theirs.fields_by_name[field.name]
        assert (field.number, field.type, field.label) == (other.number, other.type, other.label)
        if field.message_type is not None:
            assert field.message_type.full_name == other.message_type.full_name
            if field.message_type.GetOptions().map_entry:
                _same_fields(field.message_type, other.message_type)
        if field.enum_type is not None:
            assert field.enum_type.full_name == other.enum_type.full_name


def test_every_field_defined_is_tritons():
    for name in ("ModelConfig", "ModelInput", "ModelOutput", "ModelParameter"):
        _same_fields(
            pb.DESCRIPTOR.message_types_by_name[name],
            triton_config_pb2.DESCRIPTOR.message_types_by_name[name],
        )
    for name in (
        "ModelConfigRequest",
        "ModelConfigResponse",
        "RepositoryIndexRequest",
        "RepositoryIndexResponse",
    ):
        _same_fields(
            pb.DESCRIPTOR.message_types_by_name[name],
            triton_pb2.DESCRIPTOR.message_types_by_name[name],
        )
    _same_fields(
        pb.RepositoryIndexResponse.ModelIndex.DESCRIPTOR,
        triton_pb2.RepositoryIndexResponse.ModelIndex.DESCRIPTOR,
    )
    ours = pb.DESCRIPTOR.enum_types_by_name["DataType"]
    theirs = triton_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"]
    assert [(v.name, v.number) for v in ours.values] == [(v.name, v.number) for v in theirs.values]
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method, request_type, response_type in (
        ("ModelConfig", "ModelConfigRequest", "ModelConfigResponse"),
        ("RepositoryIndex", "RepositoryIndexRequest", "RepositoryIndexResponse"),
    ):
        rpc = service.methods_by_name[method]
        assert rpc.input_type.full_name == f"inference.{request_type}"
        assert rpc.output_type.full_name == f"inference.{response_type}"


def test_tritonclient_grpc_over_a_real_server(served: Served):
    """The RPCs are registered by the same function Ray Serve is given, and served."""

    async def main() -> tuple[Any, Any, Any, Any]:
        server = grpc.aio.server()
        add_inference_service(GrpcServicer(served.plane), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
            try:
                config = await client.get_model_config(MODEL)
                as_json = await client.get_model_config(MODEL, as_json=True)
                index = await client.get_model_repository_index()
                with pytest.raises(InferenceServerException) as missing:
                    await client.get_model_config("nope")
            finally:
                await client.close()
        finally:
            await server.stop(None)
        return config, as_json, index, missing.value

    config, as_json, index, missing = run(main())
    assert config.config.input[0].name == INPUT
    assert config.config.max_batch_size == 0
    assert as_json["config"]["input"][0]["data_type"] == "TYPE_FP32"
    assert [(m.name, m.version, m.state) for m in index.models] == [
        (row["name"], row["version"], row["state"]) for row in INDEX
    ]
    assert "NOT_FOUND" in missing.status()
