"""The client layer beyond the shared scenarios: event building, dead letters and admin, errors, closing."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2

from nerve_client import (
    Client,
    ClosedError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    Priority,
    ResourceExhaustedError,
    Subscription,
    UnavailableError,
    data_of,
    event,
    exact,
    extensions_of,
    json_of,
    pb,
)
from nerve_client._subscription import _watchdog

from .conftest import WAIT, ServerProcess, server_binary
from .test_scenarios import ev, expect_idle

T = TypeVar("T")


async def eventually(what: str, check: Callable[[], Awaitable[T | None]]) -> T:
    """Polls a server-side effect that no stream announces, failing after WAIT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        value = await check()
        if value is not None:
            return value
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_event_helper_builds_cloudevents() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    e = event(
        "//billing",
        "invoice.paid.v1",
        {"amount": 12, "currency": "EUR"},
        subject="invoice-7",
        priority="high",
        extensions={"tenant": "acme", "retries": 3, "urgent": True, "blob": b"\x01", "due": when},
        correlation_id="order-7",
        time=when,
    )
    assert e.spec_version == "1.0"
    assert e.id, "an id by default"
    before = time.time_ns() // 1_000_000
    default_id = uuid.UUID(event("//s", "t").id)
    after = time.time_ns() // 1_000_000
    assert default_id.version == 7 and default_id.variant == uuid.RFC_4122, default_id
    assert before <= default_id.int >> 80 <= after, "the id begins with the time it was made"
    assert Priority(e.priority) is Priority.HIGH
    assert e.data_content_type == "application/json"
    assert json_of(e) == {"amount": 12, "currency": "EUR"}
    assert e.correlation_id == "order-7"
    assert e.time.ToDatetime(tzinfo=timezone.utc) == when
    assert extensions_of(e) == {"tenant": "acme", "retries": 3, "urgent": True, "blob": b"\x01", "due": when}
    assert data_of(event("//s", "t", b"raw")) == b"raw"
    packed = data_of(event("//s", "t", duration_pb2.Duration(seconds=5)))
    assert isinstance(packed, any_pb2.Any)
    unpacked = duration_pb2.Duration()
    assert packed.Unpack(unpacked)
    assert unpacked.seconds == 5
    with pytest.raises(ValueError):
        event("//s", "t", extensions={"big": 2**31})
    with pytest.raises(ValueError):
        event("//s", "t", priority="urgent")
    assert json.loads(event("//s", "t", [1, 2]).text_data) == [1, 2]


async def test_dead_letters_and_admin(client: Client) -> None:
    async with client.subscribe(["park.*"], group="parkers", heartbeat_interval=0.2) as sub:
        stored = await client.publish(ev("k1", "park.x"), ev("k2", "park.y"))
        first, second = await sub.next(timeout=WAIT), await sub.next(timeout=WAIT)
        assert {first.event.id, second.event.id} == {"k1", "k2"}
        poison, fine = (first, second) if first.event.id == "k1" else (second, first)
        await poison.dead_letter("schema mismatch")
        await fine.ack()
        beat = await expect_idle(sub, heartbeats=1)
        assert beat.in_flight == 0

        async def letters() -> list[pb.DeadLetter] | None:
            found = [d async for d in client.dead_letters("parkers")]
            return found or None

        [letter] = await eventually("the dead letter", letters)
        assert letter.reason == "schema mismatch"
        assert letter.event.sequence == stored[0].sequence
        group = await client.group("parkers")
        assert group is not None and group.dead_letters == 1

        assert await client.redrive_dead_letters("parkers", all=True) == 1
        back = await sub.next(timeout=WAIT)
        assert back.event.id == "k1"
        await back.ack()

    types = {t.type: t.count for t in await client.list_event_types()}
    assert types == {"park.x": 1, "park.y": 1}
    assert await client.delete_group("parkers")
    assert await client.group("parkers") is None
    with pytest.raises(NotFoundError):
        await client.get_event("missing")


