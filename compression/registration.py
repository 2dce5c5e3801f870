"""The check a registration passes before anything is trained or published: the declared
signature is what the model really takes and returns.

A signature is the model's public face (``model.json``, model metadata, every request is
validated against it), yet it is written by hand beside the model. One forward pass of the
untrained model on a few rows of each data split shows whether the two agree, in seconds and
before any Ray task starts; a wrong declaration is one clear error naming the tensor.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.signature import TensorSpec, oip_datatype
from gearbox.compression.spec import DataSplits, ModelSpec
from gearbox.compression.training import model_inputs

PROBE_ROWS = 2
"""Rows per split the model runs on: two, so that a batch dimension cannot hide as a 1."""

SPLIT_NAMES = ("train", "calibration", "heldout")


def build_torch_model(spec: ModelSpec) -> nn.Module:
    """The factory's module, or one clear error when the factory makes something else."""
    model = spec.build_model()
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"model factory '{spec.model_factory}' returned {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    return model


def torch_datatype(dtype: torch.dtype) -> str:
    """The OIP name of a torch dtype, or torch's own name where numpy has none (bfloat16)."""
    try:
        return oip_datatype(torch.empty(0, dtype=dtype).numpy().dtype)
    except TypeError:
        return str(dtype).removeprefix("torch.")


def _shape_text(shape: tuple[int, ...] | torch.Size) -> str:
    return str(list(shape))


def _names(tensors: tuple[TensorSpec, ...]) -> str:
    return ", ".join(t.name for t in tensors)


def _check_forward_parameters(model: nn.Module, spec: ModelSpec) -> None:
    """Inputs reach ``forward`` by position, in the signature's order: the count must fit, and
    a declared name that ``forward`` also uses must sit at the same position."""
    declared = spec.signature.inputs
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a builtin or C-implemented forward shows no signature
        return
    model_name = f"model '{spec.name}'"
    try:
        inspect.signature(model.forward).bind(*range(len(declared)))
    except TypeError:
        taken = ", ".join(
            p.name for p in parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY
        )
        raise InvalidArgumentError(
            f"{model_name}: the signature declares {len(declared)} input(s) ({_names(declared)}) "
            f"but {type(model).__name__}.forward takes ({taken})"
        ) from None
    positional = [
        p.name
        for p in parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    for position, tensor in enumerate(declared):
        if tensor.name in positional and positional.index(tensor.name) != position:
            raise InvalidArgumentError(
                f"{model_name}: declared input '{tensor.name}' is input #{position + 1}, but "
                f"{type(model).__name__}.forward takes '{tensor.name}' as argument "
                f"#{positional.index(tensor.name) + 1} ({', '.join(positional)}): declare the "
                "inputs in forward's order"
            )


def _named_outputs(result: Any) -> list[tuple[str | None, Any]]:
    """The forward's outputs in order, each with the name the model gives it, if any."""
    if isinstance(result, torch.Tensor):
        return [(None, result)]
    if isinstance(result, Mapping):  # e.g. a Hugging Face ModelOutput
        return [(str(name), value) for name, value in result.items()]
    if isinstance(result, tuple) and hasattr(result, "_fields"):  # a namedtuple
        return list(zip(result._fields, result, strict=True))
    if isinstance(result, tuple | list):
        return [(None, value) for value in result]
    return [(None, result)]


def _check_outputs(spec: ModelSpec, result: Any, where: str) -> None:
    declared = spec.signature.outputs
    produced = _named_outputs(result)
    model_name = f"model '{spec.name}'"
    if len(produced) != len(declared):
        raise InvalidArgumentError(
            f"{model_name}: the signature declares {len(declared)} output(s) "
            f"({_names(declared)}) but the model returns {len(produced)} ({where})"
        )
    for position, (tensor, (name, value)) in enumerate(zip(declared, produced, strict=True)):
        if name is not None and name != tensor.name:
            raise InvalidArgumentError(
                f"{model_name}: declared output #{position + 1} '{tensor.name}' is named "
                f"'{name}' by the model ({where})"
            )
        if not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(
                f"{model_name}: declared output '{tensor.name}' is a {type(value).__name__} "
                f"from the model, not a tensor ({where})"
            )
        datatype = torch_datatype(value.dtype)
        if datatype != tensor.datatype:
            raise InvalidArgumentError(
                f"{model_name}: declared output '{tensor.name}' has datatype {tensor.datatype} "
                f"but the model returns {datatype} ({where})"
            )
        if not tensor.accepts(value.shape):
            raise InvalidArgumentError(
                f"{model_name}: declared output '{tensor.name}' has shape "
                f"{_shape_text(tensor.shape)} but the model returns {_shape_text(value.shape)} "
                f"({where}; -1: any size)"
            )


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


@torch.no_grad()
def verify_declared_signature(spec: ModelSpec, data: DataSplits) -> None:
    """Raise one :class:`InvalidArgumentError` naming the first tensor whose declared name,
    datatype or shape the model contradicts; return quietly when they agree.

    ``data`` must have passed :meth:`ModelSpec.load_data`, which holds every split's arrays to
    the declared inputs. The untrained model then runs, in eval mode, on the first
    :data:`PROBE_ROWS` rows of each split (text splits may differ in sequence length), and each
    output is compared with its declaration, ignoring the dimensions declared -1.
    """
    model = build_torch_model(spec).eval()
    _check_forward_parameters(model, spec)
    for split_name in SPLIT_NAMES:
        rows = getattr(data, split_name).take(PROBE_ROWS)
        where = f"{split_name} split, {len(next(iter(rows.values())))} rows"
        try:
            result = model(*model_inputs(spec, rows))
        except Exception as exc:  # the user's forward rejecting the declared inputs
            given = ", ".join(
                f"{t.name} {oip_datatype(np.asarray(rows[t.name]).dtype)} "
                f"{_shape_text(rows[t.name].shape)}"
                for t in spec.signature.inputs
            )
            raise InvalidArgumentError(
                f"model '{spec.name}': the model fails on the declared inputs ({given}; "
                f"{split_name} split): {_first_line(exc)}"
            ) from exc
        _check_outputs(spec, result, where)
