"""Subscriptions: one bidirectional Subscribe stream, read by a background task into a bounded inbox and
written by another from an outbox."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any, Union

import grpc

from ._errors import ClosedError, DeadlineExceededError, NerveError, UnavailableError, from_rpc_error
from ._events import Seconds, check_text, data_of, duration, seconds
from ._proto.nerve.v1 import event_bus_pb2, event_pb2

if TYPE_CHECKING:
    from google.protobuf import any_pb2, duration_pb2

__all__ = ["CaughtUp", "Delivery", "Heartbeat", "Message", "Subscription"]

CaughtUp = event_bus_pb2.CaughtUp
Heartbeat = event_bus_pb2.Heartbeat

#: How long :meth:`Subscription.close` waits, by default, for the server to end the stream after the Close
#: message before it cancels the call. Settling what was sent before it takes a round trip and a write to
#: disk, milliseconds when all is well: seconds leave room for a loaded server and still bound a shutdown.
_CLOSE_TIMEOUT = 5.0

#: The default heartbeat timeout, in heartbeat intervals: one late heartbeat is no proof of a dead connection.
_HEARTBEATS_MISSED = 3

#: The window of a subscription that asks for none, until the server confirms the one in effect on open (an
#: older server that confirms none tells it in heartbeats).
_DEFAULT_WINDOW = 64
# what protobuf cannot encode as UTF-8 in a str
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

#: Deliveries read beyond the window and not taken by a reader yet, at most: past that the pump stops reading,
#: so that a reader that falls behind holds the server back by HTTP/2 flow control. The server sends no more
#: than the window while its leases hold, so what comes beyond are copies a group handed out again (attempt
#: + 1) after their ack deadline passed, the first copy still unread here: unbounded, they would pile up for
#: as long as the reader lags.
_BEYOND_WINDOW = 16


class Delivery:
    """One event handed to this subscriber; settle it with :meth:`ack`, :meth:`nack` or :meth:`dead_letter`."""

    __slots__ = ("_subscription", "ack_deadline", "attempt", "delivery_id", "event")

    def __init__(self, subscription: Subscription, delivery: event_bus_pb2.Delivery) -> None:
        self._subscription = subscription
        self.event: event_pb2.Event = delivery.event
        self.delivery_id: str = delivery.delivery_id
        #: 1 on first delivery, then counts redeliveries.
        self.attempt: int = delivery.attempt
        #: When a group redelivers this unless it is acked; None on private streams.
        self.ack_deadline: datetime | None = (
            delivery.ack_deadline.ToDatetime(tzinfo=timezone.utc) if delivery.HasField("ack_deadline") else None
        )

    @property
    def sequence(self) -> int:
        """The event's global sequence (its replay and resume position)."""
        return self.event.sequence

    @property
    def reply_to(self) -> str:
        """The inbox of a request; pass the delivery to :meth:`nerve_client.Client.reply`."""
        return self.event.reply_to

    @property
    def data(self) -> bytes | str | any_pb2.Any | None:
        """The event's payload (see :func:`nerve_client.data_of`)."""
        return data_of(self.event)

    async def ack(self) -> None:
        """Settles the delivery as processed."""
        await self._subscription.ack(self)

    async def nack(self, delay: Seconds = 0) -> None:
        """Settles the delivery as failed; a group redelivers it after ``delay`` (attempt + 1). On a private
        stream it only frees the window slot: there is no redelivery."""
        await self._subscription.nack(self, delay=delay)

    async def dead_letter(self, reason: str = "") -> None:
        """Settles the delivery as failed for good: a group parks it as a dead letter with ``reason``. On a
        private stream it only frees the window slot: nothing is parked."""
        await self._subscription.dead_letter(self, reason=reason)

    async def extend(self, by: Seconds) -> None:
        """Moves the ack deadline to ``by`` from now (groups only); a zero or negative ``by`` raises ValueError."""
        await self._subscription.extend(self, by=by)

    def __repr__(self) -> str:
        return (
            f"Delivery(id={self.event.id!r}, type={self.event.type!r}, sequence={self.sequence}, "
            f"attempt={self.attempt}, delivery_id={self.delivery_id!r})"
        )


