"""Errors: every failed call raises a :class:`NerveError` subclass chosen by its gRPC status code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "AlreadyExistsError",
    "ClosedError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InvalidArgumentError",
    "NerveError",
    "NoRespondersError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "TokenExpiredError",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
]


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request, from the ``google.rpc.BadRequest`` detail (e.g. ``events[0].type``)."""

    field: str
    description: str


class NerveError(Exception):
    """A call failed. Carries the gRPC status code, its message and the rich error details the server sent."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field_violations: tuple[FieldViolation, ...] = (),
        reason: str = "",
        metadata: dict[str, str] | None = None,
        details: tuple[any_pb2.Any, ...] = (),
    ) -> None:
        self.code = code
        self.message = message
        self.field_violations = field_violations
        #: ``google.rpc.ErrorInfo`` reason, e.g. ``NO_RESPONDERS``; empty when the server sent none.
        self.reason = reason
        #: ``google.rpc.ErrorInfo`` metadata.
        self.metadata: dict[str, str] = dict(metadata or {})
        #: Every detail of the ``google.rpc.Status``, packed, including kinds this client does not decode.
        self.details = details
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.field_violations:
            fields = "; ".join(f"{v.field}: {v.description}" for v in self.field_violations)
            text += f" ({fields})"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r}, field_violations={self.field_violations!r})"

    def violation(self, field: str) -> FieldViolation | None:
        """The violation of ``field``, if the server named it."""
        return next((v for v in self.field_violations if v.field == field), None)


class InvalidArgumentError(NerveError):
    """INVALID_ARGUMENT: the request is malformed; :attr:`field_violations` names each bad field."""


class ResourceExhaustedError(NerveError):
    """RESOURCE_EXHAUSTED: only a size or count limit was exceeded."""


class AlreadyExistsError(NerveError):
    """ALREADY_EXISTS: the same (source, id) was stored with different content."""


class NotFoundError(NerveError):
    """NOT_FOUND."""


class FailedPreconditionError(NerveError):
    """FAILED_PRECONDITION."""


class NoRespondersError(FailedPreconditionError):
    """FAILED_PRECONDITION with reason ``NO_RESPONDERS``: no connected subscriber could receive the request."""


class OutOfRangeError(NerveError):
    """OUT_OF_RANGE: a position past what is stored yet, e.g. a subscription's start after the head."""


class DeadlineExceededError(NerveError):
    """DEADLINE_EXCEEDED: e.g. a request got no reply in time."""


class UnavailableError(NerveError):
    """UNAVAILABLE: the server cannot be reached, or is shutting down."""


class PermissionDeniedError(NerveError):
    """PERMISSION_DENIED."""


class UnauthenticatedError(NerveError):
    """UNAUTHENTICATED."""


class TokenExpiredError(UnauthenticatedError):
    """UNAUTHENTICATED with reason ``TOKEN_EXPIRED``: the bearer token expired. The server ends a stream
    (Subscribe, PublishStream, Replay) this way when the token it was opened with expires, and refuses any
    call made with an expired token. Credentials that refresh (``grpc.metadata_call_credentials`` with a
    plugin that fetches the current token) bring a fresh one on the next call: a replay resumes by itself,
    a subscription or publisher is opened again by the caller."""


class ClosedError(NerveError):
    """The subscription, publisher or client was closed by this side; nothing more can be sent on it."""

    def __init__(self, message: str = "subscription is closed") -> None:
        super().__init__(grpc.StatusCode.CANCELLED, message)


_BY_CODE: dict[grpc.StatusCode, type[NerveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}

#: Finer classes for a status code with a ``google.rpc.ErrorInfo`` reason (domain ``nerve.v1``).
_BY_REASON: dict[tuple[grpc.StatusCode, str], type[NerveError]] = {
    (grpc.StatusCode.FAILED_PRECONDITION, "NO_RESPONDERS"): NoRespondersError,
    (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED"): TokenExpiredError,
}


def from_rpc_error(error: grpc.RpcError) -> NerveError:
    """Maps a failed gRPC call (sync or ``grpc.aio``) to the matching :class:`NerveError`."""
    call: Any = error
    code: grpc.StatusCode = call.code() if callable(getattr(call, "code", None)) else grpc.StatusCode.UNKNOWN
    message: str = (call.details() if callable(getattr(call, "details", None)) else None) or ""
    try:
        status = rpc_status.from_call(call)
    except (ValueError, AttributeError, TypeError):
        status = None
    return from_status(code, message, status)


def from_status(code: grpc.StatusCode, message: str, status: status_pb2.Status | None) -> NerveError:
    """The :class:`NerveError` for a status code and message, with the details of ``status`` (a
    ``google.rpc.Status``) when there is one."""
    violations: list[FieldViolation] = []
    reason = ""
    metadata: dict[str, str] = {}
    details: tuple[any_pb2.Any, ...] = ()
    if status is not None:
        details = tuple(status.details)
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = reason or info.reason
                metadata.update(info.metadata)
    cls = _BY_REASON.get((code, reason)) or _BY_CODE.get(code, NerveError)
    return cls(
        code,
        message,
        field_violations=tuple(violations),
        reason=reason,
        metadata=metadata,
        details=details,
    )
