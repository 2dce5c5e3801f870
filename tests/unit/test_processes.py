"""process_running: what the kernel says of a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from gearbox.serving.processes import process_running


def test_a_running_process_runs_and_an_exited_one_does_not_even_before_it_is_reaped():
    assert process_running(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert process_running(child.pid)
        child.kill()
        deadline = time.monotonic() + 10
        while process_running(child.pid):  # a zombie until wait() below
            assert time.monotonic() < deadline, "a killed child still counts as running"
            time.sleep(0.01)
    finally:
        child.kill()
        child.wait()
    assert not process_running(child.pid)  # reaped: gone


def test_a_process_of_another_user_runs():
    assert process_running(1)  # init: not ours to signal when not root, running all the same