#: What :meth:`Subscription.messages` yields.
Message = Union[Delivery, event_bus_pb2.CaughtUp, event_bus_pb2.Heartbeat]

DeliveryRef = Union[Delivery, str]


class _End:
    __slots__ = ("error",)

    def __init__(self, error: NerveError | None) -> None:
        self.error = error


class _DoneWriting:
    """Queued after the last message: the writer half-closes the stream when it gets here."""


class _Inbox:
    """What the pump read and no reader took yet, in order, then the stream's end (an :class:`_End`).

    The pump waits for :meth:`room` before each read: it reads on while at most the window and
    ``_BEYOND_WINDOW`` more deliveries are unread. Up to the window it always reads on, as grpcio's asyncio
    layer keeps the stream's status until every message before it was read, and a send that fails on a
    stream the server ended sets the call's status to INTERNAL ("Internal error from Core") and drops those
    messages: a reader behind by its window, as one working through a backlog is, still gets every delivery
    and the server's own status. Heartbeats and the caught-up marker do not count: one comes per heartbeat
    interval at most. The bound goes when a send found the stream ended (:meth:`unbound`): the sender waits
    for its status while the reader may be waiting for the sender. Once closed, the inbox drops what the pump
    reads, so that the pump reads on and the server's end after the Close message gets through.
    """

    def __init__(self, window: int) -> None:
        self._items: asyncio.Queue[Any] = asyncio.Queue()
        self._deliveries = 0  # unread, among the items
        self._window = window
        self._taken = asyncio.Event()
        self._bounded = True
        self._closed = False

    async def room(self) -> None:
        """Returns once the pump may read another message."""
        while self._bounded and self._deliveries >= self._window + _BEYOND_WINDOW:
            self._taken.clear()
            await self._taken.wait()

    def put(self, item: Any) -> None:
        """Queues a message, or the end, for the reader (dropped once closed)."""
        if self._closed:
            return
        kind = None if isinstance(item, _End) else item.WhichOneof("message")
        if kind == "delivery":
            self._deliveries += 1
        elif kind == "heartbeat":  # the window in effect, when it is wider than this side knows
            self.widen(item.heartbeat.in_flight + item.heartbeat.credits - self._window)
        self._items.put_nowait(item)

    async def get(self) -> Any:
        """The next message, or the end, waiting for it; the end stays for every reader after."""
        return self._took(await self._items.get())

    def get_nowait(self) -> Any:
        """The next message, or the end, when one is queued; raises :class:`asyncio.QueueEmpty` otherwise."""
        return self._took(self._items.get_nowait())

    def _took(self, item: Any) -> Any:
        """Counts ``item`` as taken by a reader, and returns it."""
        if isinstance(item, _End):
            self._items.put_nowait(item)  # several tasks may read one subscription: each gets the end
        elif item.WhichOneof("message") == "delivery":
            self._deliveries -= 1
        self._taken.set()
        return item

    def window_is(self, window: int) -> None:
        """The window the server confirmed on open (0 from an older server, which confirms none)."""
        if window > 0:
            self._window = window
            self._taken.set()

    def widen(self, credits: int) -> None:
        """Counts ``credits`` more deliveries the server may have outstanding with this subscriber."""
        if credits > 0:
            self._window += credits
            self._taken.set()

    def unbound(self) -> None:
        """Lets the pump read on without a reader taking anything."""
        self._bounded = False
        self._taken.set()

    def close(self) -> None:
        """Drops what is unread, wakes a reader waiting now with the end, and drops what comes later."""
        self.unbound()
        while not self._items.empty():
            self._items.get_nowait()
        self._items.put_nowait(_End(None))
        self._closed = True


