"""Publishers: one PublishStream carrying many publish calls, pipelined, answered in the order sent."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Union

import grpc
import grpc.aio
from google.rpc import status_pb2

from ._errors import ClosedError, DeadlineExceededError, NerveError, from_rpc_error, from_status
from ._events import Seconds, seconds
from ._proto.nerve.v1 import event_bus_pb2, event_bus_pb2_grpc, event_pb2

__all__ = ["Publisher"]

if TYPE_CHECKING:
    _Call = grpc.aio.StreamStreamCall[event_bus_pb2.PublishStreamRequest, event_bus_pb2.PublishStreamResponse]

#: gRPC status codes by number, for the code of a refused request.
_STATUS_CODES: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


class _DoneWriting:
    """Queued after the last request: the writer half-closes the stream when it gets here."""


_Outgoing = Union[event_bus_pb2.PublishStreamRequest, _DoneWriting]


def _refused(error: event_bus_pb2.PublishError) -> NerveError:
    """The exception :meth:`nerve_client.Client.publish` raises for the status a refused request carries."""
    code = _STATUS_CODES.get(error.code, grpc.StatusCode.UNKNOWN)
    if code is grpc.StatusCode.OK:
        # a refusal is never a success, whatever code it carries
        code = grpc.StatusCode.UNKNOWN
    status = status_pb2.Status.FromString(error.details) if error.details else None
    return from_status(code, error.message, status)


class Publisher:
    """An open PublishStream: many :meth:`publish` calls on one stream, without a gRPC call each.

    Safe to share between tasks. Each :meth:`publish` sends one request (one atomic batch) and waits for its
    answer; calls in flight at once are pipelined. The server commits requests in the order they were sent,
    so sequences follow send order, and answers them in that order. A refused request raises like
    :meth:`nerve_client.Client.publish` would and the stream goes on; a broken stream fails every outstanding
    and later call. Close it (``async with``, or :meth:`close`) to wait for outstanding answers; closing raises
    when the stream did not end with OK. Leaving ``async with`` by an exception (a cancellation too) cancels
    the stream instead: calls still outstanding raise :class:`ClosedError`.
    """

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._next_id = 1
        #: Requests sent (or queued to be sent, in the same order) and not answered yet: (request_id, waiter).
        self._waiters: deque[tuple[int, asyncio.Future[event_bus_pb2.PublishStreamResponse]]] = deque()
        self._outbox: asyncio.Queue[_Outgoing] = asyncio.Queue()
        self._closing = False
        #: Why the stream ended, once it did (None while it is open or after a clean end).
        self._failure: NerveError | None = None
        self._ended = False
        self._ended_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write())
        self._reader = loop.create_task(self._read())

    @classmethod
    async def _open(cls, stub: event_bus_pb2_grpc.EventBusAsyncStub) -> Publisher:
        call = stub.PublishStream()
        try:
            # The server answers the opening before it reads any request: response headers when the stream is
            # open; a refusal (unauthenticated, too many open streams) is a response without headers, whose
            # status has ended the call by the time its (empty) initial metadata is read. (Were the status ever
            # to come later, the refusal would fail the first publish instead, as a broken stream does.)
            await call.initial_metadata()
            if call.done():
                await call.read()  # raises the call's status
                raise NerveError(grpc.StatusCode.UNKNOWN, "the publish stream ended as it opened")
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        except BaseException:
            call.cancel()
            raise
        return cls(call)

    # --- publishing -----------------------------------------------------------------------------------------

    async def publish(self, *events: event_pb2.Event) -> list[event_bus_pb2.PublishResult]:
        """Commits the events atomically; one result (id, sequence, duplicate) per event, in order.

        Like :meth:`nerve_client.Client.publish`, on the publisher's stream: a refused request raises the
        same :class:`NerveError` subclass, with the same message, field violations, reason and metadata.
        Raises :class:`ClosedError` once the publisher is closed, and the stream's error once it broke.
        Cancelling a call stops the wait only: the request may still commit.
        """
        if not events:
            raise ValueError("publish needs at least one event")
        self._check_open()
        request = event_bus_pb2.PublishStreamRequest(request_id=self._next_id, events=events)
        self._next_id += 1
        waiter: asyncio.Future[event_bus_pb2.PublishStreamResponse] = asyncio.get_running_loop().create_future()
        # no await between these two: the writer sends in outbox order, so waiters are in send order
        self._waiters.append((request.request_id, waiter))
        self._outbox.put_nowait(request)
        response = await waiter
        if response.WhichOneof("outcome") == "error":
            raise _refused(response.error)
        return list(response.published.results)

    def _check_open(self) -> None:
        if self._closing:
            raise ClosedError("publisher is closed")
        if self._ended:
            raise self._failure or NerveError(grpc.StatusCode.UNKNOWN, "the publish stream has ended")

    @property
    def in_flight(self) -> int:
        """Requests sent (or about to be) and not answered yet."""
        return len(self._waiters)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or the stream ended."""
        return self._closing or self._ended

    # --- the stream -----------------------------------------------------------------------------------------

    async def _write(self) -> None:
        """Sends the outbox in order; a caller's cancellation never interrupts a write (that cancels the call)."""
        try:
            while True:
                item = await self._outbox.get()
                if isinstance(item, _DoneWriting):
                    await self._call.done_writing()
                    return
                await self._call.write(item)
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass  # the stream failed: the reader reports its status
        except Exception as e:  # never leave waiters hanging on a stream nobody writes
            self._fail_stream(NerveError(grpc.StatusCode.UNKNOWN, f"publish stream write failed: {e!r}"))

    async def _read(self) -> None:
        """Hands each answer to the waiter of its request; fails the rest when the stream ends."""
        error: NerveError | None = None
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    break
                assert isinstance(response, event_bus_pb2.PublishStreamResponse)
                if not self._waiters:
                    self._fail_stream(
                        NerveError(
                            grpc.StatusCode.INTERNAL,
                            f"answer to request {response.request_id} with no request outstanding",
                        )
                    )
                    break
                request_id, waiter = self._waiters[0]
                if response.request_id != request_id:
                    self._fail_stream(
                        NerveError(
                            grpc.StatusCode.INTERNAL,
                            f"answer to request {response.request_id} where request {request_id} was next",
                        )
                    )
                    break
                self._waiters.popleft()
                if not waiter.done():  # done: its caller stopped waiting
                    waiter.set_result(response)
        except grpc.RpcError as e:
            error = from_rpc_error(e)
        except asyncio.CancelledError:  # the call was cancelled (by this side, or with the client)
            error = ClosedError("the publish stream was cancelled")
            raise
        except Exception as e:
            error = NerveError(grpc.StatusCode.UNKNOWN, f"publish stream failed: {e!r}")
        finally:
            self._end(error)

    def _fail_stream(self, error: NerveError) -> None:
        """Breaks the stream from this side; the reader then fails every outstanding call with ``error``."""
        if self._failure is None:
            self._failure = error
        self._call.cancel()

    def _end(self, error: NerveError | None) -> None:
        self._ended = True
        if self._failure is None:  # a failure from this side explains the cancellation better than CANCELLED
            self._failure = error
        if self._waiters and self._failure is None:
            self._failure = NerveError(
                grpc.StatusCode.UNKNOWN, f"the publish stream ended with {len(self._waiters)} requests unanswered"
            )
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                assert self._failure is not None
                waiter.set_exception(self._failure)
        self._writer.cancel()
        self._ended_event.set()

    # --- closing --------------------------------------------------------------------------------------------

    async def close(self, timeout: Seconds | None = None) -> None:
        """Ends the send side and waits for the answers to every outstanding call, then the stream's end.

        Later calls raise :class:`ClosedError` at once. Returns once the server ended the stream with OK, every
        call answered; raises the stream's error when it ended with one (the error its calls raise). After
        ``timeout`` (None: no limit) the stream is cancelled, and calls still outstanding and ``close`` raise
        :class:`DeadlineExceededError`; when the task closing it is cancelled, the stream is cancelled and calls
        still outstanding raise :class:`ClosedError`. Closing again raises the same.
        """
        if not self._closing:
            self._closing = True
            self._outbox.put_nowait(_DoneWriting())
        wait = None if timeout is None else seconds(timeout)
        try:
            # an end already there is no wait: wait_for(..., 0) would time out without looking at it
            if not self._ended_event.is_set():
                await asyncio.wait_for(self._ended_event.wait(), wait)
        except asyncio.TimeoutError:
            self._fail_stream(
                DeadlineExceededError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"publisher closed with requests unanswered after {wait:g}s"
                )
            )
            await self._ended_event.wait()
        except asyncio.CancelledError:
            self._fail_stream(ClosedError("publisher closed with requests unanswered"))
            raise
        await asyncio.wait([self._writer])
        # what the calls were told: a caller that closes to know everything was answered learns it here too
        if self._failure is not None:
            raise self._failure

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            await self.close()
            return
        # a task being cancelled (or failing) must not wait for answers a silent connection may never bring:
        # the stream is cancelled, and calls still outstanding raise ClosedError (committed or not)
        if not self._ended:
            self._fail_stream(ClosedError("the publish stream was cancelled: an exception left its block"))
        # the body's exception is the one to see: how the stream ended after it would only hide it
        with contextlib.suppress(NerveError):
            await self.close()

    def __repr__(self) -> str:
        return f"Publisher(in_flight={self.in_flight}, closed={self.closed})"