async def test_admin_lists_read_every_page(client: Client) -> None:
    # more than one page of each (the server's default page is 100)
    names = [f"paged.t{i:03}" for i in range(150)]
    await client.publish(*(ev(f"p{i}", t) for i, t in enumerate(names)))
    assert [t.type for t in await client.list_event_types()] == names
    groups = [f"paged-{i:03}" for i in range(101)]
    for g in groups:
        sub = await client.subscribe("paged.t000", group=g)
        await sub.close()
    assert [g.name for g in await client.list_groups()] == groups
    last = await client.group("paged-100")
    assert last is not None and last.name == "paged-100"


async def test_filter_and_bad_open(client: Client) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await client.subscribe("a.b", group="g", ack_deadline=0.001)
    assert info.value.violation("open.ack_deadline") is not None, info.value.field_violations
    # a start past the last stored sequence (a position kept from a store since wiped)
    with pytest.raises(OutOfRangeError) as past:
        await client.subscribe("a.b", start=1 << 40)
    assert past.value.violation("open.start.after_sequence") is not None, past.value.field_violations

    async with client.subscribe("filter.x", filter=exact(subject="keep"), start="earliest") as sub:
        kept = ev("keep-me", "filter.x")
        kept.subject = "keep"
        await client.publish(ev("drop-me", "filter.x"), kept)
        d = await sub.next(timeout=WAIT)
        assert d.event.id == "keep-me"


async def test_closed_subscription_ends_iteration(client: Client) -> None:
    sub = await client.subscribe("closing.x", heartbeat_interval=0.2)
    await sub.close()
    assert [d async for d in sub] == []
    with pytest.raises(ClosedError):
        await sub.ack("1-1")
    assert sub.closed


async def test_connect_to_nothing_is_unavailable() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UnavailableError) as info:
        await Client.connect(f"127.0.0.1:{port}", ready_timeout=0.5)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


async def test_next_times_out_and_the_stream_stays_usable(client: Client) -> None:
    async with client.subscribe("patience.x") as sub:
        with pytest.raises(TimeoutError):
            await sub.next(timeout=0)
        await client.publish(ev("p1", "patience.x"))
        d = await sub.next(timeout=WAIT)
        assert d.event.id == "p1"


async def test_cancelling_an_ack_keeps_the_subscription(client: Client) -> None:
    async with client.subscribe("cancel.x", group="cancellers", heartbeat_interval=0.2) as sub:
        await client.publish(ev("c1", "cancel.x"))
        first = await sub.next(timeout=WAIT)
        # a handler under wait_for, or a TaskGroup member, cancelled while its ack is on its way
        acking = asyncio.create_task(first.ack())
        await asyncio.sleep(0)
        acking.cancel()
        await asyncio.wait([acking])
        assert acking.cancelled()

        await client.publish(ev("c2", "cancel.x"))
        second = await sub.next(timeout=WAIT)
        assert second.event.id == "c2" and second.attempt == 1, "the stream went on"
        await second.ack()
        beat = await expect_idle(sub, heartbeats=2)
        assert beat.in_flight == 0, "the cancelled ack was still sent: cancelling stops only the wait"


async def test_sending_after_the_server_ended_the_stream_raises_its_status(client: Client) -> None:
    async with client.subscribe("doomed.x", group="doomed", heartbeat_interval=0.2) as sub:
        await client.publish(ev("d1", "doomed.x"))
        d = await sub.next(timeout=WAIT)
        assert await client.delete_group("doomed")

        async def drain() -> None:
            while await sub.next_message() is not None:
                pass

        with pytest.raises(NotFoundError):
            await asyncio.wait_for(drain(), WAIT)
        with pytest.raises(NotFoundError):
            await d.ack()


