"""The client: one gRPC channel, the EventBus and Admin stubs, and an idiomatic async API over them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import grpc
import grpc.aio

from ._errors import ClosedError, NerveError, NotFoundError, UnavailableError, from_rpc_error
from ._events import Seconds, Start, check_text, optional_duration, seconds, start_position, timestamp
from ._proto.nerve.v1 import admin_pb2, admin_pb2_grpc, event_bus_pb2, event_bus_pb2_grpc, event_pb2
from ._publisher import Publisher
from ._replay import Replay, _cancelling
from ._subscription import Delivery, Subscription

__all__ = ["Client"]

_T = TypeVar("_T")
_C = TypeVar("_C", bound="_Closable")

#: Extra time the gRPC deadline of a request gets beyond its reply timeout, so the server's own timeout answers.
_REQUEST_GRACE = 5.0

#: Channel options the client sets unless the caller's ``options`` name them. gRPC receives at most 4 MiB a
#: message by default, but a server page (Replay, ListDeadLetters) holds up to ``max_batch_bytes`` of events
#: (4 MiB by default, configurable) plus framing; the server bounds its own messages, so no limit here. And
#: the server's own keepalive: a ping after 30 s without anything received, the connection dead without an
#: answer within 10 s, with or without calls open (and pings not limited to two without data sent), so a
#: connection that died silently is replaced within about 40 s instead of when the operating system gives up.
#: gRPC's C core (1.85) waited its ping timeout (60 s by default) for a keepalive ping's answer, not the
#: keepalive timeout, so both are set.
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


class _Closable(Protocol):
    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class Opening(Generic[_C]):
    """Something being opened: ``await`` it, or use it as ``async with`` (closed on exit)."""

    def __init__(self, open: Callable[[], Awaitable[_C]]) -> None:
        self._open = open
        self._value: _C | None = None

    def __await__(self) -> Generator[Any, None, _C]:
        return self._open().__await__()

    async def __aenter__(self) -> _C:
        self._value = await self._open()
        return self._value

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._value is not None:
            # as the value's own ``async with`` closes it: its close raises only when the body did not
            await self._value.__aexit__(exc_type, exc, tb)


def _types(call: str, types: str | Iterable[str]) -> list[str]:
    """``types`` as a list of patterns; what protobuf would not take raises TypeError naming ``call``'s types."""
    if isinstance(types, str):
        return [types]
    # bytes is an iterable too, but of ints: not the one pattern it may be meant as
    if isinstance(types, (bytes, bytearray)) or not _iterable(types):
        raise TypeError(f"{call} types must be a str or an iterable of str, not {type(types).__name__}")
    listed = list(types)
    for i, pattern in enumerate(listed):
        check_text(f"{call} types[{i}]", pattern, unset=False)
    return listed


def _iterable(value: object) -> bool:
    """Whether ``list(value)`` can iterate ``value`` (``__iter__``, or the older ``__getitem__`` protocol)."""
    try:
        iter(value)  # type: ignore[call-overload]
    except TypeError:
        return False
    return True


