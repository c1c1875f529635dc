"""Building and reading events, filters, start positions and durations."""

from __future__ import annotations

import builtins
import enum
import json
import os
import time as _time
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, Union

from google.protobuf import any_pb2, duration_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from ._proto.nerve.v1 import event_bus_pb2, event_pb2

__all__ = [
    "Data",
    "ExtensionInput",
    "Priority",
    "Start",
    "all_of",
    "any_of",
    "data_of",
    "event",
    "exact",
    "extensions_of",
    "json_of",
    "negate",
    "prefix",
    "suffix",
]

Event = event_pb2.Event

#: What an event's payload can be built from: bytes -> ``binary_data``, str -> ``text_data``, a protobuf
#: message -> ``proto_data`` (packed in ``Any``), a dict or list -> JSON ``text_data`` (``application/json``).
Data = Union[bytes, bytearray, memoryview, str, Message, Mapping[str, Any], list[Any], None]

#: What an extension attribute can be built from (bool, int32, str, bytes, aware datetime, or the proto value).
ExtensionInput = Union[str, bool, int, bytes, datetime, event_pb2.ExtensionValue]

#: Where a subscription starts: ``"latest"``, ``"earliest"``, after a sequence (int), at a recorded time, or the
#: raw proto.
Start = Union[Literal["latest", "earliest"], int, datetime, event_bus_pb2.StartPosition]

#: A duration in seconds, or a timedelta.
Seconds = Union[float, int, timedelta]

_INT32 = range(-(2**31), 2**31)


class Priority(enum.IntEnum):
    """Delivery priority inside durable groups (``nerve.v1.Priority``)."""

    UNSPECIFIED = event_pb2.PRIORITY_UNSPECIFIED
    LOW = event_pb2.PRIORITY_LOW
    NORMAL = event_pb2.PRIORITY_NORMAL
    HIGH = event_pb2.PRIORITY_HIGH
    CRITICAL = event_pb2.PRIORITY_CRITICAL