async def test_settling_no_deliveries_sends_nothing(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    async with client.subscribe("empty.x", start="earliest") as sub:
        history = await sub.until_caught_up(timeout=WAIT)
        assert history == []
        writes: list[pb.SubscribeRequest] = []
        write = sub._call.write

        async def counted(request: pb.SubscribeRequest) -> None:
            writes.append(request)
            await write(request)

        monkeypatch.setattr(sub._call, "write", counted)
        await sub.ack(*history)
        await sub.nack(delay=1)
        await sub.dead_letter(reason="none")
        await sub.extend(by=1)
        assert writes == []

        await client.publish(ev("e1", "empty.x"))
        d = await sub.next(timeout=WAIT)
        await d.ack()
        assert [w.WhichOneof("action") for w in writes] == ["ack"]


async def test_request_without_a_timeout_takes_the_server_default(client: Client) -> None:
    async with client.subscribe("default.asked", group="responders") as responder:
        for n, timeout in enumerate((0, None)):

            async def answer() -> None:
                asked = await responder.next()
                await client.reply(asked, ev(f"a{n}", "default.answered"))
                await asked.ack()

            answering = asyncio.create_task(answer())
            try:
                response = await asyncio.wait_for(client.request(ev(f"q{n}", "default.asked"), timeout=timeout), WAIT)
            finally:
                answering.cancel()
            assert response.reply.id == f"a{n}"


async def test_cancelling_close_is_not_swallowed(client: Client) -> None:
    sub = await client.subscribe("closing.y")
    closing = asyncio.create_task(sub.close())
    await asyncio.sleep(0)  # close() is waiting for the stream's tasks to stop
    closing.cancel()
    await asyncio.wait([closing])
    assert closing.cancelled(), "the closing task's own cancellation propagates"
    assert sub.closed


async def test_negative_durations_are_refused_locally(client: Client) -> None:
    with pytest.raises(ValueError):
        client.subscribe("negative.x", ack_deadline=timedelta(seconds=-1))
    with pytest.raises(ValueError):
        client.subscribe("negative.x", heartbeat_timeout=-1)
    with pytest.raises(ValueError):
        await client.request(ev("q", "negative.x"), timeout=timedelta(seconds=-1))
    async with client.subscribe("negative.x", group="negative", heartbeat_interval=0.2) as sub:
        await client.publish(ev("n1", "negative.x"))
        d = await sub.next(timeout=WAIT)
        with pytest.raises(ValueError):
            await d.nack(delay=timedelta(seconds=-1))
        with pytest.raises(ValueError):
            await d.extend(timedelta(milliseconds=-5))
        with pytest.raises(ValueError):
            await sub.close(timeout=-1)
        await d.ack()  # the stream is still open
        beat = await expect_idle(sub, heartbeats=1)
        assert beat.in_flight == 0


async def test_close_keeps_the_last_acks(client: Client) -> None:
    async def ack_one(sub: Subscription, n: int) -> None:
        await client.publish(ev(f"g{n}", "graceful.x"))
        d = await sub.next(timeout=WAIT)
        assert (d.event.id, d.attempt) == (f"g{n}", 1), f"round {n}: an earlier ack was lost, got {d}"
        await d.ack()

    for n in range(50):
        if n % 2:
            sub = await client.subscribe("graceful.x", group="graceful", max_in_flight=1)
            await ack_one(sub, n)
            await sub.close()
        else:  # leaving `async with` closes the same way
            async with client.subscribe("graceful.x", group="graceful", max_in_flight=1) as sub:
                await ack_one(sub, n)
        group = await client.group("graceful")
        assert group is not None and group.pending == 0, f"round {n}: the ack was not saved when close returned"
        # the server ended the stream after the Close message (a cancelled call reports CANCELLED): that is
        # what makes the ack count before close returns, where a cancel leaves it to the server's drain
        assert await asyncio.wait_for(sub._call.code(), WAIT) == grpc.StatusCode.OK


async def test_acks_that_reached_the_server_before_a_cancel_count(client: Client) -> None:
    for n in range(50):
        sub = await client.subscribe("abrupt.x", group="abrupt", max_in_flight=1)
        await client.publish(ev(f"a{n}", "abrupt.x"))
        d = await sub.next(timeout=WAIT)
        # a lost ack comes back as a redelivery of an event acked before. The new event may come with attempt
        # 2: the server handles a cancel after the fact, so it can hand it to the last, cancelled, subscriber
        assert d.event.id == f"a{n}", f"round {n}: an ack was lost, got {d}"
        await d.ack()  # written: it is on its way when the call is cancelled
        await sub.close(timeout=0)  # cancels the call at once, without the Close message
        # the call's status shows that no Close message ended it: the server saw only the cancel
        assert await asyncio.wait_for(sub._call.code(), WAIT) == grpc.StatusCode.CANCELLED

    async def left() -> pb.GroupInfo | None:  # the server settles a cancelled stream after the fact
        group = await client.group("abrupt")
        return group if group is not None and group.consumers == 0 else None

    group = await eventually("the last subscriber to leave", left)
    assert group.pending == 0, "an ack sent before the cancel was lost"


async def test_close_discards_what_is_unread_and_the_server_hands_it_back(client: Client) -> None:
    sub = await client.subscribe("handback.x", group="handback", max_in_flight=4)
    await client.publish(ev("h1", "handback.x"), ev("h2", "handback.x"))
    first = await sub.next(timeout=WAIT)
    assert first.event.id == "h1"

    async def both_handed_out() -> pb.GroupInfo | None:
        group = await client.group("handback")
        return group if group is not None and group.pending == 2 and group.lag == 0 else None

    await eventually("both deliveries to be handed out", both_handed_out)
    await sub.close()
    assert [m async for m in sub.messages()] == [], "h2, sent to this subscriber, is discarded"
    with pytest.raises(ClosedError):
        await first.ack()

    async with client.subscribe("handback.x", group="handback", max_in_flight=4) as again:
        redelivered = sorted((d.event.id, d.attempt) for d in [await again.next(timeout=WAIT) for _ in range(2)])
        assert redelivered == [("h1", 2), ("h2", 2)], "the server handed both back"


async def test_close_from_several_tasks_ends_a_waiting_reader(client: Client) -> None:
    sub = await client.subscribe("closing.z", group="closers")
    reading = asyncio.create_task(sub.next())
    await asyncio.sleep(0)  # waiting for a delivery
    await asyncio.wait_for(asyncio.gather(sub.close(), sub.close(), sub.close()), WAIT)
    assert sub._pump.done() and sub._writer.done(), "no close returned before the stream had ended"
    with pytest.raises(ClosedError):
        await asyncio.wait_for(reading, WAIT)
    await sub.close()  # closing again does nothing


async def test_zero_settings_take_the_server_defaults(client: Client) -> None:
    # the server refuses a set zero ack deadline or heartbeat interval: 0 must leave them unset, as None does
    async with client.subscribe("zero.x", group="zeros", ack_deadline=0, heartbeat_interval=0) as sub:
        await client.publish(ev("z1", "zero.x"))
        d = await sub.next(timeout=WAIT)
        assert d.event.id == "z1"
        assert d.ack_deadline is not None
        left = d.ack_deadline - datetime.now(timezone.utc)
        assert timedelta(seconds=20) < left <= timedelta(seconds=30), f"not the default 30s ack deadline: {left}"
        await d.ack()
    async with client.subscribe(
        "zero.x", start="earliest", ack_deadline=timedelta(0), heartbeat_interval=timedelta(0)
    ) as private:
        d = await private.next(timeout=WAIT)
        assert d.event.id == "z1"


def test_heartbeat_timeout_defaults_to_three_intervals_in_effect() -> None:
    def interval(secs: float) -> duration_pb2.Duration:
        d = duration_pb2.Duration()
        d.FromTimedelta(timedelta(seconds=secs))
        return d

    def watch(confirmed: float | None, asked: float | None, timeout: float | None) -> float | None:
        subscribed = pb.Subscribed(heartbeat_interval=None if confirmed is None else interval(confirmed))
        found = _watchdog(subscribed, None if asked is None else interval(asked), timeout)
        return None if found is None else found[0]

    assert watch(10, None, None) == 30, "the server's default interval, confirmed"
    assert watch(0.2, 0.2, None) == pytest.approx(0.6)
    assert watch(None, 5, None) == 15, "an older server confirms none: the interval asked for"
    assert watch(None, None, None) is None, "no interval known: no watchdog by default"
    assert watch(None, None, 7) == 7, "but one given applies"
    assert watch(10, None, 0) is None, "0 turns it off"
    found = _watchdog(pb.Subscribed(heartbeat_interval=interval(0.2)), None, None)
    assert found is not None
    assert found[1].startswith("no message from the server for 0.6s (heartbeats are due every 0.2s)"), found[1]


async def test_zero_extension_is_refused_locally(client: Client) -> None:
    async with client.subscribe("extend.x", group="extenders", heartbeat_interval=0.2) as sub:
        await client.publish(ev("x1", "extend.x"))
        d = await sub.next(timeout=WAIT)
        # the server refuses a zero extension by ending the whole stream: it must not be sent
        for by in (0, 0.0, timedelta(0), 1e-12):
            with pytest.raises(ValueError):
                await d.extend(by)
            with pytest.raises(ValueError):
                await sub.extend(d, by=by)
        with pytest.raises(ValueError):
            await sub.extend(by=0)  # refused even naming no delivery, as a negative one is
        await d.extend(timedelta(seconds=60))
        await d.ack()  # the stream is still open
        beat = await expect_idle(sub, heartbeats=1)
        assert beat.in_flight == 0


class _Deadlines(grpc.aio.UnaryUnaryClientInterceptor):
    """Records the gRPC deadline (``timeout``) each unary call is made with."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        self.timeouts.append(client_call_details.timeout)
        return await continuation(client_call_details, request)


async def test_request_without_a_timeout_waits_for_the_servers_answer() -> None:
    # a server whose default request timeout is not the usual 30s: the client cannot know it, so a request
    # without a timeout must carry no deadline and end with the server's own answer
    server = ServerProcess(server_binary(), {"NERVE_BUS__DEFAULT_REQUEST_TIMEOUT": "1s"})
    deadlines = _Deadlines()
    try:
        async with Client(grpc.aio.insecure_channel(server.addr, interceptors=[deadlines])) as client:
            async with client.subscribe("silent.asked", group="silent"):  # a responder that never answers
                for n, (timeout, waited) in enumerate(((None, "1s"), (0, "1s"), (0.5, "500ms"))):
                    deadlines.timeouts.clear()
                    started = time.monotonic()
                    with pytest.raises(DeadlineExceededError) as info:
                        await asyncio.wait_for(client.request(ev(f"q{n}", "silent.asked"), timeout=timeout), WAIT)
                    assert f"within {waited}" in info.value.message, f"not the server's answer: {info.value}"
                    assert time.monotonic() - started < 5
                    expected = None if not timeout else timeout + 5
                    assert deadlines.timeouts == [expected], f"timeout={timeout}: call deadline {deadlines.timeouts}"
    finally:
        server.stop()


async def test_replay_receives_pages_over_4_mib(server: ServerProcess, client: Client) -> None:
    # the server fills a page with up to max_batch_bytes (4 MiB) of events by its own count (attributes and
    # data); sequences, times and framing come on top, so a full page encodes to more than gRPC's default limit
    data = bytes(4194 - len("big-0000") - len("//tests") - len("big.x") - len("1.0"))
    events = [event("//tests", "big.x", data, id=f"big-{i:04}") for i in range(1000)]
    for batch in range(4):
        await client.publish(*events[batch * 250 : (batch + 1) * 250])
    pages = [page async for page in client.replay("big.x", page_size=1000).pages()]
    assert len(pages[0].events) == 1000, [len(p.events) for p in pages]
    assert pages[0].ByteSize() > 4 << 20, "the page does not test the limit"
    assert [e.id for p in pages for e in p.events] == [e.id for e in events]

    # options given to connect win: a receive limit set again refuses the page
    async with Client.connect(server.addr, options=[("grpc.max_receive_message_length", 4 << 20)]) as limited:
        with pytest.raises(ResourceExhaustedError):
            await asyncio.wait_for(limited.replay("big.x", page_size=1000).collect(), WAIT)
