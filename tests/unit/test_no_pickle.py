"""Nothing Gearbox ships loads with pickle: model artifacts are ONNX, arrays are read with
``allow_pickle=False``, torch weights (if ever loaded) with ``weights_only=True``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("serving", "compression")

PICKLE_LOADERS = {
    "pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load",
    "dill.loads", "joblib.load", "pandas.read_pickle", "pd.read_pickle",
}  # fmt: skip


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


def unpickling_calls(source: str) -> list[str]:
    """``line: call`` of each call in ``source`` that may unpickle."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        unsafe = (
            name in PICKLE_LOADERS
            or (name == "torch.load" and _keyword(node, "weights_only") is not True)
            or (name in {"np.load", "numpy.load"} and _keyword(node, "allow_pickle") is not False)
        )
        if unsafe:
            found.append(f"{node.lineno}: {name}")
    return found


@pytest.mark.parametrize(
    "source",
    [
        "import pickle\npickle.loads(b'')",
        "import numpy as np\nnp.load('x.npy')",
        "import torch\ntorch.load('w.pt')",
        "import joblib\njoblib.load('m.joblib')",
    ],
)
def test_the_scan_finds_each_way_to_unpickle(source):
    assert unpickling_calls(source)


def test_safe_loads_pass_the_scan():
    source = "np.load('x.npy', allow_pickle=False)\ntorch.load('w.pt', weights_only=True)"
    assert unpickling_calls(source) == []


def test_nothing_shipped_unpickles():
    found = [
        f"{path.relative_to(ROOT)}:{call}"
        for package in SHIPPED
        for path in sorted((ROOT / package).rglob("*.py"))
        for call in unpickling_calls(path.read_text())
    ]
    assert found == []
