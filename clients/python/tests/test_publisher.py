"""Publisher: many publish calls pipelined on one PublishStream, answered in the order sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from nerve_client import (
    AlreadyExistsError,
    Client,
    ClosedError,
    DeadlineExceededError,
    InvalidArgumentError,
    NerveError,
    Publisher,
    ResourceExhaustedError,
    event,
    pb,
)
from nerve_client._proto.nerve.v1 import event_bus_pb2
from nerve_client._publisher import _refused

from .conftest import WAIT, ServerProcess, server_binary
from .test_client import eventually
from .test_scenarios import FreezableProxy, ev

TASKS = 20
CALLS = 25


async def test_publisher_pipelines_concurrent_calls(client: Client) -> None:
    async with client.publisher() as publisher:

        async def task(t: int) -> list[int]:
            sequences = []
            for c in range(CALLS):
                [result] = await publisher.publish(ev(f"t{t}-c{c}", "pipe.x"))
                assert result.id == f"t{t}-c{c}" and not result.duplicate
                sequences.append(result.sequence)
            return sequences

        per_task = await asyncio.wait_for(asyncio.gather(*(task(t) for t in range(TASKS))), WAIT)

        batch = await publisher.publish(ev("b1", "pipe.x"), ev("b2", "pipe.x"))
        assert [r.id for r in batch] == ["b1", "b2"]
        assert batch[1].sequence == batch[0].sequence + 1, "one request is one atomic batch"

    for sequences in per_task:
        assert sequences == sorted(sequences) and len(set(sequences)) == CALLS, "one task's calls commit in order"
    every = [s for sequences in per_task for s in sequences]
    assert len(set(every)) == TASKS * CALLS, "every call got its own sequence"
    types = {t.type: t.count for t in await client.list_event_types()}
    assert types == {"pipe.x": TASKS * CALLS + 2}


async def test_publisher_refused_request_keeps_the_stream(client: Client) -> None:
    async with client.publisher() as publisher:
        [first] = await publisher.publish(ev("same", "refuse.x"))

        typeless = event("//tests", "", "no type")
        with pytest.raises(InvalidArgumentError) as refused:
            await publisher.publish(typeless)
        assert refused.value.violation("events[0].type") is not None, refused.value
        with pytest.raises(InvalidArgumentError) as direct:
            await client.publish(typeless)
        assert str(refused.value) == str(direct.value), "the stream refuses as a Publish call does"
        changed = event("//tests", "refuse.x", "other content", id="same")
        with pytest.raises(AlreadyExistsError):
            await publisher.publish(changed)

        [again] = await publisher.publish(ev("same", "refuse.x"))
        assert again.duplicate and again.sequence == first.sequence
        [later] = await publisher.publish(ev("later", "refuse.x"))
        assert later.sequence > first.sequence and not later.duplicate

        # refused and accepted requests in flight at once: each gets its own answer
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                publisher.publish(ev("mixed-1", "refuse.x")),
                publisher.publish(event("//tests", "", "no type")),
                publisher.publish(ev("mixed-2", "refuse.x")),
                return_exceptions=True,
            ),
            WAIT,
        )
        assert isinstance(outcomes[1], InvalidArgumentError)
        assert [r.id for o in (outcomes[0], outcomes[2]) if isinstance(o, list) for r in o] == ["mixed-1", "mixed-2"]

    with pytest.raises(ValueError):
        await publisher.publish()


async def test_publisher_close_waits_for_outstanding_answers(client: Client) -> None:
    publisher = await client.publisher()
    assert isinstance(publisher, Publisher) and not publisher.closed
    calls = [asyncio.ensure_future(publisher.publish(ev(f"c{i}", "close.x"))) for i in range(50)]
    await asyncio.sleep(0)  # every call is sent (queued in send order) before the close
    assert publisher.in_flight == 50
    await asyncio.wait_for(publisher.close(), WAIT)
    assert publisher.closed and publisher.in_flight == 0
    assert all(call.done() for call in calls), "close returned before every answer"
    results: list[pb.PublishResult] = [r for call in calls for r in call.result()]
    sequences = [r.sequence for r in results]
    assert [r.id for r in results] == [f"c{i}" for i in range(50)]
    assert sequences == sorted(sequences) and len(set(sequences)) == 50, "committed in the order sent"

    with pytest.raises(ClosedError):
        await publisher.publish(ev("too-late", "close.x"))
    await publisher.close()  # closing again is a no-op
    stored = {t.type: t.count for t in await client.list_event_types()}
    assert stored == {"close.x": 50}


async def test_publisher_close_raises_when_the_answers_do_not_come_in_time(server: ServerProcess) -> None:
    async with FreezableProxy(server.addr) as proxy, Client.connect(proxy.addr, ready_timeout=WAIT) as client:
        publisher = await client.publisher()
        await publisher.publish(ev("before", "late.x"))
        proxy.freeze()  # nothing more gets through, nor any answer back
        outstanding = asyncio.ensure_future(publisher.publish(ev("held", "late.x")))
        with pytest.raises(DeadlineExceededError) as info:
            await asyncio.wait_for(publisher.close(timeout=0.5), WAIT)
        assert "unanswered after 0.5s" in info.value.message, info.value
        with pytest.raises(DeadlineExceededError):
            await outstanding
        with pytest.raises(DeadlineExceededError) as again:
            await publisher.close()
        assert again.value is info.value, "closing again raises the same"


class _BodyFailed(Exception):
    """An error of the code in an ``async with`` block, not of the publisher."""


@pytest.mark.parametrize("leaving", ["cancelled", "raising"])
async def test_leaving_the_block_by_an_exception_cancels_the_stream_at_once(
    server: ServerProcess, leaving: str
) -> None:
    async with FreezableProxy(server.addr) as proxy, Client.connect(proxy.addr, ready_timeout=WAIT) as client:
        opened: list[Publisher] = []
        outstanding: list[asyncio.Future[list[pb.PublishResult]]] = []

        async def publish_in_the_block() -> None:
            async with client.publisher() as publisher:
                opened.append(publisher)
                await publisher.publish(ev("before", "left.x"))
                proxy.freeze()  # no answer comes back, nor any end, until keepalive gives up (about 40 s)
                outstanding.append(asyncio.ensure_future(publisher.publish(ev("other", "left.x"))))
                if leaving == "raising":
                    await asyncio.sleep(0.1)  # the request is sent
                    raise _BodyFailed()
                await publisher.publish(ev("held", "left.x"))

        # a caller's deadline cancels the task in the block; bounded, so that a wait for answers fails the test
        leaving_the_block = asyncio.ensure_future(asyncio.wait_for(publish_in_the_block(), 0.5))
        await asyncio.wait([leaving_the_block], timeout=WAIT)
        if not leaving_the_block.done():
            leaving_the_block.cancel()
            pytest.fail("leaving the block waited for answers that the silent connection never brings")
        expected = asyncio.TimeoutError if leaving == "cancelled" else _BodyFailed
        with pytest.raises(expected):
            await leaving_the_block  # the body's exception, not the stream's end
        [publisher] = opened
        assert publisher.closed
        with pytest.raises(ClosedError):  # it may have committed or not: a retry with the same id is safe
            await asyncio.wait_for(outstanding[0], WAIT)
        with pytest.raises(ClosedError):
            await publisher.publish(ev("later", "left.x"))


async def test_closing_a_stream_that_ended_cleanly_with_no_time_left_returns(client: Client) -> None:
    publisher = await client.publisher()
    await publisher.publish(ev("p1", "ended.x"))
    await asyncio.wait_for(publisher.close(), WAIT)  # the server ended the stream with OK
    await publisher.close(timeout=0)  # nothing left to wait for: no deadline to exceed
    await publisher.close()
    with pytest.raises(ClosedError):
        await publisher.publish(ev("p2", "ended.x"))


async def test_a_broken_stream_fails_outstanding_and_later_calls(client: Client) -> None:
    publisher = await client.publisher()
    await publisher.publish(ev("before", "broken.x"))
    await client.close()  # cancels the stream with the channel
    with pytest.raises(ClosedError):
        await asyncio.wait_for(publisher.publish(ev("after", "broken.x")), WAIT)
    assert publisher.closed
    with pytest.raises(ClosedError):
        await publisher.publish(ev("later", "broken.x"))
    with pytest.raises(ClosedError):  # close reports the stream's end, as the calls did
        await asyncio.wait_for(publisher.close(), WAIT)


async def test_server_going_away_fails_the_publisher(server: ServerProcess) -> None:
    async with Client.connect(server.addr, ready_timeout=WAIT) as client:
        publisher = await client.publisher()
        await publisher.publish(ev("before", "gone.x"))
        server.process.kill()  # a crash: a graceful stop would wait for the open stream
        server.process.wait()
        with pytest.raises(NerveError) as info:
            await asyncio.wait_for(publisher.publish(ev("after", "gone.x")), WAIT)
        with pytest.raises(type(info.value)):
            await publisher.publish(ev("later", "gone.x"))
        with pytest.raises(type(info.value)):
            await asyncio.wait_for(publisher.close(), WAIT)


async def test_opening_a_publisher_over_the_stream_limit_raises() -> None:
    server = ServerProcess(server_binary(), {"NERVE_CONNECTIONS__MAX_STREAMS_PER_PRINCIPAL": "1"})
    try:
        async with Client.connect(server.addr, ready_timeout=WAIT) as client:
            async with client.subscribe("limit.x"):  # the one stream the principal may have
                with pytest.raises(ResourceExhaustedError, match="open streams and waiting requests, the most allowed per principal"):
                    await asyncio.wait_for(client.publisher(), WAIT)

            async def reopened() -> Publisher | None:
                try:
                    return await asyncio.wait_for(client.publisher(), WAIT)
                except ResourceExhaustedError:  # the server frees the slot as the stream's task ends
                    return None

            publisher = await eventually("a publisher to open after the subscription closed", reopened)
            async with publisher:
                [result] = await asyncio.wait_for(publisher.publish(ev("after", "limit.x")), WAIT)
                assert not result.duplicate
    finally:
        server.stop()


async def test_opening_waits_for_the_server_until_cancelled() -> None:
    opened = asyncio.Event()
    ended = asyncio.Event()

    async def silent(
        requests: AsyncIterator[event_bus_pb2.PublishStreamRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[event_bus_pb2.PublishStreamResponse]:
        opened.set()
        try:
            await asyncio.Event().wait()  # never answers the opening: no response headers
        finally:
            ended.set()
        yield event_bus_pb2.PublishStreamResponse()

    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(
        silent,
        request_deserializer=event_bus_pb2.PublishStreamRequest.FromString,
        response_serializer=event_bus_pb2.PublishStreamResponse.SerializeToString,
    )
    bus = grpc.method_handlers_generic_handler("nerve.v1.EventBus", {"PublishStream": handler})
    server.add_generic_rpc_handlers((bus,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with Client.connect(f"127.0.0.1:{port}", ready_timeout=WAIT) as client:
            opening = asyncio.ensure_future(client.publisher())
            await asyncio.wait_for(opened.wait(), WAIT)
            await asyncio.sleep(0.1)
            assert not opening.done(), "the open did not wait for the server's answer"
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            await asyncio.wait_for(ended.wait(), WAIT)  # the stream was cancelled with the open
    finally:
        await server.stop(None)


class _MisorderedCall:
    """A stand-in PublishStream call whose server answers request 2 where request 1 was next."""

    def __init__(self) -> None:
        self.answers: asyncio.Queue[pb.event_bus_pb2.PublishStreamResponse] = asyncio.Queue()
        self.cancelled = False

    async def write(self, request: pb.event_bus_pb2.PublishStreamRequest) -> None:
        self.answers.put_nowait(pb.event_bus_pb2.PublishStreamResponse(request_id=request.request_id + 1))

    async def read(self) -> pb.event_bus_pb2.PublishStreamResponse:
        return await self.answers.get()

    async def done_writing(self) -> None:
        pass

    def cancel(self) -> bool:
        self.cancelled = True
        self.answers.put_nowait(pb.event_bus_pb2.PublishStreamResponse(request_id=0))  # never read: the reader stopped
        return True


async def test_an_answer_out_of_order_fails_the_stream() -> None:
    call = _MisorderedCall()
    publisher = Publisher(call)  # type: ignore[arg-type]
    with pytest.raises(NerveError, match="answer to request 2 where request 1 was next"):
        await asyncio.wait_for(publisher.publish(ev("x", "misorder.x")), WAIT)
    assert call.cancelled and publisher.closed
    with pytest.raises(NerveError, match="where request 1 was next"):
        await publisher.publish(ev("y", "misorder.x"))
    with pytest.raises(NerveError, match="where request 1 was next"):
        await asyncio.wait_for(publisher.close(), WAIT)


def test_a_refusal_with_code_ok_raises_unknown() -> None:
    refusal = _refused(event_bus_pb2.PublishError(code=0, message="refused, code OK"))
    assert refusal.code is grpc.StatusCode.UNKNOWN


async def test_a_message_over_the_limit_ends_the_publisher(client: Client) -> None:
    # 4.5 MB: over max_batch_bytes (4 MiB) but within the server's message limit (max_batch_bytes + 1 MiB):
    # a refused request, the stream goes on. 6 MiB: a message the server cannot read at all
    fits = [event("//tests", "limit.x", bytes(900_000), id=f"fits-{i}") for i in range(5)]
    big = [event("//tests", "limit.x", bytes((1 << 20) - 100), id=f"big-{i}") for i in range(6)]
    publisher = await client.publisher()
    with pytest.raises(ResourceExhaustedError):
        await asyncio.wait_for(publisher.publish(*fits), WAIT)
    before, over, after = await asyncio.wait_for(
        asyncio.gather(
            publisher.publish(ev("before", "limit.x")),
            publisher.publish(*big),
            publisher.publish(ev("after", "limit.x")),
            return_exceptions=True,
        ),
        WAIT,
    )
    assert isinstance(before, list) and [r.id for r in before] == ["before"], "answered before the end"
    assert _ended_by_the_oversized_message(over), over
    assert _ended_by_the_oversized_message(after), "the stream ended with the oversized message"
    with pytest.raises(NerveError) as later:
        await publisher.publish(ev("later", "limit.x"))
    assert _ended_by_the_oversized_message(later.value), later.value
    with pytest.raises(NerveError) as closed:  # close reports how the stream ended, as the calls do
        await asyncio.wait_for(publisher.close(), WAIT)
    assert _ended_by_the_oversized_message(closed.value), closed.value
    assert {t.type: t.count for t in await client.list_event_types()} == {"limit.x": 1}


def _ended_by_the_oversized_message(error: object) -> bool:
    """The server's RESOURCE_EXHAUSTED, or what grpcio's aio layer makes of it when it ends the call while the
    message is still being written: it sets INTERNAL "Internal error from Core" for the failed write, racing
    the server's status (about one time in ten on the test machine; the client README says so)."""
    if isinstance(error, ResourceExhaustedError):
        return "message length too large" in error.message
    return (
        isinstance(error, NerveError)
        and error.code == grpc.StatusCode.INTERNAL
        and error.message == "Internal error from Core"
    )
