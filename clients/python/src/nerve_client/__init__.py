"""Async Python client for Nerve, the gRPC event bus.

>>> from nerve_client import Client, event
>>> async with Client.connect("127.0.0.1:50051") as client:
...     await client.publish(event("//billing", "invoice.paid.v1", {"amount": 12}))

The generated messages and stubs are in :mod:`nerve_client.pb` (``nerve.v1``).
"""

from . import pb
from ._client import Client, Opening
from ._errors import (
    AlreadyExistsError,
    ClosedError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NerveError,
    NoRespondersError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TokenExpiredError,
    UnauthenticatedError,
    UnavailableError,
    from_rpc_error,
)
from ._events import (
    Data,
    ExtensionInput,
    Priority,
    Start,
    all_of,
    any_of,
    data_of,
    event,
    exact,
    extensions_of,
    json_of,
    negate,
    prefix,
    suffix,
)
from ._publisher import Publisher
from ._replay import Replay
from ._subscription import CaughtUp, Delivery, Heartbeat, Message, Subscription
from .pb import Event

__all__ = [
    "AlreadyExistsError",
    "CaughtUp",
    "ClosedError",
    "Data",
    "DeadlineExceededError",
    "Delivery",
    "Event",
    "ExtensionInput",
    "FailedPreconditionError",
    "FieldViolation",
    "Heartbeat",
    "InvalidArgumentError",
    "Message",
    "NerveError",
    "NoRespondersError",
    "NotFoundError",
    "Opening",
    "OutOfRangeError",
    "PermissionDeniedError",
    "Priority",
    "Publisher",
    "Replay",
    "ResourceExhaustedError",
    "Start",
    "Subscription",
    "TokenExpiredError",
    "UnauthenticatedError",
    "UnavailableError",
    "Client",
    "all_of",
    "any_of",
    "data_of",
    "event",
    "exact",
    "extensions_of",
    "from_rpc_error",
    "json_of",
    "negate",
    "pb",
    "prefix",
    "suffix",
]
