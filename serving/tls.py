"""TLS for the gateway's endpoints: the certificate and key ``gearbox serve`` is given, checked
before anything starts, and what a client on this machine needs to trust exactly that
certificate over HTTPS and gRPC. The TLS itself is served by Gearbox's own terminator
(:mod:`gearbox.serving.tls_terminator`, which says why).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gearbox.compression.errors import InvalidArgumentError


@dataclass(frozen=True)
class TlsFiles:
    """A server certificate (PEM, the chain up to but not including the root may follow it)
    and its unencrypted private key (PEM), as absolute paths."""

    certificate: str
    key: str


def tls_files(certificate: str | None, key: str | None) -> TlsFiles | None:
    """The ``--tls-cert`` / ``--tls-key`` pair, checked to load as a server would load it:
    None when neither is given; one clear error when only one is, or when they cannot serve."""
    if certificate is None and key is None:
        return None
    if certificate is None or key is None:
        raise InvalidArgumentError("--tls-cert and --tls-key go together: give both or neither")
    files = TlsFiles(str(Path(certificate).resolve()), str(Path(key).resolve()))
    _check_readable(files.certificate, "certificate")
    _check_readable(files.key, "key")
    _check_pair(files)
    return files


def _check_readable(path: str, what: str) -> None:
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as error:
        raise InvalidArgumentError(
            f"cannot read the TLS {what} {path}: {error.strerror or error}"
        ) from None


def _check_pair(files: TlsFiles) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # The readiness probe trusts this file, so it must hold a certificate on its own.
        ssl.create_default_context(cafile=files.certificate)
    except ssl.SSLError:
        raise InvalidArgumentError(
            f"the TLS certificate {files.certificate} holds no PEM certificate"
        ) from None

    def refuse_encrypted_key() -> str:
        # HAProxy would ask for the password on a terminal it does not have.
        raise InvalidArgumentError(
            f"the TLS key {files.key} is encrypted: give the key unencrypted (readable by the "
            "gateway's user only)"
        )

    try:
        context.load_cert_chain(files.certificate, files.key, password=refuse_encrypted_key)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise InvalidArgumentError(
                f"the TLS key {files.key} does not belong to the certificate {files.certificate}"
            ) from None
        raise InvalidArgumentError(
            f"the TLS key {files.key} is not a PEM private key for {files.certificate} "
            f"({error.reason or error})"
        ) from None


def pinned_client_context(certificate: str) -> ssl.SSLContext:
    """A client context that trusts the server's own certificate file and nothing else, for
    probing this gateway on loopback: the certificate need not name 127.0.0.1 or chain to a
    root this machine trusts, but the server must present that certificate's chain."""
    context = ssl.create_default_context(cafile=certificate)
    # A leaf issued by a CA is a trust anchor of its own only with partial chains allowed.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    return context


def name_to_verify(presented: Mapping[str, Any], host: str) -> str:
    """A name the certificate ``presented`` (as :meth:`ssl.SSLSocket.getpeercert` gives it) is
    valid for, for a gRPC client that reaches the gateway at ``host``: gRPC always checks the
    server's name and has no switch to skip it, while the gateway's certificate may name the
    machine's public name rather than ``host``. ``host`` itself when the certificate names it."""
    alternatives = presented.get("subjectAltName") or ()
    names = [value for kind, value in alternatives if kind in ("DNS", "IP Address")]
    if host in names:
        return host
    if names:
        # Any name under a wildcard is one the certificate is valid for.
        return f"gateway.{names[0][2:]}" if names[0].startswith("*.") else names[0]
    for relative_name in presented.get("subject") or ():
        for key, value in relative_name:
            if key == "commonName":
                return value
    return host
