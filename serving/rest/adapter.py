"""HTTP/REST adapter of the Open Inference Protocol v2: where an HTTP request enters.

Each endpoint is convert -> call the data plane -> convert. JSON tensors and the binary-data
extension (``Inference-Header-Content-Length``) are both understood, so unmodified
``tritonclient.http`` and KServe clients work. Error codes map to HTTP statuses here, once.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gearbox.compression.errors import ErrorCode, GearboxError, InvalidArgumentError
from gearbox.serving.admin import Administration
from gearbox.serving.clock import RequestClock
from gearbox.serving.dataplane import DataPlane
from gearbox.serving.experiments import DEFAULT_CONFIDENCE
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

HTTP_STATUS: Mapping[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.FAILED_PRECONDITION: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.INTERNAL: 500,
}

HEADER_LENGTH = "inference-header-content-length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
_INT64 = -(2**63)
_UINT64 = 2**64
"""The range of integer parameters: gRPC's ``int64_param`` and ``uint64_param`` together."""


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=lambda: {"content-type": JSON_TYPE})


def json_response(status: int, payload: Mapping[str, Any]) -> HttpResponse:
    return HttpResponse(status, json.dumps(payload, separators=(",", ":")).encode())


def error_response(code: ErrorCode, message: str) -> HttpResponse:
    return json_response(HTTP_STATUS[code], {"error": message})


class HttpAdapter:
    def __init__(
        self,
        plane: DataPlane,
        admin: Administration | None = None,
        limits: TensorLimits = DEFAULT_LIMITS,
    ) -> None:
        self._plane = plane
        self._admin = admin
        self._limits = limits

    async def handle(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        clock: RequestClock | None = None,
        query: str = "",
    ) -> HttpResponse:
        """Answers one request; ``clock`` started when it reached the server (default: now);
        ``query``: the URL's query string."""
        try:
            if path.startswith(("/v2/experiments", "/v2/feedback", "/v2/repository/models/")):
                return await self._administer(method.upper(), path, headers, body, query)
            return await self._dispatch(
                method.upper(), path, headers, body, clock or RequestClock.start()
            )
        except GearboxError as error:
            return error_response(error.code, error.message)
        except Exception:
            # A bug must cost one request, never the replica.
            logger.exception("internal error on %s %s", method, path)
            return error_response(ErrorCode.INTERNAL, f"internal error serving {method} {path}")

    async def _dispatch(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        clock: RequestClock,
    ) -> HttpResponse:
        parts = [p for p in path.split("/") if p]
        if not parts or parts[0] != "v2":
            return _unknown(method, path)
        rest = parts[1:]
        if rest == [] and method == "GET":
            meta = self._plane.server_metadata()
            return json_response(
                200,
                {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)},
            )
        if rest == ["health", "live"] and method == "GET":
            live = self._plane.live()
            return json_response(200 if live else 503, {"live": live})
        if rest == ["health", "ready"] and method == "GET":
            ready = self._plane.ready(clock.direct)
            return json_response(200 if ready else 503, {"ready": ready})
        if rest == ["repository", "index"] and method == "POST":
            ready = _index_ready(body)
            return _json_list(index_json(self._plane.repository_index(ready)))
        if len(rest) < 2 or rest[0] != "models":
            return _unknown(method, path)
        if rest == ["models", "stats"] and method == "GET":
            # As in Triton, this path means every model's statistics, never metadata of a
            # model named "stats".
            return json_response(200, statistics_json(self._plane.statistics()))

        model, tail = rest[1], rest[2:]
        version = ""
        if len(tail) >= 2 and tail[0] == "versions":
            version, tail = tail[1], tail[2:]
        if tail == [] and method == "GET":
            return json_response(200, _metadata_json(self._plane.model_metadata(model, version)))
        if tail == ["ready"] and method == "GET":
            ready = self._plane.model_ready(model, version)
            return json_response(200 if ready else 503, {"name": model, "ready": ready})
        if tail == ["infer"] and method == "POST":
            request = decode_infer_request(model, version, headers, body, self._limits)
            response = await self._plane.infer(request, clock)
            return encode_infer_response(response, self._plane.answered)
        if tail == ["stats"] and method == "GET":
            return json_response(200, statistics_json(self._plane.statistics(model, version)))
        if tail == ["config"] and method == "GET":
            return json_response(200, config_json(self._plane.model_config(model, version)))
        if tail == ["variants"] and method == "GET" and not version:
            return json_response(200, self._plane.variants(model))
        return _unknown(method, path)

    async def _administer(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes, query: str
    ) -> HttpResponse:
        """``/v2/experiments[/NAME[/report]]``, ``/v2/feedback`` and
        ``/v2/repository/models/{m}/load|unload`` (see :mod:`..admin`)."""
        admin = self._admin
        if admin is None:
            return error_response(ErrorCode.NOT_FOUND, f"no endpoint {method} {path}")
        parts = [urllib.parse.unquote(p) for p in path.split("/") if p][1:]
        authorization = _header(headers, "authorization")
        if parts == ["feedback"] and method == "POST":
            return json_response(200, await admin.feedback(_json_object(body)))
        if parts == ["experiments"] and method == "GET":
            return json_response(200, {"experiments": await admin.experiments()})
        if parts == ["experiments"] and method == "POST":
            return json_response(
                201, await admin.create_experiment(_json_object(body), authorization)
            )
        if len(parts) == 2 and parts[0] == "experiments" and method == "DELETE":
            return json_response(200, await admin.end_experiment(parts[1], authorization))
        if len(parts) == 3 and parts[::2] == ["experiments", "report"] and method == "GET":
            confidence = _query_number(query, "confidence", DEFAULT_CONFIDENCE)
            return json_response(200, await admin.report(parts[1], confidence))
        if len(parts) == 4 and parts[:2] == ["repository", "models"] and method == "POST":
            model, action = parts[2], parts[3]
            if action == "load":
                return json_response(
                    200, await admin.load_model(model, _load_parameters(body), authorization)
                )
            if action == "unload":
                return json_response(
                    200, await admin.unload_model(model, _load_parameters(body), authorization)
                )
        return _unknown(method, path)


