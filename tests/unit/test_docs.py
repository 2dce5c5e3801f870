"""The README and docs/ stand on their own: no link leaves the repository, every relative link
and anchor resolves, every `gearbox` command they show parses, and the registering guide's
example module is a valid registration (checked without Ray)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
from markdown_it import MarkdownIt
from markdown_it.token import Token

from gearbox.compression import load_spec
from gearbox.serving.cli import _parser

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
LOCAL_HOSTS = {"127.0.0.1", "localhost", "0.0.0.0", "[::1]"}
URL = re.compile(r"\bhttps?://([^/\s:`'\")\]]+)")
EXAMPLE_SPEC = "docs.examples.breast_cancer:spec"

MARKDOWN = MarkdownIt("commonmark")


def _name(document: Path) -> str:
    return str(document.relative_to(ROOT))


def _tokens(document: Path) -> list[Token]:
    return MARKDOWN.parse(document.read_text(encoding="utf-8"))


def _walk(tokens: list[Token]) -> Iterator[Token]:
    for token in tokens:
        yield token
        yield from _walk(token.children or [])


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(document: Path) -> set[str]:
    tokens = _tokens(document)
    return {
        _slug(tokens[index + 1].content)
        for index, token in enumerate(tokens)
        if token.type == "heading_open"
    }


def _link_targets(document: Path) -> list[str]:
    targets = []
    for token in _walk(_tokens(document)):
        if token.type == "link_open":
            targets.append(str(token.attrs["href"]))
        elif token.type == "image":
            targets.append(str(token.attrs["src"]))
    return targets


def test_the_documents_are_found() -> None:
    assert ROOT / "README.md" in DOCUMENTS
    assert ROOT / "docs" / "REGISTERING.md" in DOCUMENTS


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_no_address_outside_this_machine(document: Path) -> None:
    """Links, bare URLs and URLs in code alike: the docs must not send a reader elsewhere."""
    hosts = URL.findall(document.read_text(encoding="utf-8"))
    assert [host for host in hosts if host.lower() not in LOCAL_HOSTS] == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_relative_links_resolve_inside_the_repository(document: Path) -> None:
    broken = []
    for target in _link_targets(document):
        parts = urlsplit(target)
        if parts.scheme or parts.netloc:
            continue  # an absolute URL: the test above judges it
        path = (document.parent / unquote(parts.path)).resolve() if parts.path else document
        if not path.is_relative_to(ROOT) or not path.exists():
            broken.append(f"{target}: no such file in the repository")
        elif parts.fragment and path.suffix == ".md" and parts.fragment not in _anchors(path):
            broken.append(f"{target}: no heading '{parts.fragment}' in {_name(path)}")
    assert broken == []


def _commands(document: Path) -> Iterator[str]:
    """Each `gearbox ...` invocation in the document's shell code blocks."""
    for token in _tokens(document):
        if token.type != "fence" or token.info.strip() not in {"sh", "bash", "shell", "console"}:
            continue
        for statement in _statements(token.content):
            lexer = shlex.shlex(statement, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words: list[str] = []
            for word in [*lexer, ";"]:
                if word and set(word) <= set("|&;()<>"):  # an operator ends a command
                    if words and words[0] == "gearbox":
                        yield shlex.join(words)
                    words = []
                else:
                    words.append(word)


def _statements(script: str) -> Iterator[str]:
    """The script's lines, a backslash continuation or an open quote joining the next."""
    pending = ""
    for line in script.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quotation still open: the statement goes on
            continue
        yield pending
        pending = ""
    assert not pending, f"unclosed quotation in a shell block: {pending!r}"


GEARBOX_COMMANDS = [
    pytest.param(command, id=f"{_name(document)}: {command}")
    for document in DOCUMENTS
    for command in _commands(document)
]


def test_the_documents_show_gearbox_commands() -> None:
    assert len(GEARBOX_COMMANDS) > 10


@pytest.mark.parametrize("command", GEARBOX_COMMANDS)
def test_every_documented_gearbox_command_parses(command: str) -> None:
    try:
        _parser().parse_args(shlex.split(command)[1:])
    except SystemExit:  # argparse's way of refusing; its message is on stderr
        pytest.fail(f"`{command}` does not parse")


def test_the_guide_runs_the_example_it_ships() -> None:
    guide = (ROOT / "docs" / "REGISTERING.md").read_text(encoding="utf-8")
    assert f"gearbox compress --spec {EXAMPLE_SPEC} --repo" in guide
    assert "python -m docs.examples.query_breast_cancer" in guide


def test_the_example_is_a_valid_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `gearbox compress --spec` does before Ray starts: import the spec from the
    repository root, load and check its data, and run the model on it."""
    monkeypatch.syspath_prepend(str(ROOT))
    spec = load_spec(EXAMPLE_SPEC)
    assert spec.source == EXAMPLE_SPEC
    data = spec.load_data()  # checks every split against the signature
    assert len(data.heldout) > 100  # enough rows that one answer moves accuracy < 0.01
    assert set(np.unique(data.heldout.labels)) == {0, 1}
    model = spec.build_model().eval()
    rows = torch.from_numpy(data.heldout.inputs["measurements"][:3])
    with torch.no_grad():
        assert tuple(model(rows).shape) == (3, spec.signature.outputs[0].shape[1])
        assert tuple(spec.build_student()(rows).shape) == (3, 2)
