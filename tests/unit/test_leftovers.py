"""A local gateway leaves nothing running: what still runs from its session's own files (Ray's
HAProxy, when Serve did not stop in time) is stopped, and nothing else is."""

from __future__ import annotations

import subprocess
import sys

from gearbox.serving.ingress import session_state_dir, stop_processes_using

SLEEPER = "import sys, time; time.sleep(120)"


def test_only_the_processes_naming_the_session_directory_are_stopped(tmp_path):
    state = session_state_dir()
    other = tmp_path / "elsewhere"
    ours = subprocess.Popen([sys.executable, "-c", SLEEPER, str(state / "haproxy.cfg")])
    theirs = subprocess.Popen([sys.executable, "-c", SLEEPER, str(other / "haproxy.cfg")])
    try:
        stopped = stop_processes_using(state)
        assert stopped == [ours.pid]
        assert ours.wait(timeout=10) is not None
        assert theirs.poll() is None
    finally:
        for process in (ours, theirs):
            process.kill()
            process.wait()
        state.rmdir()
