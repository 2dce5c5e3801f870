"""What `gearbox serve` prints is true: Ray's note that Serve's controller "failed" at the end
of a clean shutdown is left out, and nothing else is."""

from __future__ import annotations

import io

from gearbox.serving.server import CONTROLLER_EXIT_NOTE, _WithoutNote


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