def _uuid7() -> str:
    """A UUIDv7 (RFC 9562): the Unix time in milliseconds, then random bits.

    Ids that grow with time keep the server's key index appending; random ones made each commit
    rewrite about one page of it per event (the repository's docs/benchmarks.md, cause 4).
    """
    value = (_time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # the RFC 4122 variant
    return str(uuid.UUID(int=value))


def event(
    source: str,
    type: str,
    data: Data = None,
    *,
    id: str | None = None,
    subject: str = "",
    priority: Priority | str | int | None = None,
    extensions: Mapping[str, ExtensionInput] | None = None,
    correlation_id: str = "",
    causation_id: str = "",
    traceparent: str = "",
    data_content_type: str | None = None,
    data_schema: str = "",
    time: datetime | None = None,
) -> event_pb2.Event:
    """Builds a CloudEvents 1.0 event (``spec_version`` "1.0"); ``id`` defaults to a UUIDv7.

    >>> e = event("//billing", "invoice.paid.v1", {"amount": 12}, priority="high", correlation_id="order-7")
    """
    texts = {
        "source": source,
        "type": type,
        "id": id,
        "subject": subject,
        "correlation_id": correlation_id,
        "causation_id": causation_id,
        "traceparent": traceparent,
        "data_content_type": data_content_type,
        "data_schema": data_schema,
    }
    for field, text in texts.items():
        check_text(f"event {field}", text)
    for name in extensions or {}:
        check_text("event extension name", name, unset=False)
    if time is not None and not isinstance(time, datetime):
        raise TypeError(f"event time must be a datetime, not {builtins.type(time).__name__}")
    e = event_pb2.Event(
        id=id if id is not None else _uuid7(),
        source=source,
        type=type,
        spec_version="1.0",
        subject=subject,
        correlation_id=correlation_id,
        causation_id=causation_id,
        traceparent=traceparent,
        data_schema=data_schema,
    )
    content_type = _set_data(e, data)
    if data_content_type is not None:
        content_type = data_content_type
    if content_type:
        e.data_content_type = content_type
    if priority is not None:
        e.priority = _priority(priority)  # type: ignore[assignment]
    for name, value in (extensions or {}).items():
        e.extensions[name].CopyFrom(_extension(value))
    if time is not None:
        e.time.CopyFrom(_timestamp(time))
    return e


def check_text(what: str, value: object, *, unset: bool = True, expected: str = "a str") -> None:
    """Raises TypeError naming ``what`` unless ``value`` is text as protobuf takes it: a str, UTF-8 bytes (as
    their text) or, where ``unset`` (a string field; not a map's key or value, nor a repeated field's item),
    None, which leaves the field unset. ``expected`` is what the message says ``what`` must be."""
    # protobuf's own TypeError ("bad argument type for built-in operation") names no field
    if not isinstance(value, (str, bytes)) and not (unset and value is None):
        raise TypeError(f"{what} must be {expected}, not {builtins.type(value).__name__}")


def _set_data(e: event_pb2.Event, data: Data) -> str:
    if data is None:
        return ""
    if isinstance(data, (bytes, bytearray, memoryview)):
        e.binary_data = bytes(data)
        return ""
    if isinstance(data, str):
        e.text_data = data
        return ""
    if isinstance(data, Message):
        packed = any_pb2.Any()
        packed.Pack(data)
        e.proto_data.CopyFrom(packed)
        return ""
    if isinstance(data, (Mapping, list)):
        e.text_data = json.dumps(data, separators=(",", ":"), sort_keys=True)
        return "application/json"
    raise TypeError(f"cannot use {type(data).__name__} as event data (bytes, str, protobuf message, dict or list)")


def _priority(value: Priority | str | int) -> Priority:
    if isinstance(value, str):
        try:
            return Priority[value.upper().removeprefix("PRIORITY_")]
        except KeyError:
            raise ValueError(f"unknown priority {value!r} (low, normal, high, critical)") from None
    return Priority(value)


def _extension(value: ExtensionInput) -> event_pb2.ExtensionValue:
    if isinstance(value, event_pb2.ExtensionValue):
        return value
    if isinstance(value, bool):  # before int: bool is an int
        return event_pb2.ExtensionValue(bool_value=value)
    if isinstance(value, int):
        if value not in _INT32:
            raise ValueError(f"extension integer {value} does not fit in 32 bits (CloudEvents Integer)")
        return event_pb2.ExtensionValue(integer_value=value)
    if isinstance(value, str):
        return event_pb2.ExtensionValue(string_value=value)
    if isinstance(value, (bytes, bytearray)):
        return event_pb2.ExtensionValue(bytes_value=bytes(value))
    if isinstance(value, datetime):
        return event_pb2.ExtensionValue(timestamp_value=_timestamp(value))
    raise TypeError(f"cannot use {type(value).__name__} as an extension value")


def data_of(e: event_pb2.Event) -> bytes | str | any_pb2.Any | None:
    """The payload as it was sent: bytes, str, a packed ``Any``, or None."""
    which = e.WhichOneof("data")
    if which == "binary_data":
        return e.binary_data
    if which == "text_data":
        return e.text_data
    if which == "proto_data":
        return e.proto_data
    return None


def json_of(e: event_pb2.Event) -> Any:
    """The payload parsed as JSON (text or binary data)."""
    data = data_of(e)
    if isinstance(data, (str, bytes)):
        return json.loads(data)
    raise ValueError(f"event {e.id!r} carries no JSON data")


def extensions_of(e: event_pb2.Event) -> dict[str, str | bool | int | bytes | datetime]:
    """The extension attributes as Python values (URI and URI-reference values as str)."""
    out: dict[str, str | bool | int | bytes | datetime] = {}
    for name, value in e.extensions.items():
        which = value.WhichOneof("value")
        if which == "timestamp_value":
            out[name] = value.timestamp_value.ToDatetime(tzinfo=timezone.utc)
        elif which is not None:
            out[name] = getattr(value, which)
    return out


def exact(attributes: Mapping[str, str] | None = None, /, **kwargs: str) -> event_pb2.Filter:
    """Every named attribute (or extension) equals its value."""
    return event_pb2.Filter(exact=_attribute_values("exact", attributes, kwargs))


def prefix(attributes: Mapping[str, str] | None = None, /, **kwargs: str) -> event_pb2.Filter:
    """Every named attribute starts with its value."""
    return event_pb2.Filter(prefix=_attribute_values("prefix", attributes, kwargs))


def suffix(attributes: Mapping[str, str] | None = None, /, **kwargs: str) -> event_pb2.Filter:
    """Every named attribute ends with its value."""
    return event_pb2.Filter(suffix=_attribute_values("suffix", attributes, kwargs))


def _attribute_values(
    builder: str, attributes: Mapping[str, str] | None, kwargs: Mapping[str, str]
) -> event_pb2.AttributeValues:
    merged = {**(attributes or {}), **kwargs}
    for name, value in merged.items():
        # a map takes no None: neither for a name nor for a value
        check_text(f"{builder} attribute name", name, unset=False)
        # named as its text: a name given as bytes is stored as that text
        shown = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        check_text(f"{builder} attribute {shown}", value, unset=False)
    return event_pb2.AttributeValues(attributes=merged)


def all_of(*filters: event_pb2.Filter) -> event_pb2.Filter:
    """Every nested filter matches."""
    return event_pb2.Filter(all=event_pb2.FilterList(filters=filters))


def any_of(*filters: event_pb2.Filter) -> event_pb2.Filter:
    """At least one nested filter matches."""
    return event_pb2.Filter(any=event_pb2.FilterList(filters=filters))


def negate(f: event_pb2.Filter) -> event_pb2.Filter:
    """The nested filter does not match."""
    return event_pb2.Filter(negate=f)


def start_position(start: Start | None) -> event_bus_pb2.StartPosition | None:
    if start is None:
        return None
    if isinstance(start, event_bus_pb2.StartPosition):
        return start
    if start == "latest":
        return event_bus_pb2.StartPosition(latest=empty_pb2.Empty())
    if start == "earliest":
        return event_bus_pb2.StartPosition(earliest=empty_pb2.Empty())
    if isinstance(start, datetime):
        return event_bus_pb2.StartPosition(time=_timestamp(start))
    if isinstance(start, int) and not isinstance(start, bool) and start >= 0:
        return event_bus_pb2.StartPosition(after_sequence=start)
    raise ValueError(f"bad start {start!r}: 'latest', 'earliest', a sequence >= 0 or a datetime")


def duration(value: Seconds, *, positive: bool = False) -> duration_pb2.Duration:
    """``value`` as a Duration; negative (or, with ``positive``, zero) raises ValueError."""
    # refused here, not by the server: on a subscription its refusal would end the whole stream
    if seconds(value) < 0:
        raise ValueError(f"negative duration {value}")
    d = duration_pb2.Duration()
    if isinstance(value, timedelta):
        d.FromTimedelta(value)
    else:
        d.FromNanoseconds(round(value * 1e9))
    if positive and d.seconds == d.nanos == 0:  # checked after rounding: less than half a nanosecond is zero too
        raise ValueError(f"zero duration {value}: it must be positive")
    return d


def optional_duration(value: Seconds | None) -> duration_pb2.Duration | None:
    """A setting with a server default: None or zero leaves the field unset, so that default applies (the
    server refuses a set zero); negative, or positive but under half a nanosecond (a set zero), raises
    ValueError."""
    return duration(value, positive=True) if value else None


def seconds(value: Seconds) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    if value.tzinfo is None:
        raise ValueError("use an aware datetime (e.g. datetime.now(timezone.utc))")
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value)
    return t


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    return None if value is None else _timestamp(value)
