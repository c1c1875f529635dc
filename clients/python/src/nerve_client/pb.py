"""The generated ``nerve.v1`` messages and stubs under short names.

>>> from nerve_client import pb
>>> pb.Event(id="1", source="//svc", type="thing.happened.v1", spec_version="1.0")
"""

from ._proto.nerve.v1 import admin_pb2, admin_pb2_grpc, event_bus_pb2, event_bus_pb2_grpc, event_pb2
from ._proto.nerve.v1.admin_pb2 import (
    DeadLetter,
    EventTypeInfo,
    GroupInfo,
)
from ._proto.nerve.v1.event_bus_pb2 import (
    CaughtUp,
    Delivery,
    Heartbeat,
    PublishResult,
    ReplayRequest,
    ReplayResponse,
    ReplyResponse,
    RequestResponse,
    StartPosition,
    SubscribeRequest,
    SubscribeResponse,
    Subscribed,
    SubscriptionOpen,
)
from ._proto.nerve.v1.event_pb2 import AttributeValues, Event, ExtensionValue, Filter, FilterList

__all__ = [
    "AttributeValues",
    "CaughtUp",
    "DeadLetter",
    "Delivery",
    "Event",
    "EventTypeInfo",
    "ExtensionValue",
    "Filter",
    "FilterList",
    "GroupInfo",
    "Heartbeat",
    "PublishResult",
    "ReplayRequest",
    "ReplayResponse",
    "ReplyResponse",
    "RequestResponse",
    "StartPosition",
    "SubscribeRequest",
    "SubscribeResponse",
    "Subscribed",
    "SubscriptionOpen",
    "admin_pb2",
    "admin_pb2_grpc",
    "event_bus_pb2",
    "event_bus_pb2_grpc",
    "event_pb2",
]
