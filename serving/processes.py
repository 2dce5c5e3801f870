"""Whether a process still runs, as /proc and the kernel say."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def process_running(pid: int) -> bool:
    """Whether ``pid`` runs: it exists (ours to signal or not) and has not exited. A zombie has
    exited; only its parent's wait is missing."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True  # no /proc to ask: the kernel's answer stands
