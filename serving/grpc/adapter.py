"""gRPC adapter of the Open Inference Protocol v2: where a gRPC request enters.

Ray Serve's gRPC server hands each ``inference.GRPCInferenceService`` call to the gateway method
of the same name, which :class:`GrpcServicer` defines; each is convert -> call the data plane ->
convert. Typed tensor
contents and ``raw_input_contents`` are both accepted. Error codes map to gRPC statuses here,
once.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import grpc

from gearbox.compression.errors import (
    ErrorCode,
    GearboxError,
    InvalidArgumentError,
    UnavailableError,
)
from gearbox.serving.admin import Administration
from gearbox.serving.clock import arrival
from gearbox.serving.dataplane import DataPlane
from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.inference import (
    DEFAULT_LIMITS,
    ConfigTensor,
    InferRequest,
    InferResponse,
    ModelConfig,
    ModelMetadata,
    ParameterValue,
    RepositoryEntry,
    RequestedOutput,
    Tensor,
    TensorLimits,
    tensor_from_bytes,
    tensor_from_values,
    tensor_to_bytes,
)
from gearbox.serving.statistics import Duration, ModelStatistics

logger = logging.getLogger(__name__)

GRPC_STATUS: Mapping[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.PAYLOAD_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}

# OIP datatype -> the typed field of InferTensorContents. FP16 has none: raw bytes only.
CONTENTS_FIELD: Mapping[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class StatusContext(Protocol):
    """What the adapter needs of a gRPC context (Ray Serve's RayServegRPCContext has it)."""

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]]: ...


Reply = TypeVar("Reply")


class GrpcServicer:
    """``inference.GRPCInferenceService``: each RPC is convert -> call the data plane -> convert.

    The gateway deployment is this servicer (Ray Serve's gRPC server calls the method named
    after the RPC, passing its context); it works as well on any ``grpc.aio`` server.
    """

    def __init__(
        self,
        plane: DataPlane,
        limits: TensorLimits = DEFAULT_LIMITS,
        admin: Administration | None = None,
    ) -> None:
        """``admin``: what loads and unloads models (without it, those RPCs are refused)."""
        self._plane = plane
        self._limits = limits
        self._admin = admin

    async def ServerLive(
        self, request: pb.ServerLiveRequest, grpc_context: StatusContext
    ) -> pb.ServerLiveResponse:
        return await _answer(
            grpc_context,
            pb.ServerLiveResponse,
            lambda: pb.ServerLiveResponse(live=self._plane.live()),
        )

    async def ServerReady(
        self, request: pb.ServerReadyRequest, grpc_context: StatusContext
    ) -> pb.ServerReadyResponse:
        return await _answer(
            grpc_context,
            pb.ServerReadyResponse,
            lambda: pb.ServerReadyResponse(ready=self._plane.ready(arrival().direct)),
        )

    async def ModelReady(
        self, request: pb.ModelReadyRequest, grpc_context: StatusContext
    ) -> pb.ModelReadyResponse:
        return await _answer(
            grpc_context,
            pb.ModelReadyResponse,
            lambda: pb.ModelReadyResponse(
                ready=self._plane.model_ready(request.name, request.version)
            ),
        )

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, grpc_context: StatusContext
    ) -> pb.ServerMetadataResponse:
        def convert() -> pb.ServerMetadataResponse:
            meta = self._plane.server_metadata()
            return pb.ServerMetadataResponse(
                name=meta.name, version=meta.version, extensions=list(meta.extensions)
            )

        return await _answer(grpc_context, pb.ServerMetadataResponse, convert)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, grpc_context: StatusContext
    ) -> pb.ModelMetadataResponse:
        return await _answer(
            grpc_context,
            pb.ModelMetadataResponse,
            lambda: metadata_to_proto(self._plane.model_metadata(request.name, request.version)),
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, grpc_context: StatusContext
    ) -> pb.ModelInferResponse:
        clock = arrival()

        async def call() -> pb.ModelInferResponse:
            response = await self._plane.infer(request_from_proto(request, self._limits), clock)
            return response_to_proto(
                response, bool(request.raw_input_contents), self._plane.answered
            )

        return await _answer(grpc_context, pb.ModelInferResponse, call)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, grpc_context: StatusContext
    ) -> pb.ModelStatisticsResponse:
        return await _answer(
            grpc_context,
            pb.ModelStatisticsResponse,
            lambda: statistics_to_proto(self._plane.statistics(request.name, request.version)),
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, grpc_context: StatusContext
    ) -> pb.ModelConfigResponse:
        return await _answer(
            grpc_context,
            pb.ModelConfigResponse,
            lambda: pb.ModelConfigResponse(
                config=config_to_proto(self._plane.model_config(request.name, request.version))
            ),
        )

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, grpc_context: StatusContext
    ) -> pb.RepositoryIndexResponse:
        return await _answer(
            grpc_context,
            pb.RepositoryIndexResponse,
            lambda: index_to_proto(
                self._plane.repository_index(request.ready, request.repository_name)
            ),
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, grpc_context: StatusContext
    ) -> pb.RepositoryModelLoadResponse:
        return await self._repository_change(
            request, grpc_context, "load", pb.RepositoryModelLoadResponse
        )

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, grpc_context: StatusContext
    ) -> pb.RepositoryModelUnloadResponse:
        return await self._repository_change(
            request, grpc_context, "unload", pb.RepositoryModelUnloadResponse
        )

    async def _repository_change(
        self,
        request: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest,
        grpc_context: StatusContext,
        action: str,
        reply: Callable[[], Reply],
    ) -> Reply:
        async def change() -> Reply:
            admin = self._administration(request.repository_name)
            call = admin.load_model if action == "load" else admin.unload_model
            await call(
                request.model_name,
                _repository_parameters(request.parameters),
                _authorization(grpc_context),
            )
            return reply()

        return await _answer(grpc_context, reply, change)

    def _administration(self, repository: str) -> Administration:
        if repository:
            raise InvalidArgumentError(
                f"repository '{repository}' not found: Gearbox serves one repository, "
                "asked for without a name"
            )
        if self._admin is None:
            raise UnavailableError("this gateway does not load or unload models")
        return self._admin


