"""One error hierarchy for all of Gearbox.

Every error carries a protocol-neutral :class:`ErrorCode`. Protocol adapters map the code once
(to an HTTP status, to a gRPC status); the CLI prints the message as one line.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNAVAILABLE = "unavailable"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    INTERNAL = "internal"


class GearboxError(Exception):
    """Base of every error Gearbox raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[type[GearboxError], tuple[str]]:
        # Keeps the subclass and message intact when the error crosses a Ray task boundary.
        return (type(self), (self.message,))


class InvalidArgumentError(GearboxError):
    """The caller asked for something malformed: bad spec, unknown option, wrong shape."""

    code = ErrorCode.INVALID_ARGUMENT


class NotFoundError(GearboxError):
    """A named model, variant or repository does not exist."""

    code = ErrorCode.NOT_FOUND


class UnavailableError(GearboxError):
    """A service Gearbox needs (a Ray cluster, a replica) cannot be reached or is not ready."""

    code = ErrorCode.UNAVAILABLE


class RepositoryError(GearboxError):
    """The model repository cannot be read or written as asked."""

    code = ErrorCode.FAILED_PRECONDITION


class IntegrityError(RepositoryError):
    """An artifact does not match the sha256 its manifest records."""


class CompressionError(GearboxError):
    """A technique could not produce a valid variant (export, verification, training)."""

    code = ErrorCode.FAILED_PRECONDITION


class PayloadTooLargeError(GearboxError):
    """A request larger than the gateway's limit: refused before it is read in full."""

    code = ErrorCode.PAYLOAD_TOO_LARGE


class UnauthenticatedError(GearboxError):
    """An admin call came without the gateway's token, or with a wrong one."""

    code = ErrorCode.UNAUTHENTICATED


class PermissionDeniedError(GearboxError):
    """An admin call reached a gateway that takes none (it was started without a token)."""

    code = ErrorCode.PERMISSION_DENIED


class ResourceExhaustedError(GearboxError):
    """Gearbox is at capacity (a full queue); the caller should back off and retry."""

    code = ErrorCode.RESOURCE_EXHAUSTED
