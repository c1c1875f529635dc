"""Replay: stored history as an async iterator that follows resume tokens."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from ._errors import ClosedError, NerveError, TokenExpiredError, from_rpc_error
from ._proto.nerve.v1 import event_bus_pb2, event_pb2

__all__ = ["Replay"]


class Replay:
    """A replay of stored history, in sequence order.

    Iterate it for events (``async for event in client.replay(...)``) or :meth:`pages` for whole pages. After
    each page :attr:`resume_token` continues right after it: pass it to a later ``replay(resume_token=...)``.
    If the stream breaks mid-way with UNAVAILABLE, or ends with :class:`TokenExpiredError` (the token it
    was opened with expired), the replay reopens it from the last token, up to ``max_resumes`` times in a
    row (a page received starts the count again), so no event is skipped or repeated. Credentials that
    refresh bring a fresh token to the reopened call; a static token that has expired is refused again,
    and that refusal is raised: a second :class:`TokenExpiredError` with no page between is not retried.
    A stream that breaks after the last page (:attr:`end_of_history`, or ``limit`` reached) ends the
    replay cleanly: nothing was left to read. Iterate a Replay once.

    :meth:`aclose` stops the replay from any task: an iteration waiting for a page, or backing off before
    it reopens the stream, ends cleanly (it raises no CancelledError), and nothing is reopened after it.
    Closing the client instead ends it with :class:`ClosedError`.
    """

    def __init__(
        self,
        stub: Any,
        request: event_bus_pb2.ReplayRequest,
        *,
        max_resumes: int = 3,
        client_closed: Callable[[], bool] = lambda: False,
    ) -> None:
        self._stub = stub
        self._request = request
        self._max_resumes = max_resumes
        #: Whether the client was closed: its calls then fail with ClosedError, not CancelledError.
        self._client_closed = client_closed
        self._started = False
        self._call: Any = None
        #: Set by aclose(): the iteration ends, and no call is opened after it.
        self._stopped = asyncio.Event()
        #: Continues after the last page received; empty before the first page.
        self.resume_token: str = request.resume_token
        #: True once the server said no more stored events match.
        self.end_of_history = False
        #: Events received so far.
        self.count = 0

    async def pages(self) -> AsyncIterator[event_bus_pb2.ReplayResponse]:
        """The pages of the replay, as the server sends them."""
        if self._started:
            raise RuntimeError("a Replay can be iterated once; start another with client.replay(...)")
        self._started = True
        request = event_bus_pb2.ReplayRequest()
        request.CopyFrom(self._request)
        limit = request.limit
        failures = 0
        expired = False  # a failure since the last page was an expired token
        while not self._stopped.is_set():
            if self._client_closed():  # a closed channel refuses to make the call at all
                raise ClosedError("the client is closed")
            call = self._call = self._stub.Replay(request)
            try:
                async for page in call:
                    failures, expired = 0, False
                    self.resume_token = page.resume_token
                    self.end_of_history = page.end_of_history
                    self.count += len(page.events)
                    yield page
                return
            except asyncio.CancelledError:
                # grpc.aio raises CancelledError from a call cancelled on this side: aclose() did that, and
                # ends the iteration; a cancelled task still raises
                if self._stopped.is_set() and not _cancelling():
                    return
                # or the client's close did: the replay did not end, and says so as every call does then
                if self._client_closed() and not _cancelling():
                    raise ClosedError("the client was closed with the replay in flight") from None
                raise
            except grpc.RpcError as e:
                if self._stopped.is_set():
                    return  # the call's end after aclose() cancelled it
                left = limit - self.count if limit else 0
                if self.end_of_history or (limit and left <= 0):
                    return  # after the last page only the server's OK was missing
                error = from_rpc_error(e)
                token_expired = isinstance(error, TokenExpiredError)
                if not _resumable(error) or (token_expired and expired) or failures >= self._max_resumes:
                    raise error from e
                expired = expired or token_expired
                failures += 1
                # back off before reconnecting; aclose() ends the wait, and the loop with it
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), _resume_backoff(failures))
                request.resume_token = self.resume_token
                request.limit = left
            finally:
                call.cancel()

    async def events(self) -> AsyncIterator[event_pb2.Event]:
        """The events of the replay, one at a time."""
        async for page in self.pages():
            for e in page.events:
                yield e

    def __aiter__(self) -> AsyncIterator[event_pb2.Event]:
        return self.events()

    async def aclose(self) -> None:
        """Stops the replay early (breaking out of the iteration leaves the stream to the garbage collector).

        An iteration in another task ends cleanly: the page it waits for, or its backoff before reopening,
        ends, and no call is opened after this. Iterating a stopped replay yields nothing more.
        """
        self._stopped.set()
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> Replay:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def collect(self) -> list[event_pb2.Event]:
        """All events of the replay as a list (for small histories)."""
        return [e async for e in self.events()]


if sys.version_info >= (3, 11):

    def _cancelling() -> bool:
        """Whether the running task is being cancelled (and not only the call it awaited)."""
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

else:

    def _cancelling() -> bool:
        """Python 3.10 does not tell a task's own cancellation from a cancelled call's CancelledError: after
        aclose() it is taken for the call's, so a task cancelled at that very moment ends its iteration
        instead of raising."""
        return False


def _resumable(error: NerveError) -> bool:
    """Whether a replay that ended with ``error`` is reopened from its last resume token: the connection
    broke or the server is going away (UNAVAILABLE), or the call's token expired (a refreshing credential
    brings a fresh one)."""
    return error.code == grpc.StatusCode.UNAVAILABLE or isinstance(error, TokenExpiredError)


_MAX_RESUME_BACKOFF = 5.0
"""Longest wait before a reopening, in seconds: a server back after a restart is used within it, whatever
``max_resumes`` allows."""


def _resume_backoff(failures: int) -> float:
    """The wait before the ``failures``-th reopening in a row: 0.2 s, doubling, at most
    :data:`_MAX_RESUME_BACKOFF`."""
    return min(0.1 * float(2 ** min(failures, 6)), _MAX_RESUME_BACKOFF)
