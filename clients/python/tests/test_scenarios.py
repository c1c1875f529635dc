"""The cross-client scenarios of clients/SCENARIOS.md, each against its own nerve-server process."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from types import TracebackType

import grpc
import pytest

from nerve_client import (
    AlreadyExistsError,
    Client,
    Delivery,
    FailedPreconditionError,
    Heartbeat,
    InvalidArgumentError,
    NoRespondersError,
    Subscription,
    UnavailableError,
    event,
    pb,
)

from nerve_client import _client

from .conftest import WAIT, ServerProcess


def ev(id: str, type: str) -> pb.Event:
    """A valid event with text data."""
    return event("//tests", type, f"payload of {id}", id=id)


async def expect_idle(sub: Subscription, heartbeats: int) -> pb.Heartbeat:
    """Asserts nothing is delivered while the server sends `heartbeats` heartbeats (its own idle signal)."""
    last = None
    for _ in range(heartbeats):
        while True:
            message = await sub.next_message(timeout=WAIT)
            assert not isinstance(message, Delivery), f"expected no delivery, got {message!r}"
            assert message is not None, "stream ended"
            if isinstance(message, pb.Heartbeat):
                last = message
                break
    assert last is not None
    return last


class FreezableProxy:
    """A TCP proxy to ``target`` on 127.0.0.1; :meth:`freeze` stops the connections open at that moment from
    forwarding, in both directions, without closing any socket, as a partition or a vanished host would:
    neither side hears anything, not even an end. Connections made after it forward as before."""

    def __init__(self, target: str) -> None:
        self._host, _, port = target.rpartition(":")
        self._port = int(port)
        self._flowing: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.addr = ""

    async def __aenter__(self) -> FreezableProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.addr = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()

    def freeze(self) -> None:
        for flowing in self._flowing:
            flowing.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(self._host, self._port)
        self._writers += [client_writer, server_writer]
        flowing = asyncio.Event()
        flowing.set()
        self._flowing.append(flowing)
        for source, sink in ((client_reader, server_writer), (server_reader, client_writer)):
            task = asyncio.get_running_loop().create_task(self._forward(source, sink, flowing))
            self._tasks.add(task)

    @staticmethod
    async def _forward(source: asyncio.StreamReader, sink: asyncio.StreamWriter, flowing: asyncio.Event) -> None:
        while data := await source.read(65536):
            await flowing.wait()  # frozen: the data is held, and nothing more is read once buffers fill
            sink.write(data)
            await sink.drain()
        await flowing.wait()  # frozen: not even the end is passed on
        sink.close()


async def test_publish_returns_sequences(client: Client) -> None:
    results = await client.publish(ev("a", "scenario.created"), ev("b", "scenario.created"))
    assert [r.id for r in results] == ["a", "b"]
    assert results[0].sequence > 0
    assert results[1].sequence == results[0].sequence + 1
    assert not any(r.duplicate for r in results)
    stored = await client.get_event("b")
    assert stored.sequence == results[1].sequence
    assert stored.text_data == "payload of b"


async def test_publish_retry_is_idempotent(client: Client) -> None:
    [first] = await client.publish(ev("once", "scenario.created"))
    assert not first.duplicate
    [again] = await client.publish(ev("once", "scenario.created"))
    assert again.sequence == first.sequence
    assert again.duplicate
    changed = event("//tests", "scenario.created", "different data", id="once")
    with pytest.raises(AlreadyExistsError) as info:
        await client.publish(changed)
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    # neither the retry nor the conflict wrote anything
    [after] = await client.publish(ev("next", "scenario.created"))
    assert after.sequence == first.sequence + 1


async def test_invalid_event_names_the_field(client: Client) -> None:
    no_type = ev("typeless", "scenario.created")
    no_type.type = ""
    with pytest.raises(InvalidArgumentError) as info:
        await client.publish(no_type)
    error = info.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[0].type" in [v.field for v in error.field_violations], error.field_violations
    violation = error.violation("events[0].type")
    assert violation is not None and violation.description
    assert "events[0].type" in str(error)


async def test_private_subscription_catches_up_then_goes_live(client: Client) -> None:
    stored = await client.publish(*(ev(f"h{i}", "orders.created") for i in range(3)))
    async with client.subscribe("orders.*", start="earliest", heartbeat_interval=0.2) as sub:
        assert sub.subscribed.heartbeat_interval.ToTimedelta() == timedelta(milliseconds=200), "the interval asked"
        assert not sub.caught_up
        history = await sub.until_caught_up(timeout=WAIT)
        assert [d.event.id for d in history] == ["h0", "h1", "h2"]
        assert [d.sequence for d in history] == [r.sequence for r in stored]
        assert sub.caught_up
        assert sub.caught_up_sequence == stored[-1].sequence
        await sub.ack(*history)

        [live] = await client.publish(ev("live", "orders.created"))
        d = await sub.next(timeout=WAIT)
        assert d.event.id == "live"
        assert d.sequence == live.sequence
        assert d.attempt == 1
        await d.ack()


async def test_group_redelivers_after_nack_and_acks(client: Client) -> None:
    async with client.subscribe("jobs.run", group="workers", heartbeat_interval=0.2) as sub:
        assert sub.group == "workers"
        [published] = await client.publish(ev("job-1", "jobs.run"))
        first = await sub.next(timeout=WAIT)
        assert first.event.id == "job-1"
        assert first.sequence == published.sequence
        assert first.attempt == 1
        assert first.ack_deadline is not None
        await first.nack(delay=0.2)

        again = await sub.next(timeout=WAIT)
        assert again.event.id == "job-1"
        assert again.attempt == 2
        await again.ack()

        beat = await expect_idle(sub, heartbeats=2)
        assert beat.in_flight == 0, "the ack settled the delivery"
        group = await client.group("workers")
        assert group is not None
        assert group.pending == 0
        assert group.dead_letters == 0


async def test_request_reply_round_trip(client: Client) -> None:
    async with client.subscribe("planner.plan.requested", group="planners") as responder:
        asked = ev("q1", "planner.plan.requested")
        asked.correlation_id = "conversation-1"
        pending = asyncio.create_task(client.request(asked, timeout=WAIT))
        try:
            d = await responder.next(timeout=WAIT)
            assert d.event.id == "q1"
            assert d.reply_to, "a request carries the server's inbox"
            assert d.event.correlation_id == "conversation-1"
            sent = await client.reply(d, ev("a1", "planner.plan.ready"))
            assert sent.delivered
            await d.ack()
            response = await asyncio.wait_for(pending, WAIT)
        finally:
            pending.cancel()
    assert response.reply.id == "a1"
    assert response.reply.correlation_id == "conversation-1"
    assert response.reply.causation_id == "q1"
    assert response.reply.sequence == sent.sequence
    assert response.request_sequence == d.sequence


async def test_request_without_responders_fails_fast(client: Client) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NoRespondersError) as info:
        await client.request(ev("lonely", "planner.plan.requested"), timeout=30)
    elapsed = loop.time() - started
    error = info.value
    assert isinstance(error, FailedPreconditionError)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "no responders" in error.message
    assert error.reason == "NO_RESPONDERS"
    assert elapsed < 5, f"fails at once, not at the 30s timeout (took {elapsed:.1f}s)"


async def test_replay_pages_with_resume_token(client: Client) -> None:
    results = await client.publish(*(ev(f"r{i}", "replay.tick") for i in range(250)))
    await client.publish(ev("unrelated", "other.tick"))
    expected = [r.sequence for r in results]

    first = client.replay("replay.tick", page_size=100, limit=150)
    pages = [page async for page in first.pages()]
    assert [len(p.events) for p in pages] == [100, 50]
    assert not first.end_of_history
    assert first.resume_token

    rest = client.replay("replay.tick", page_size=100, resume_token=first.resume_token)
    events = await rest.collect()
    assert rest.end_of_history

    seen = [e.sequence for p in pages for e in p.events] + [e.sequence for e in events]
    assert seen == expected, "all 250 once, in order"
    assert [e.id for p in pages for e in p.events][:3] == ["r0", "r1", "r2"]


async def _subscribe_again_after_a_freeze(proxy: FreezableProxy, client: Client, within: float) -> None:
    """Freezes the connection under a subscription, then subscribes again within ``within`` seconds and
    receives an event there: a subscribe made before keepalive gave up on the frozen connection raises
    UnavailableError, and the next one goes out on a new connection."""
    async with client.subscribe("again.x", heartbeat_interval=0.2) as sub:
        await expect_idle(sub, heartbeats=2)
        proxy.freeze()

        async def until_it_ends() -> None:
            while True:
                await sub.next_message()

        with pytest.raises(UnavailableError):
            await asyncio.wait_for(until_it_ends(), 5)

    async def subscribe_again() -> Subscription:
        while True:
            try:
                return await client.subscribe("again.x")
            except UnavailableError:
                continue  # made on the silent connection before keepalive gave up on it

    again = await asyncio.wait_for(subscribe_again(), within)
    try:
        await client.publish(ev("again-1", "again.x"))
        delivery = await again.next(timeout=WAIT)
        assert delivery.event.id == "again-1"
    finally:
        await again.close()


async def test_subscribing_again_after_a_silent_connection_gets_a_new_one(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's keepalive replaces a connection that went silent. Without keepalive a subscribe would
    wait on the silent one until the operating system gave up on it (about 15 minutes)."""
    # the client's own keepalive options, shortened
    shortened = {
        "grpc.keepalive_time_ms": 1_000,
        "grpc.keepalive_timeout_ms": 1_000,
        "grpc.http2.ping_timeout_ms": 1_000,
    }
    options = tuple((name, shortened.get(name, value)) for name, value in _client._CHANNEL_OPTIONS)
    assert [name for name, _ in options if name in shortened] == list(shortened)
    monkeypatch.setattr(_client, "_CHANNEL_OPTIONS", options)
    async with FreezableProxy(server.addr) as proxy, Client.connect(proxy.addr, ready_timeout=WAIT) as client:
        await _subscribe_again_after_a_freeze(proxy, client, within=15)


