"""`gearbox serve --tls-cert/--tls-key`: the checks made before anything starts, that TLS keeps
the ingress asked for, and the readiness probe's trust in the gateway's own certificate (no
Ray)."""

from __future__ import annotations

import http.server
import os
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from gearbox.compression import InvalidArgumentError, ModelRepository
from gearbox.serving.cli import _gateway_config, _parser, _ray_environment, main
from gearbox.serving.ingress import INGRESS_ENV, INGRESS_SWITCH
from gearbox.serving.server import _http_not_ready
from gearbox.serving.tls import TlsFiles, pinned_client_context, tls_files
from tests.unit.tiny_model import linear_onnx, make_manifest, make_record
from tests.unit.tls_fixtures import LOOPBACK, READY_PATH, ReadyHandler, http_server, issue_pair


@pytest.fixture(autouse=True)
def restore_sys_path(monkeypatch):
    # main() may put the working directory on sys.path; keep that local to each test.
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pair(tmp_path: Path, authority: trustme.CA) -> TlsFiles:
    """A server certificate for loopback issued by ``authority``, and its key, as files."""
    return issue_pair(tmp_path, authority)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    repository = ModelRepository(root)
    repository.ensure_writable()
    repository.register_model(make_record())
    artifact = linear_onnx()
    repository.publish_variant(make_manifest(artifact), artifact)
    return root


def serve_error(capsys, repository: Path, *options: str) -> str:
    """`gearbox serve` with ``options``: fails with one line, before Ray or a port is used."""
    code = main(["serve", "--repo", str(repository), *options])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("gearbox: error: ")
    return lines[0]


@pytest.mark.parametrize("given", ["--tls-cert", "--tls-key"])
def test_one_of_certificate_and_key_is_one_error_line(capsys, repository, pair, given):
    path = pair.certificate if given == "--tls-cert" else pair.key
    line = serve_error(capsys, repository, given, path)
    assert "--tls-cert and --tls-key go together" in line


@pytest.mark.parametrize("missing", ["certificate", "key"])
def test_a_missing_file_is_one_error_line_naming_it(capsys, repository, pair, tmp_path, missing):
    absent = str(tmp_path / "absent.pem")
    certificate = absent if missing == "certificate" else pair.certificate
    key = absent if missing == "key" else pair.key
    line = serve_error(capsys, repository, "--tls-cert", certificate, "--tls-key", key)
    assert f"cannot read the TLS {missing} {absent}" in line
    assert "No such file or directory" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_key_is_one_error_line(capsys, repository, pair):
    os.chmod(pair.key, 0)
    line = serve_error(capsys, repository, "--tls-cert", pair.certificate, "--tls-key", pair.key)
    assert f"cannot read the TLS key {pair.key}" in line
    assert "Permission denied" in line


def test_a_directory_for_a_file_is_one_error_line(capsys, repository, pair, tmp_path):
    line = serve_error(capsys, repository, "--tls-cert", str(tmp_path), "--tls-key", pair.key)
    assert f"cannot read the TLS certificate {tmp_path}" in line


def test_a_key_of_another_certificate_is_refused(pair, tmp_path):
    stranger = trustme.CA().issue_cert("127.0.0.1").private_key_pem
    other_key = tmp_path / "other.key"
    stranger.write_to_path(str(other_key))
    with pytest.raises(InvalidArgumentError, match="does not belong to the certificate"):
        tls_files(pair.certificate, str(other_key))


def test_a_file_without_a_certificate_is_refused(pair):
    with pytest.raises(InvalidArgumentError, match="holds no PEM certificate"):
        tls_files(pair.key, pair.key)


def test_an_encrypted_key_is_refused_rather_than_prompted_for(pair, tmp_path):
    key = serialization.load_pem_private_key(Path(pair.key).read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(InvalidArgumentError, match="is encrypted"):
        tls_files(pair.certificate, str(encrypted))


def test_a_usable_pair_reaches_the_gateway_config_as_absolute_paths(
    repository, pair, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    relative = [os.path.relpath(pair.certificate), os.path.relpath(pair.key)]
    args = ["serve", "--repo", str(repository), "--tls-cert", relative[0], "--tls-key", relative[1]]
    config = _gateway_config(_parser().parse_args(args))
    assert config.tls == TlsFiles(pair.certificate, pair.key)
    assert _gateway_config(_parser().parse_args(["serve", "--repo", str(repository)])).tls is None


@pytest.mark.parametrize("ingress", [None, "haproxy", "proxy"])
def test_tls_keeps_the_ingress_asked_for(repository, pair, monkeypatch, ingress):
    """The TLS terminator sits in front of either ingress, so TLS no longer forces the classic
    proxy: without --ingress the fast HAProxy ingress stays the default."""
    monkeypatch.delenv(INGRESS_ENV, raising=False)
    monkeypatch.delenv(INGRESS_SWITCH, raising=False)
    options = ["serve", "--repo", str(repository), "--tls-cert", pair.certificate]
    options += ["--tls-key", pair.key, *(["--ingress", ingress] if ingress else [])]
    env = _ray_environment(_parser().parse_args(options), None)
    assert env[INGRESS_SWITCH] == ("0" if ingress == "proxy" else "1")


@pytest.fixture
def https_server(pair: TlsFiles) -> Iterator[str]:
    """A real HTTPS server on loopback presenting ``pair``: host:port and its ready path."""
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), ReadyHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pair.certificate, pair.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with http_server(server) as port:
        yield f"{LOOPBACK}:{port}{READY_PATH}"


def test_the_readiness_probe_trusts_the_gateway_certificate_alone(https_server, pair, tmp_path):
    pinned = pinned_client_context(pair.certificate)
    assert _http_not_ready(f"https://{https_server}", pinned) is None
    # The certificate names 127.0.0.1, but a client trusting only this machine's roots refuses
    # the unknown authority: the probe's trust comes from the pinned certificate.
    refused = _http_not_ready(f"https://{https_server}", ssl.create_default_context())
    assert refused is not None and "CERTIFICATE_VERIFY_FAILED" in refused
    impostor = tmp_path / "impostor.pem"
    trustme.CA().issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(impostor))
    refused = _http_not_ready(f"https://{https_server}", pinned_client_context(str(impostor)))
    assert refused is not None and "CERTIFICATE_VERIFY_FAILED" in refused


def test_the_readiness_probe_does_not_take_plain_http_for_ready(https_server):
    assert _http_not_ready(f"http://{https_server}") is not None
