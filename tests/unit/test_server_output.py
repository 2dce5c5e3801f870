"""What `gearbox serve` prints is true: Ray's note that Serve's controller "failed" at the end
of a clean shutdown is left out, and nothing else is; the example request names a model that
has a variant to answer it."""

from __future__ import annotations

import io

from gearbox.serving.server import CONTROLLER_EXIT_NOTE, _WithoutNote, check_repository
from tests.unit.serving_fixtures import BROKEN_MODEL, MODEL, publish_tiny_repository


def test_the_controller_exit_note_and_its_newline_are_dropped_and_nothing_else():
    sink = io.StringIO()
    stream = _WithoutNote(sink, CONTROLLER_EXIT_NOTE)
    # As Ray's driver prints a line: the text, then its newline, in two writes.
    for line in (
        "gearbox: draining and stopping",
        "(raylet) Task ServeController.graceful_shutdown failed: the actor was killed by ray.kill",
        "",
        "(raylet) a worker died unexpectedly",
    ):
        print(line, file=stream)
    assert sink.getvalue() == (
        "gearbox: draining and stopping\n\n(raylet) a worker died unexpectedly\n"
    )


def test_the_example_model_is_one_with_a_ready_variant(tmp_path):
    repository = publish_tiny_repository(tmp_path / "repo")  # "broken" has none ready
    models = check_repository(str(repository.root))
    assert models == [MODEL, BROKEN_MODEL]