def _load_parameters(body: bytes) -> dict[str, Any]:
    """The ``parameters`` of a load or unload body (Triton's; an empty body has none)."""
    if not body.strip():
        return {}
    parameters = _json_object(body).get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidArgumentError("'parameters' must be a JSON object")
    return parameters


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict from a test or another server may keep the case
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


def _query_number(query: str, name: str, default: float) -> float:
    values = urllib.parse.parse_qs(query).get(name)
    if not values:
        return default
    try:
        return float(values[-1])
    except ValueError:
        raise InvalidArgumentError(f"query parameter {name} must be a number") from None


def _unknown(method: str, path: str) -> HttpResponse:
    return error_response(ErrorCode.NOT_FOUND, f"no endpoint {method} {path}")


def _metadata_json(meta: ModelMetadata) -> dict[str, Any]:
    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.inputs
        ],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.outputs
        ],
        "parameters": dict(meta.parameters),
    }


def config_json(config: ModelConfig) -> dict[str, Any]:
    """Triton's model configuration as its HTTP endpoint writes it (dims as numbers)."""

    def tensor(item: ConfigTensor) -> dict[str, Any]:
        return {"name": item.name, "data_type": item.data_type, "dims": list(item.dims)}

    return {
        "name": config.name,
        "platform": config.platform,
        "backend": config.backend,
        "max_batch_size": config.max_batch_size,
        "input": [{**tensor(t), "optional": t.optional} for t in config.inputs],
        "output": [tensor(t) for t in config.outputs],
        "parameters": {k: {"string_value": v} for k, v in config.parameters.items()},
    }


def index_json(entries: list[RepositoryEntry]) -> list[dict[str, str]]:
    """Triton's repository index: as Triton does, ``reason`` only where there is one."""
    return [
        {
            "name": e.name,
            "version": e.version,
            "state": e.state,
            **({"reason": e.reason} if e.reason else {}),
        }
        for e in entries
    ]


def _index_ready(body: bytes) -> bool:
    # tritonclient posts an empty body; Triton's own clients may send {"ready": true}.
    if not body.strip():
        return False
    ready = _json_object(body).get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidArgumentError("repository index: 'ready' must be a boolean")
    return ready


def _json_list(rows: list[dict[str, str]]) -> HttpResponse:
    return HttpResponse(200, json.dumps(rows, separators=(",", ":")).encode())


def statistics_json(stats: list[ModelStatistics]) -> dict[str, Any]:
    """Triton's statistics extension's response body."""

    def duration(value: Duration) -> dict[str, int]:
        return {"count": value.count, "ns": value.ns}

    def model(figures: ModelStatistics) -> dict[str, Any]:
        infer = figures.inference_stats
        return {
            "name": figures.name,
            "version": figures.version,
            "last_inference": figures.last_inference,
            "inference_count": figures.inference_count,
            "execution_count": figures.execution_count,
            "inference_stats": {
                "success": duration(infer.success),
                "fail": duration(infer.fail),
                "queue": duration(infer.queue),
                "compute_input": duration(infer.compute_input),
                "compute_infer": duration(infer.compute_infer),
                "compute_output": duration(infer.compute_output),
                "cache_hit": duration(infer.cache_hit),
                "cache_miss": duration(infer.cache_miss),
            },
            "batch_stats": [
                {
                    "batch_size": batch.batch_size,
                    "compute_input": duration(batch.compute_input),
                    "compute_infer": duration(batch.compute_infer),
                    "compute_output": duration(batch.compute_output),
                }
                for batch in figures.batch_stats
            ],
        }

    return {"model_stats": [model(figures) for figures in stats]}


