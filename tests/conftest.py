"""Settings that must be in place before anything imports Ray.

Ray 2.60 turns token authentication on for clusters started with ``ray start``, and a process
reads its authentication settings when it first imports Ray. The test cluster, this process
and every ``gearbox`` subprocess therefore share one token, chosen here, whatever the
machine's ``~/.ray`` holds.
"""

from __future__ import annotations

import os
import secrets

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