_Outgoing = Union[event_bus_pb2.SubscribeRequest, _DoneWriting]


class Subscription:
    """An open Subscribe stream.

    Iterate it (``async for delivery in sub``) for deliveries; heartbeats are consumed and the caught-up marker
    is recorded in :attr:`caught_up` on the way. :meth:`messages` yields every message instead. Iteration ends
    when the stream ends cleanly; a stream that fails raises the mapped :class:`NerveError`.

    Settling and steering (:meth:`ack`, :meth:`nack`, ...) is safe from many tasks at once: one writer task
    sends their messages in order. Cancelling a task while it waits for its message to be written only stops
    its wait; the message is still sent and the stream goes on.

    :meth:`close` (or leaving ``async with``) ends the stream gracefully: the server settles everything sent
    before it, so the last acks are not lost; it raises when the stream does not end so (an error, no end in
    time). Leaving ``async with`` by a cancellation (any BaseException that is no Exception) closes with
    ``timeout=0`` instead: the call is cancelled at once, and acks still on their way may come back.

    A connection that dies silently (no FIN, no RST) is noticed by the heartbeat timeout: when the server sends
    nothing for that long (heartbeats come at least every heartbeat interval), the call is cancelled and the
    stream ends with :class:`UnavailableError` after the messages already received.
    """

    def __init__(
        self,
        call: Any,
        subscribed: event_bus_pb2.Subscribed,
        inbox: _Inbox,
        pump: asyncio.Task[None],
        stream_end: asyncio.Future[NerveError | None],
    ) -> None:
        self._call = call
        self._inbox = inbox
        self._pump = pump
        #: Set by the pump when the stream ends: the error it ended with, None after a clean end.
        self._stream_end = stream_end
        #: Messages to send, each with the future its sender waits on, written in order by the writer task.
        self._outbox: asyncio.Queue[tuple[_Outgoing, asyncio.Future[None]]] = asyncio.Queue()
        self._writer = asyncio.get_running_loop().create_task(self._write())
        # once the stream ended nothing more can be written: the writer stops, and what it had left fails
        stream_end.add_done_callback(lambda _: self._stop_writer())
        self._closed = False
        self._half_closed = False
        self._ended: _End | None = None
        #: What close() raises, every time, once set: the stream did not end as the Close message asks.
        self._close_error: NerveError | None = None
        #: Whether reading or sending already gave the application how the stream ended.
        self._end_seen = False
        self.subscribed = subscribed
        #: Sequence of the caught-up marker once it arrived: history is delivered, live delivery goes on.
        self.caught_up_sequence: int | None = None
        #: The last heartbeat seen.
        self.last_heartbeat: event_bus_pb2.Heartbeat | None = None
        #: Heartbeats seen so far (the server's signal that it has nothing to deliver).
        self.heartbeats = 0

    @classmethod
    async def _open(
        cls,
        stub: Any,
        request: event_bus_pb2.SubscriptionOpen,
        open_timeout: float,
        heartbeat_timeout: Seconds | None = None,
    ) -> Subscription:
        call = stub.Subscribe()
        inbox = _Inbox(request.max_in_flight or _DEFAULT_WINDOW)
        loop = asyncio.get_running_loop()
        stream_end: asyncio.Future[NerveError | None] = loop.create_future()
        asked = request.heartbeat_interval if request.HasField("heartbeat_interval") else None
        pump = loop.create_task(_pump(call, inbox, stream_end, lambda s: _watchdog(s, asked, heartbeat_timeout)))
        try:
            try:
                await call.write(event_bus_pb2.SubscribeRequest(open=request))
            except grpc.RpcError:
                pass  # the stream failed already: the pump reports its status
            except asyncio.InvalidStateError:
                pass
            try:
                first = await asyncio.wait_for(inbox.get(), open_timeout)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                raise TimeoutError(f"the server did not confirm the subscription within {open_timeout:g}s") from None
        except BaseException:
            call.cancel()
            pump.cancel()
            raise
        if isinstance(first, _End):
            pump.cancel()
            raise first.error or NerveError(grpc.StatusCode.UNKNOWN, "stream ended before it was subscribed")
        if first.WhichOneof("message") != "subscribed":
            call.cancel()
            pump.cancel()
            raise NerveError(grpc.StatusCode.INTERNAL, f"expected subscribed first, got {first.WhichOneof('message')}")
        inbox.window_is(first.subscribed.max_in_flight)  # the server's default when none was asked for
        return cls(call, first.subscribed, inbox, pump, stream_end)

    # --- what the server said -------------------------------------------------------------------------------

    @property
    def subscription_id(self) -> str:
        return self.subscribed.subscription_id

    @property
    def group(self) -> str:
        return self.subscribed.group

    @property
    def head_sequence(self) -> int:
        """Sequence the store had committed when the subscription opened."""
        return self.subscribed.head_sequence

    @property
    def caught_up(self) -> bool:
        """True once the caught-up marker was read: every stored match was delivered, the rest is live."""
        return self.caught_up_sequence is not None

    # --- reading --------------------------------------------------------------------------------------------

    async def next_message(self, timeout: Seconds | None = None) -> Message | None:
        """The next message of any kind, or None once the stream ended cleanly.

        Raises :class:`TimeoutError` if nothing arrives within ``timeout`` seconds (the stream stays usable;
        with 0, or less, a message already received is still returned) and :class:`NerveError` if the stream
        failed (:class:`UnavailableError` when the heartbeat timeout took the connection for dead). After
        :meth:`close` it returns None: what is still queued, or arrives while the stream ends, is discarded
        (the server releases it).
        """
        if self._closed:
            return None
        if self._ended is not None:
            self._finish()
            return None
        if timeout is None:
            item = await self._inbox.get()
        else:
            wait = _secs(timeout)
            try:
                if wait <= 0:
                    # no time left: what is queued still counts, and wait_for(..., 0) would not look at it
                    item = self._inbox.get_nowait()
                else:
                    item = await asyncio.wait_for(self._inbox.get(), wait)
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                raise TimeoutError(f"no message from the subscription within {max(wait, 0.0):g}s") from None
        if isinstance(item, _End):
            self._ended = item
            self._finish()
            return None
        if self._closed:  # closed while this reader waited
            return None
        kind = item.WhichOneof("message")
        if kind == "delivery":
            return Delivery(self, item.delivery)
        if kind == "caught_up":
            self.caught_up_sequence = item.caught_up.sequence
            return item.caught_up  # type: ignore[no-any-return]
        if kind == "heartbeat":
            self.heartbeats += 1
            self.last_heartbeat = item.heartbeat
            return item.heartbeat  # type: ignore[no-any-return]
        return await self.next_message(timeout)  # an unknown kind from a newer server: skip it

    def _finish(self) -> None:
        """Raises the error the stream ended with, unless this side closed it."""
        assert self._ended is not None
        self._end_seen = True
        if self._ended.error is not None and not self._closed:
            raise self._ended.error

    async def next(self, timeout: Seconds | None = None) -> Delivery:
        """The next delivery (skipping heartbeats, recording caught-up).

        Raises :class:`TimeoutError` when none arrives within ``timeout``, :class:`ClosedError` when the stream
        ended cleanly, :class:`NerveError` when it failed.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + _secs(timeout)
        while True:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            message = await self.next_message(left)
            if message is None:
                raise ClosedError("the subscription stream ended")
            if isinstance(message, Delivery):
                return message

    def messages(self) -> AsyncIterator[Message]:
        """Every message in order: deliveries, heartbeats and the caught-up marker."""

        async def gen() -> AsyncIterator[Message]:
            while (message := await self.next_message()) is not None:
                yield message

        return gen()

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self

    async def __anext__(self) -> Delivery:
        while True:
            message = await self.next_message()
            if message is None:
                raise StopAsyncIteration
            if isinstance(message, Delivery):
                return message

    async def until_caught_up(
        self, timeout: Seconds | None = None, *, into: list[Delivery] | None = None
    ) -> list[Delivery]:
        """Reads until the caught-up marker and returns the deliveries before it (unsettled).

        With a window of ``max_in_flight`` deliveries, settle them as they come instead when the backlog may be
        larger than the window; this is for small backlogs. ``timeout`` bounds the whole wait. Each delivery is
        appended to ``into`` as it is read, and ``into`` is what is returned (a new list when None): when this
        raises (:class:`TimeoutError`, :class:`ClosedError` when the stream ended first, the stream's
        :class:`NerveError`), the deliveries read before are there, unsettled, holding their window slots.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + _secs(timeout)
        # the caller's list, so that what was read is not lost with the return value when this raises
        out: list[Delivery] = [] if into is None else into
        while not self.caught_up:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            message = await self.next_message(left)
            if message is None:
                raise ClosedError("the subscription stream ended before it caught up")
            if isinstance(message, Delivery):
                out.append(message)
        return out

    # --- settling and steering ------------------------------------------------------------------------------

    # Naming no delivery sends nothing, so ``await sub.ack(*history)`` works for an empty history too.

    async def ack(self, *deliveries: DeliveryRef) -> None:
        """Settles deliveries as processed (none: does nothing)."""
        if ids := _ids(deliveries):
            await self._send(event_bus_pb2.SubscribeRequest(ack=event_bus_pb2.Ack(delivery_ids=ids)))

    async def nack(self, *deliveries: DeliveryRef, delay: Seconds = 0) -> None:
        """Settles deliveries as failed: a group redelivers them after ``delay`` (zero: at once); a private
        stream only frees their window slots. None: does nothing."""
        retry_delay = duration(delay)
        if ids := _ids(deliveries):
            nack = event_bus_pb2.Nack(delivery_ids=ids, retry_delay=retry_delay)
            await self._send(event_bus_pb2.SubscribeRequest(nack=nack))

    async def dead_letter(self, *deliveries: DeliveryRef, reason: str = "") -> None:
        """Settles deliveries as failed for good: a group dead-letters them now, with ``reason``; a private
        stream only frees their window slots. None: does nothing. A lone surrogate in ``reason``, which
        protobuf cannot encode, becomes U+FFFD, as does each invalid sequence of a ``reason`` given as UTF-8
        bytes (as protobuf takes text); None is no reason."""
        check_text("dead_letter reason", reason)  # first, as nack and extend check theirs: even with no delivery
        if ids := _ids(deliveries):
            # a reason is what a failing consumer had at hand (bad input's text, say): refusing it would
            # raise while the consumer handles a failure, and the server takes any reason
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            reason = _LONE_SURROGATE.sub("\ufffd", reason or "")
            nack = event_bus_pb2.Nack(delivery_ids=ids, dead_letter=True, reason=reason)
            await self._send(event_bus_pb2.SubscribeRequest(nack=nack))

    async def extend(self, *deliveries: DeliveryRef, by: Seconds) -> None:
        """Moves the ack deadline of deliveries to ``by`` from now (groups only; a private stream has none).
        ``by`` must be positive: zero or negative raises ValueError. None: does nothing."""
        # the server refuses a zero extension by ending the whole stream
        extension = duration(by, positive=True)
        if ids := _ids(deliveries):
            extend = event_bus_pb2.ExtendDeadline(delivery_ids=ids, extension=extension)
            await self._send(event_bus_pb2.SubscribeRequest(extend=extend))

    async def credit(self, credits: int) -> None:
        """Widens the window: the server may send ``credits`` more deliveries (a uint32: 0 to 2**32 - 1)."""
        # built first: a count protobuf refuses (ValueError, TypeError) must not widen the read-ahead
        request = event_bus_pb2.SubscribeRequest(credit=event_bus_pb2.Credit(credits=credits))
        self._inbox.widen(credits)  # before sending: the server may send them as soon as it reads the message
        await self._send(request)

    async def set_filter(self, filter: event_pb2.Filter | None) -> None:
        """Replaces the server-side filter (for a group: the group's filter); None clears it."""
        set_filter = event_bus_pb2.SetFilter(filter=filter) if filter is not None else event_bus_pb2.SetFilter()
        await self._send(event_bus_pb2.SubscribeRequest(set_filter=set_filter))

    async def _send(self, request: event_bus_pb2.SubscribeRequest) -> None:
        """Sends ``request`` through the writer task and waits until it is written.

        Raises :class:`ClosedError` once this side closed or half-closed the stream, and the error the server
        ended the stream with once it did (e.g. :class:`NotFoundError` after the group was deleted).
        """
        if self._closed:
            raise ClosedError()
        if self._half_closed:
            raise ClosedError("the subscription is half-closed: nothing more can be sent")
        try:
            if self._stream_end.done():
                raise self._end_error()
            await self._enqueue(request)
        except NerveError:
            # the end, told here to a sender still waiting: close() need not tell it again (a failed
            # write of a stream still open is not its end)
            if self._stream_end.done():
                self._end_seen = True
            raise

    def _enqueue(self, item: _Outgoing) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox.put_nowait((item, waiter))
        return waiter

    async def _write(self) -> None:
        """Writes the outbox in order, settling each sender's future.

        The writes happen here, never in a sender's task: grpc.aio cancels the whole call when a write is
        cancelled, so a sender cancelled mid-ack would end the stream for every task using it.
        """
        while True:
            item, waiter = await self._outbox.get()
            try:
                error = await self._write_one(item)
            except asyncio.CancelledError:  # the stream ended or was closed
                _settle(waiter, self._end_error())
                raise
            _settle(waiter, error)

    async def _write_one(self, item: _Outgoing) -> NerveError | None:
        """Writes one message; returns what its sender raises (None: written)."""
        try:
            if isinstance(item, _DoneWriting):
                await self._call.done_writing()
            else:
                await self._call.write(item)
        except (grpc.RpcError, asyncio.InvalidStateError):
            # the stream has ended (writing to it raises InvalidStateError): the pump reads why, after the
            # messages still unread, so it must not wait for a reader to take them (that reader may be waiting
            # for this very send)
            self._inbox.unbound()
            await asyncio.wait([self._stream_end])
            return self._end_error()
        except Exception as e:
            return NerveError(grpc.StatusCode.UNKNOWN, f"subscription stream write failed: {e!r}")
        return None

    def _end_error(self) -> NerveError:
        """What sending raises once the stream ended: the error the server ended it with, as reading raises."""
        if self._closed:
            return ClosedError()
        error = self._stream_end.result() if self._stream_end.done() else None
        return error or ClosedError("the subscription stream ended")

    def _stop_writer(self) -> None:
        """Cancels the writer and fails the messages it had not taken yet (it takes no more once cancelled)."""
        self._writer.cancel()
        while not self._outbox.empty():
            _, waiter = self._outbox.get_nowait()
            _settle(waiter, self._end_error())

    # --- closing --------------------------------------------------------------------------------------------

    async def done_writing(self) -> None:
        """Half-closes after the messages already sent: later sends raise :class:`ClosedError`, deliveries
        keep coming until :meth:`close`."""
        if self._closed or self._half_closed or self._stream_end.done():
            return
        self._half_closed = True
        # a stream that has ended has nothing left to half-close
        with contextlib.suppress(NerveError):
            await self._enqueue(_DoneWriting())

    async def close(self, timeout: Seconds = _CLOSE_TIMEOUT) -> None:
        """Ends the stream gracefully, then cancels the call.

        Sends a Close message behind everything already sent or queued: the server settles all of that (the
        last acks are saved), hands back what is still unacked (a group redelivers it at once, counting an
        attempt) and ends the stream. ``close`` waits up to ``timeout`` seconds (5 by default) for that end,
        then cancels the call in any case, so it never hangs. It returns once the server ended the stream
        with OK; it raises :class:`DeadlineExceededError` when no end came within ``timeout``, and the stream's
        :class:`NerveError` when it ended with one (:class:`UnavailableError` from the heartbeat timeout, ...):
        then settlements sent just before may not have been saved, and come back as redeliveries.

        A ``timeout`` of 0, or a stream half-closed by :meth:`done_writing`, skips the Close message and
        cancels at once: the server still handles what reached it before the cancel, but a message still on
        its way is lost (an ack lost so comes back as a redelivery): there is no end to wait for. Closing a
        stream that had already ended returns when reading or sending already raised how it ended, and
        raises the error it ended with otherwise, whenever that end came.

        Later sends raise :class:`ClosedError`, as do queued messages the stream ended before writing.
        Reading returns the end at once: deliveries still queued or arriving meanwhile are discarded (the
        server releases them). Closing again, or from several tasks, waits for the same end and raises the
        same. Cancelling the closing task cancels the call at once and raises in that task (later closes
        raise :class:`ClosedError`).
        """
        wait = seconds(timeout)
        if wait < 0:
            raise ValueError(f"negative timeout {timeout}")
        if not self._closed:
            self._closed = True
            self._inbox.close()  # wakes a reader waiting now; the pump reads on to the end, dropping
            try:
                if wait > 0 and not self._half_closed and not self._stream_end.done():
                    # behind whatever is queued: the writer sends it last, and the server settles all before it
                    sent = self._enqueue(event_bus_pb2.SubscribeRequest(close=event_bus_pb2.Close()))
                    sent.add_done_callback(_retrieve)  # nobody awaits it: the stream's end is what counts
                    await asyncio.wait([self._stream_end], timeout=wait)
                    self._close_error = self._close_outcome(wait)
                elif self._stream_end.done() and not self._end_seen:
                    # it ended before, and nothing told the application how: an error end is told now,
                    # whenever it came
                    self._close_error = self._stream_end.result()
            except asyncio.CancelledError:
                self._close_error = ClosedError("closing was cancelled: the call was cancelled before the stream ended")
                raise
            finally:
                self._call.cancel()
                self._pump.cancel()
                self._stop_writer()
        # asyncio.wait neither raises the tasks' own cancellation nor swallows one of the task closing
        await asyncio.wait([self._pump, self._writer])
        if self._close_error is not None:
            raise self._close_error

    def _close_outcome(self, waited: float) -> NerveError | None:
        """What close() raises once it waited ``waited`` seconds for the end: None after an end with OK."""
        if not self._stream_end.done():
            return DeadlineExceededError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the server did not end the subscription within {waited:g}s of the Close message; "
                "settlements sent just before may come back",
            )
        return self._stream_end.result()

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            await self.close()  # graceful, and raising, as close() is
            return
        # an error of the body still gets the graceful close (its acks saved); a task being cancelled (or
        # interrupted) must end now, not after the server's end, which a silent connection never brings
        timeout = _CLOSE_TIMEOUT if isinstance(exc, Exception) else 0
        # the body's exception is the one to see: how the stream ended after it would only hide it
        with contextlib.suppress(NerveError):
            await self.close(timeout)

    def __repr__(self) -> str:
        return f"Subscription(id={self.subscription_id!r}, group={self.group!r}, caught_up={self.caught_up})"