def decode_infer_request(
    model: str,
    version: str,
    headers: Mapping[str, str],
    body: bytes,
    limits: TensorLimits = DEFAULT_LIMITS,
) -> InferRequest:
    header_length = _header_length(headers, len(body))
    document = _json_object(body[:header_length] if header_length is not None else body)
    binary = memoryview(body)[header_length:] if header_length is not None else memoryview(b"")

    parameters = _parameters(document.get("parameters"), "request parameters")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidArgumentError("request needs a non-empty 'inputs' list")
    offset = 0
    inputs = []
    for position, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise InvalidArgumentError(f"inputs[{position}] must be an object")
        name = item.get("name")
        datatype = item.get("datatype")
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"inputs[{position}] needs a 'name' string")
        if not isinstance(datatype, str):
            raise InvalidArgumentError(f"input '{name}' needs a 'datatype' string")
        if "shape" not in item:
            raise InvalidArgumentError(f"input '{name}' needs a 'shape'")
        input_parameters = _parameters(item.get("parameters"), f"input '{name}' parameters")
        size = input_parameters.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidArgumentError(f"input '{name}': binary_data_size must be an integer")
            if offset + size > len(binary):
                raise InvalidArgumentError(
                    f"input '{name}': binary_data_size {size} runs past the end of the body"
                )
            raw = bytes(binary[offset : offset + size])
            offset += size
            inputs.append(tensor_from_bytes(name, datatype, item["shape"], raw, limits))
        else:
            if "data" not in item:
                raise InvalidArgumentError(f"input '{name}' needs 'data' (or binary_data_size)")
            inputs.append(tensor_from_values(name, datatype, item["shape"], item["data"], limits))
    if offset != len(binary):
        raise InvalidArgumentError(
            f"the body holds {len(binary) - offset} bytes of binary data no input claims"
        )

    all_binary = parameters.get("binary_data_output") is True
    outputs = []
    raw_outputs = document.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise InvalidArgumentError("'outputs' must be a list")
    for position, item in enumerate(raw_outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidArgumentError(f"outputs[{position}] must be an object with a 'name'")
        output_parameters = _parameters(item.get("parameters"), f"output '{item['name']}'")
        outputs.append(
            RequestedOutput(item["name"], output_parameters.get("binary_data", all_binary) is True)
        )
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgumentError("'id' must be a string")
    return InferRequest(
        model=model,
        version=version,
        id=request_id,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        parameters=parameters,
        protocol="http",
        all_outputs_binary=all_binary,
    )


def _header_length(headers: Mapping[str, str], body_length: int) -> int | None:
    value = _header(headers, HEADER_LENGTH)
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidArgumentError(f"header Inference-Header-Content-Length is {value!r}") from None
    if not 0 <= length <= body_length:
        raise InvalidArgumentError(
            f"Inference-Header-Content-Length {length} exceeds the body ({body_length} bytes)"
        )
    return length


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except RecursionError:
        raise InvalidArgumentError("request body is nested too deeply to be read") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidArgumentError(f"request body is not valid JSON: {error}") from None
    except ValueError as error:  # an integer longer than Python converts (4,300 digits)
        raise InvalidArgumentError(
            f"request body holds a number Gearbox cannot read: {error}"
        ) from None
    if not isinstance(document, dict):
        raise InvalidArgumentError("request body must be a JSON object")
    return document


def _parameters(value: object, where: str) -> dict[str, ParameterValue]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{where} must be an object")
    for key, item in value.items():
        if not isinstance(item, bool | int | float | str):
            raise InvalidArgumentError(
                f"{where}: '{key}' must be a boolean, number or string, got {type(item).__name__}"
            )
        # As gRPC's int64_param / uint64_param hold them: a longer integer converts to no
        # number the gateway computes with (float() of it overflows).
        if isinstance(item, int) and not isinstance(item, bool) and not _INT64 <= item < _UINT64:
            raise InvalidArgumentError(f"{where}: '{key}' is an integer beyond 64 bits")
    return value


def encode_infer_response(
    response: InferResponse,
    finish: Callable[[InferResponse], Mapping[str, ParameterValue]] | None = None,
) -> HttpResponse:
    """The response body; ``finish`` (the data plane's ``answered``) is called once the
    outputs are encoded and gives the final parameters, so that the latency it stamps covers
    the encoding too."""
    outputs = []
    blobs: list[bytes] = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if _wants_binary(response, tensor):
            blob = tensor_to_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = tensor.data.ravel().tolist()
        outputs.append(entry)
    encoded_outputs = json.dumps(outputs, separators=(",", ":"))
    head = json.dumps(
        {
            "model_name": response.model,
            "model_version": response.version,
            "id": response.id,
            "parameters": dict(finish(response) if finish else response.parameters),
        },
        separators=(",", ":"),
    )
    header = f'{head[:-1]},"outputs":{encoded_outputs}}}'.encode()
    if not blobs:
        return HttpResponse(200, header)
    return HttpResponse(
        200,
        b"".join([header, *blobs]),
        {"content-type": BINARY_TYPE, HEADER_LENGTH: str(len(header))},
    )


def _wants_binary(response: InferResponse, tensor: Tensor) -> bool:
    return response.all_outputs_binary or tensor.name in response.binary_outputs


__all__: Sequence[str] = [
    "HTTP_STATUS",
    "HttpAdapter",
    "HttpResponse",
    "decode_infer_request",
    "encode_infer_response",
    "statistics_json",
]