class Client:
    """A connection to a Nerve server.

    >>> async with Client.connect("127.0.0.1:50051") as client:
    ...     [result] = await client.publish(event("//svc", "thing.happened.v1", {"n": 1}))
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        #: Set by close(): calls raise ClosedError, those in flight then too.
        self._closed = False
        #: The generated stubs, for anything this layer does not cover.
        self.event_bus_stub: event_bus_pb2_grpc.EventBusAsyncStub = event_bus_pb2_grpc.EventBusStub(channel)
        self.admin_stub: admin_pb2_grpc.AdminAsyncStub = admin_pb2_grpc.AdminStub(channel)

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        ready_timeout: Seconds | None = 10.0,
    ) -> Opening[Client]:
        """Connects to ``target`` (``host:port``), plaintext unless ``credentials`` are given.

        Waits up to ``ready_timeout`` for the connection (None: connect lazily on the first call). Await the
        result, or use it with ``async with`` to close the client on exit. The channel receives messages of
        any size (the server bounds its own) unless ``options`` set ``grpc.max_receive_message_length``, and
        pings a connection after 30 s without anything received, replacing it when no answer comes within
        10 s (``grpc.keepalive_time_ms``, ``grpc.keepalive_timeout_ms``, ``grpc.http2.ping_timeout_ms``);
        ``options`` win over every channel option the client sets.
        """
        given = list(options or ())
        named = {name for name, _ in given}
        # a keepalive timeout given without a ping timeout is the ping timeout too: that is the one C core waits
        keepalive_timeout = [value for name, value in given if name == "grpc.keepalive_timeout_ms"]
        if keepalive_timeout and "grpc.http2.ping_timeout_ms" not in named:
            given.append(("grpc.http2.ping_timeout_ms", keepalive_timeout[-1]))
            named.add("grpc.http2.ping_timeout_ms")
        channel_options = [option for option in _CHANNEL_OPTIONS if option[0] not in named] + given

        async def open() -> Client:
            if credentials is None:
                channel = grpc.aio.insecure_channel(target, options=channel_options)
            else:
                channel = grpc.aio.secure_channel(target, credentials, options=channel_options)
            if ready_timeout is not None:
                try:
                    await _wait_ready(channel, seconds(ready_timeout))
                except BaseException:
                    await channel.close()
                    raise
            return cls(channel)

        return Opening(open)

    async def close(self) -> None:
        """Closes the channel: calls in flight, and every call after, raise :class:`ClosedError`; open
        subscriptions and publishers end with it."""
        self._closed = True
        await self.channel.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def _check_open(self) -> None:
        """Raises :class:`ClosedError` once the client is closed (grpc.aio would raise its UsageError)."""
        if self._closed:
            raise ClosedError("the client is closed")

    def _closed_by_this_side(self) -> bool:
        """Whether a CancelledError a call raised is this client's close, not the running task's cancellation."""
        return self._closed and not _cancelling()

    async def _call(self, make: Callable[[], Awaitable[_T]]) -> _T:
        """Makes a call with ``make`` and awaits it, raising a :class:`NerveError` for a failure."""
        self._check_open()  # a closed channel refuses to make the call at all
        try:
            return await make()
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError from a call the closing channel cancelled: not this task's
            if self._closed_by_this_side():
                raise ClosedError("the client was closed with the call in flight") from None
            raise

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- EventBus -------------------------------------------------------------------------------------------

    async def publish(
        self, *events: event_pb2.Event, timeout: Seconds | None = None
    ) -> list[event_bus_pb2.PublishResult]:
        """Commits the events atomically; one result (id, sequence, duplicate) per event, in order.

        Publishing the same (source, id) again returns the original sequence with ``duplicate`` set.
        """
        if not events:
            raise ValueError("publish needs at least one event")
        response = await self._call(
            lambda: self.event_bus_stub.Publish(
                event_bus_pb2.PublishRequest(events=events),
                timeout=None if timeout is None else seconds(timeout),
            )
        )
        return list(response.results)

    def publisher(self) -> Opening[Publisher]:
        """Opens a PublishStream: a :class:`Publisher` whose ``publish`` calls share one stream, pipelined.

        For high publish rates: no gRPC call per batch. Opening waits for the server's answer to it (one round
        trip), so a refusal of the stream itself (unauthenticated, too many open streams) raises here, as the
        :class:`NerveError` subclass a ``publish`` on it would raise. Requests commit and are answered in the
        order sent; a refused one raises like :meth:`publish` and the stream goes on. One message over the
        server's message limit (``max_batch_bytes`` + 1 MiB) ends the stream instead: it and every call after
        it raise :class:`ResourceExhaustedError` (or, when the end interrupts grpcio's write of the message,
        the INTERNAL "Internal error from Core" grpcio makes of it). Await the result, or use it with
        ``async with`` to close it on exit (waiting for outstanding answers; when an exception, a cancellation
        too, leaves the block, the stream is cancelled at once and outstanding calls raise :class:`ClosedError`).
        """
        return Opening(lambda: self._call(lambda: Publisher._open(self.event_bus_stub)))

    def subscribe(
        self,
        types: str | Iterable[str] = (),
        *,
        group: str = "",
        filter: event_pb2.Filter | None = None,
        start: Start | None = None,
        max_in_flight: int = 0,
        ack_deadline: Seconds | None = None,
        max_attempts: int = 0,
        heartbeat_interval: Seconds | None = None,
        heartbeat_timeout: Seconds | None = None,
        open_timeout: Seconds = 30.0,
    ) -> Opening[Subscription]:
        """Opens a Subscribe stream and waits for the server to confirm it.

        ``types`` are patterns (``*`` one segment, ``>`` the rest; empty: all). Without ``group`` the stream is
        private and in sequence order; with one, the group's members share its events. ``start``: "latest"
        (default), "earliest", a sequence to continue after, or a datetime. Zero/None settings take the
        server's defaults (``open_timeout`` excepted: it is this side's wait for the confirmation; with none
        within it the call is cancelled and :class:`TimeoutError` raised). Await the result, or use it with
        ``async with`` to close the stream on exit.

        ``heartbeat_timeout`` is this side's watchdog: when the server sends nothing (no heartbeat, delivery or
        marker) for that long, the connection is taken for dead (it may have died silently, with no reset)
        and the stream ends with :class:`UnavailableError` after the messages already received: subscribe
        again. None (the default) is 3 heartbeat intervals, the interval the server confirms (or the one
        asked for, with an older server that confirms none; with neither known, no watchdog); 0 turns the
        watchdog off, as ``max_resumes=0`` does resuming on a replay.
        """
        if heartbeat_timeout is not None and seconds(heartbeat_timeout) < 0:
            raise ValueError(f"negative heartbeat_timeout {heartbeat_timeout}")
        check_text("subscribe group", group)
        request = event_bus_pb2.SubscriptionOpen(
            types=_types("subscribe", types),
            group=group,
            filter=filter,
            start=start_position(start),
            max_in_flight=max_in_flight,
            # zero is left unset like None: the server refuses a set zero, and its default is what 0 means here
            ack_deadline=optional_duration(ack_deadline),
            max_attempts=max_attempts,
            heartbeat_interval=optional_duration(heartbeat_interval),
        )
        return Opening(
            lambda: self._call(
                lambda: Subscription._open(self.event_bus_stub, request, seconds(open_timeout), heartbeat_timeout)
            )
        )

    async def request(
        self, event: event_pb2.Event, timeout: Seconds | None = None
    ) -> event_bus_pb2.RequestResponse:
        """Publishes ``event`` as a request and waits up to ``timeout`` for one reply.

        A ``timeout`` of 0 or None takes the server's default (30 s unless configured otherwise), as in the
        Go client; the call then has no gRPC deadline and waits for the server's answer. With a ``timeout``
        the call's deadline is ``timeout`` plus 5 s, so the server's own answer comes first. Returns the
        response: ``.reply`` (the reply event, with the request's correlation id) and ``.request_sequence``.
        Raises :class:`NoRespondersError` at once when nobody could receive it and
        :class:`DeadlineExceededError` when no reply came in time.
        """
        # the server refuses a zero timeout: leave the field unset instead, so that the server's default applies
        asked = optional_duration(timeout)
        # without a timeout no deadline: the server's default is its own setting, and it always answers once that
        # has passed; a deadline guessed here would cut short a server configured to wait longer
        deadline = seconds(timeout) + _REQUEST_GRACE if timeout else None
        request = event_bus_pb2.RequestRequest(event=event, timeout=asked)
        return await self._call(lambda: self.event_bus_stub.Request(request, timeout=deadline))

    async def reply(
        self, reply_to: str | Delivery | event_pb2.Event, event: event_pb2.Event
    ) -> event_bus_pb2.ReplyResponse:
        """Answers a request: ``reply_to`` is the request's inbox, or the delivery (or event) of the request.

        ``.delivered`` says whether the reply reached the requester: False when it had stopped waiting,
        or another responder's reply came first. ``.sequence`` is the stored reply's, zero when it was
        not stored (nobody waited on the inbox any more).
        """
        if isinstance(reply_to, Delivery):
            reply_to = reply_to.event.reply_to
        elif isinstance(reply_to, event_pb2.Event):
            reply_to = reply_to.reply_to
        check_text("reply_to", reply_to, expected="a str, Delivery or Event")
        if not reply_to:
            raise ValueError("reply_to is empty: the event is not a request")
        request = event_bus_pb2.ReplyRequest(reply_to=reply_to, event=event)
        return await self._call(lambda: self.event_bus_stub.Reply(request))

    def replay(
        self,
        types: str | Iterable[str] = (),
        *,
        source: str = "",
        subject: str = "",
        correlation_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        after_sequence: int = 0,
        until_sequence: int = 0,
        limit: int = 0,
        page_size: int = 0,
        resume_token: str = "",
        max_resumes: int = 3,
    ) -> Replay:
        """Replays stored history in sequence order (see :class:`Replay`); ``limit`` 0 means everything.

        A stream that breaks with UNAVAILABLE or ends with :class:`TokenExpiredError` is reopened from its last
        resume token, up to ``max_resumes`` times in a row (0: never).
        """
        texts = {
            "source": source,
            "subject": subject,
            "correlation_id": correlation_id,
            "resume_token": resume_token,
        }
        for name, text in texts.items():
            check_text(f"replay {name}", text)
        request = event_bus_pb2.ReplayRequest(
            types=_types("replay", types),
            source=source,
            subject=subject,
            correlation_id=correlation_id,
            start_time=timestamp(start_time),
            end_time=timestamp(end_time),
            after_sequence=after_sequence,
            until_sequence=until_sequence,
            limit=limit,
            page_size=page_size,
            resume_token=resume_token,
        )
        return Replay(self.event_bus_stub, request, max_resumes=max_resumes, client_closed=lambda: self._closed)

    # --- Admin ----------------------------------------------------------------------------------------------

    async def get_event(self, id: str, source: str = "") -> event_pb2.Event:
        """A stored event by id (and source, when several sources used the id). Raises NotFoundError."""
        check_text("get_event id", id)
        check_text("get_event source", source)
        response = await self._call(lambda: self.admin_stub.GetEvent(admin_pb2.GetEventRequest(id=id, source=source)))
        return response.event

    async def list_groups(self) -> list[admin_pb2.GroupInfo]:
        """Durable groups the caller may administer, by name, with their pending, lag, consumers and
        dead letters; every page."""
        return [g async for g in self._groups()]

    async def group(self, name: str) -> admin_pb2.GroupInfo | None:
        """One group's info, or None if it does not exist."""
        check_text("group name", name)
        try:
            response = await self._call(lambda: self.admin_stub.GetGroup(admin_pb2.GetGroupRequest(group=name)))
        except NotFoundError:
            return None
        except NerveError as e:
            if e.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            # a server older than GetGroup (during a rolling upgrade too): look through the list
            async for g in self._groups():
                if g.name == name:
                    return g
            return None
        return response.group

    async def _groups(self) -> AsyncIterator[admin_pb2.GroupInfo]:
        token = ""
        while True:
            request = admin_pb2.ListGroupsRequest(page_token=token)
            response = await self._call(lambda: self.admin_stub.ListGroups(request))
            for g in response.groups:
                yield g
            token = response.next_page_token
            if not token:
                return

    async def delete_group(self, group: str) -> bool:
        """Removes a group with its pending deliveries and dead letters; False if it did not exist."""
        check_text("delete_group group", group)
        response = await self._call(lambda: self.admin_stub.DeleteGroup(admin_pb2.DeleteGroupRequest(group=group)))
        return response.deleted

    async def dead_letters(self, group: str, *, page_size: int = 0) -> AsyncIterator[admin_pb2.DeadLetter]:
        """A group's dead letters, oldest first, following page tokens."""
        check_text("dead_letters group", group)
        token = ""
        while True:
            response = await self._call(
                lambda: self.admin_stub.ListDeadLetters(
                    admin_pb2.ListDeadLettersRequest(group=group, page_size=page_size, page_token=token)
                )
            )
            for dead_letter in response.dead_letters:
                yield dead_letter
            token = response.next_page_token
            if not token:
                return

    async def redrive_dead_letters(self, group: str, sequences: Iterable[int] = (), *, all: bool = False) -> int:
        """Sends dead letters (by sequence, or ``all``) back to their group, and only to it; returns how many."""
        check_text("redrive_dead_letters group", group)
        response = await self._call(
            lambda: self.admin_stub.RedriveDeadLetters(
                admin_pb2.RedriveDeadLettersRequest(group=group, sequences=list(sequences), all=all)
            )
        )
        return response.redriven

    async def list_event_types(self) -> list[admin_pb2.EventTypeInfo]:
        """The event types stored so far that the caller may administer, by name, with counts and
        sequence ranges; every page."""
        types: list[admin_pb2.EventTypeInfo] = []
        token = ""
        while True:
            request = admin_pb2.ListEventTypesRequest(page_token=token)
            response = await self._call(lambda: self.admin_stub.ListEventTypes(request))
            types.extend(response.types)
            token = response.next_page_token
            if not token:
                return types


async def _wait_ready(channel: grpc.aio.Channel, timeout: float) -> None:
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except asyncio.TimeoutError:
        state = channel.get_state(try_to_connect=False)
        raise UnavailableError(
            grpc.StatusCode.UNAVAILABLE, f"could not connect within {timeout}s (channel {state.name})"
        ) from None