async def _pump(
    call: Any,
    inbox: _Inbox,
    stream_end: asyncio.Future[NerveError | None],
    watchdog: Callable[[event_bus_pb2.Subscribed], tuple[float, str] | None],
) -> None:
    """Reads the stream into the inbox so that a reader's timeout never cancels the call itself; when the
    stream ends, queues its end and sets ``stream_end`` to the error it ended with (None: cleanly).

    Each read waits for room in the inbox first, so a reader that falls behind by more than its window holds
    the server back (HTTP/2 flow control) instead of this side buffering without bound. Once the confirmation arrived, ``watchdog``
    says how long each read may wait (the heartbeat timeout) and what the stream ends with when one waits
    longer. That timer runs only while the read waits on the network, never while the pump waits for room:
    a reader slow to take the next message is no sign of a dead connection.
    """
    error: NerveError | None = None
    watch: tuple[float, str] | None = None  # none before the confirmation: the open's own timeout bounds that
    try:
        while True:
            await inbox.room()
            if watch is None:
                message = await call.read()
            else:
                timeout, silence = watch
                try:
                    message = await _read_within(call, timeout)
                except asyncio.TimeoutError:
                    call.cancel()  # cancelling the read did already; this says so
                    error = UnavailableError(grpc.StatusCode.UNAVAILABLE, silence)
                    return
            if message is grpc.aio.EOF:
                return
            if message.WhichOneof("message") == "subscribed":
                watch = watchdog(message.subscribed)
            inbox.put(message)
    except grpc.RpcError as e:
        error = from_rpc_error(e)
    except asyncio.CancelledError:
        error = ClosedError()
        raise
    except Exception as e:
        error = NerveError(grpc.StatusCode.UNKNOWN, f"subscription stream failed: {e!r}")
    finally:  # never leave a reader waiting on an inbox nobody fills, nor a writer on an end nobody sets
        inbox.put(_End(error))
        if not stream_end.done():
            stream_end.set_result(error)