def _authorization(context: StatusContext) -> str | None:
    """The call's ``authorization`` metadata (gRPC's form of the HTTP header)."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return None


def _repository_parameters(
    parameters: Mapping[str, pb.ModelRepositoryParameter],
) -> dict[str, object]:
    return {
        name: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
        for name, value in parameters.items()
    }


async def _answer(
    context: StatusContext,
    empty: Callable[[], Reply],
    call: Callable[[], Reply | Awaitable[Reply]],
) -> Reply:
    """``call``'s reply, or ``empty()`` with the error's status set on ``context``."""
    try:
        reply = call()
        return await reply if inspect.isawaitable(reply) else reply
    except GearboxError as error:
        context.set_code(GRPC_STATUS[error.code])
        context.set_details(error.message)
    except Exception:
        # A bug must cost one request, never the replica.
        logger.exception("internal error serving a gRPC call")
        context.set_code(grpc.StatusCode.INTERNAL)
        context.set_details("internal error")
    return empty()


def metadata_to_proto(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    def tensors(items: tuple[Any, ...]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        return [
            pb.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=t.datatype, shape=list(t.shape)
            )
            for t in items
        ]

    return pb.ModelMetadataResponse(
        name=meta.name,
        versions=list(meta.versions),
        platform=meta.platform,
        inputs=tensors(meta.inputs),
        outputs=tensors(meta.outputs),
    )


def statistics_to_proto(stats: list[ModelStatistics]) -> pb.ModelStatisticsResponse:
    def duration(value: Duration) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=value.count, ns=value.ns)

    response = pb.ModelStatisticsResponse()
    for model in stats:
        figures = model.inference_stats
        response.model_stats.add(
            name=model.name,
            version=model.version,
            last_inference=model.last_inference,
            inference_count=model.inference_count,
            execution_count=model.execution_count,
            inference_stats=pb.InferStatistics(
                success=duration(figures.success),
                fail=duration(figures.fail),
                queue=duration(figures.queue),
                compute_input=duration(figures.compute_input),
                compute_infer=duration(figures.compute_infer),
                compute_output=duration(figures.compute_output),
                cache_hit=duration(figures.cache_hit),
                cache_miss=duration(figures.cache_miss),
            ),
            batch_stats=[
                pb.InferBatchStatistics(
                    batch_size=batch.batch_size,
                    compute_input=duration(batch.compute_input),
                    compute_infer=duration(batch.compute_infer),
                    compute_output=duration(batch.compute_output),
                )
                for batch in model.batch_stats
            ],
        )
    return response


def config_to_proto(config: ModelConfig) -> pb.ModelConfig:
    def tensor(item: ConfigTensor) -> dict[str, Any]:
        return {"name": item.name, "data_type": item.data_type, "dims": list(item.dims)}

    message = pb.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend=config.backend,
        max_batch_size=config.max_batch_size,
        input=[pb.ModelInput(**tensor(t), optional=t.optional) for t in config.inputs],
        output=[pb.ModelOutput(**tensor(t)) for t in config.outputs],
    )
    for key, value in config.parameters.items():
        message.parameters[key].string_value = value
    return message


def index_to_proto(entries: list[RepositoryEntry]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=e.name, version=e.version, state=e.state, reason=e.reason
            )
            for e in entries
        ]
    )


def parameters_from_proto(parameters: Mapping[str, pb.InferParameter]) -> dict[str, ParameterValue]:
    values: dict[str, ParameterValue] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidArgumentError(f"parameter '{key}' has no value")
        values[key] = getattr(parameter, choice)
    return values


def parameter_to_proto(value: ParameterValue) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def request_from_proto(
    request: pb.ModelInferRequest, limits: TensorLimits = DEFAULT_LIMITS
) -> InferRequest:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgumentError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    inputs = []
    for position, item in enumerate(request.inputs):
        name = item.name or f"inputs[{position}]"
        if raw:
            if item.HasField("contents"):
                raise InvalidArgumentError(
                    f"input '{name}': give raw_input_contents or typed contents, not both"
                )
            inputs.append(
                tensor_from_bytes(name, item.datatype, list(item.shape), raw[position], limits)
            )
            continue
        field = CONTENTS_FIELD.get(item.datatype)
        if field is None:
            raise InvalidArgumentError(
                f"input '{name}': datatype '{item.datatype}' has no typed contents; "
                "send it in raw_input_contents"
            )
        values = getattr(item.contents, field)
        inputs.append(
            tensor_from_values(name, item.datatype, list(item.shape), list(values), limits)
        )
    outputs = tuple(RequestedOutput(o.name) for o in request.outputs)
    return InferRequest(
        model=request.model_name,
        version=request.model_version,
        id=request.id,
        inputs=tuple(inputs),
        outputs=outputs,
        parameters=parameters_from_proto(request.parameters),
        protocol="grpc",
    )


def response_to_proto(
    response: InferResponse,
    raw: bool,
    finish: Callable[[InferResponse], Mapping[str, ParameterValue]] | None = None,
) -> pb.ModelInferResponse:
    """The reply; ``finish`` (the data plane's ``answered``) is called once the outputs are
    encoded and gives the final parameters."""
    # Raw contents must cover every output or none; FP16 has no typed field, so it forces raw.
    raw = raw or any(t.datatype not in CONTENTS_FIELD for t in response.outputs)
    message = pb.ModelInferResponse(
        model_name=response.model, model_version=response.version, id=response.id
    )
    for tensor in response.outputs:
        output = message.outputs.add(
            name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape)
        )
        if raw:
            message.raw_output_contents.append(tensor_to_bytes(tensor))
        else:
            getattr(output.contents, CONTENTS_FIELD[tensor.datatype]).extend(_typed_values(tensor))
    parameters = finish(response) if finish else response.parameters
    for key, value in parameters.items():
        message.parameters[key].CopyFrom(parameter_to_proto(value))
    return message


def _typed_values(tensor: Tensor) -> list[Any]:
    return tensor.data.ravel().tolist()