async def test_a_keepalive_timeout_given_alone_sets_the_ping_timeout_too(server: ServerProcess) -> None:
    """gRPC's C core waits its ping timeout for a keepalive ping's answer: without it following the caller's
    keepalive timeout, the client's default (10 s) would hold the new connection back past the bound."""
    options = [("grpc.keepalive_time_ms", 1_000), ("grpc.keepalive_timeout_ms", 1_000)]
    async with FreezableProxy(server.addr) as proxy, Client.connect(
        proxy.addr, options=options, ready_timeout=WAIT
    ) as client:
        await _subscribe_again_after_a_freeze(proxy, client, within=7)


async def test_silent_connection_is_detected(server: ServerProcess) -> None:
    async with FreezableProxy(server.addr) as proxy, Client.connect(proxy.addr, ready_timeout=WAIT) as client:
        async with client.subscribe("quiet.>", heartbeat_interval=0.2) as sub:  # the default heartbeat_timeout
            # idle for 5 intervals: the heartbeats keep the stream alive
            await expect_idle(sub, heartbeats=5)

            proxy.freeze()
            # heartbeats already on their way may still come first; bounded: without a watchdog this
            # raises TimeoutError instead of hanging
            async def until_it_ends() -> None:
                while True:
                    message = await sub.next_message()
                    assert isinstance(message, Heartbeat), message

            with pytest.raises(UnavailableError) as info:
                await asyncio.wait_for(until_it_ends(), 5)
            error = info.value
            assert error.code == grpc.StatusCode.UNAVAILABLE
            assert "heartbeats" in error.message, error.message