if sys.version_info >= (3, 11):

    async def _read_within(call: Any, timeout: float) -> Any:
        """The call's next message, or TimeoutError after ``timeout`` seconds; a timer on this task, not
        a task per message as ``wait_for`` makes before Python 3.12."""
        async with asyncio.timeout(timeout):
            return await call.read()

else:

    async def _read_within(call: Any, timeout: float) -> Any:
        """The call's next message, or TimeoutError after ``timeout`` seconds."""
        return await asyncio.wait_for(call.read(), timeout)


def _watchdog(
    subscribed: event_bus_pb2.Subscribed, asked: duration_pb2.Duration | None, heartbeat_timeout: Seconds | None
) -> tuple[float, str] | None:
    """The heartbeat timeout of a subscription and the message its stream ends with when it expires; None: no
    watchdog. The interval in effect is the one the server confirms, else the one asked for (an older server
    confirms none); unknown, the default is no watchdog."""
    interval = subscribed.heartbeat_interval if subscribed.HasField("heartbeat_interval") else asked
    every = interval.ToTimedelta().total_seconds() if interval is not None else 0.0
    if heartbeat_timeout is None:
        if every <= 0:
            return None
        timeout = _HEARTBEATS_MISSED * every
    else:
        timeout = seconds(heartbeat_timeout)
        if timeout == 0:
            return None
    due = f" (heartbeats are due every {every:g}s)" if every > 0 else ""
    return timeout, (
        f"no message from the server for {timeout:g}s{due}: the connection is taken for dead; subscribe again"
    )


def _settle(waiter: asyncio.Future[None], error: NerveError | None) -> None:
    if waiter.done():  # its sender stopped waiting
        return
    if error is None:
        waiter.set_result(None)
    else:
        waiter.set_exception(error)


def _retrieve(waiter: asyncio.Future[None]) -> None:
    """Marks the error of a future nobody awaits as seen, so asyncio does not log it."""
    if not waiter.cancelled():
        waiter.exception()


def _ids(deliveries: Iterable[DeliveryRef]) -> list[str]:
    return [d if isinstance(d, str) else d.delivery_id for d in deliveries]


def _secs(value: Seconds) -> float:
    return value if isinstance(value, (int, float)) else value.total_seconds()
