"""The client layer beyond the shared scenarios: event building, dead letters and admin, errors, closing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from nerve_client import (
    Client,
    ClosedError,
    DeadlineExceededError,
    Delivery,
    InvalidArgumentError,
    NerveError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    Priority,
    Replay,
    ResourceExhaustedError,
    Subscription,
    TokenExpiredError,
    UnauthenticatedError,
    UnavailableError,
    data_of,
    event,
    exact,
    extensions_of,
    json_of,
    pb,
)
from nerve_client._errors import from_status
from nerve_client._proto.nerve.v1 import admin_pb2, admin_pb2_grpc
from nerve_client._subscription import _BEYOND_WINDOW, _watchdog
from nerve_client._replay import _resume_backoff

from .conftest import WAIT, JwtServer, ServerProcess, server_binary
from .test_scenarios import FreezableProxy, ev, expect_idle

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
    # named by field, where protobuf would say only "bad argument type for built-in operation"
    with pytest.raises(TypeError, match="event subject must be a str, not int"):
        event("//s", "t", subject=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="event source must be a str, not list"):
        event(["//s"], "t")  # type: ignore[arg-type]
    assert event(b"//s", "t").source == "//s"  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="event time must be a datetime, not str"):
        event("//s", "t", time="2026-12-07T00:00:00Z")  # type: ignore[arg-type]
    assert json.loads(event("//s", "t", [1, 2]).text_data) == [1, 2]


async def test_dead_letters_and_admin(client: Client) -> None:
    async with client.subscribe(["park.*"], group="parkers", heartbeat_interval=0.2) as sub:
        stored = await client.publish(ev("k1", "park.x"), ev("k2", "park.y"))
        first, second = await sub.next(timeout=WAIT), await sub.next(timeout=WAIT)
        assert {first.event.id, second.event.id} == {"k1", "k2"}
        poison, fine = (first, second) if first.event.id == "k1" else (second, first)
        # a reason protobuf cannot encode (a lone surrogate, from a file name, say) is mended, not refused
        await poison.dead_letter("schema mismatch \udc80")
        await fine.ack()
        beat = await expect_idle(sub, heartbeats=1)
        assert beat.in_flight == 0

        async def letters() -> list[pb.DeadLetter] | None:
            found = [d async for d in client.dead_letters("parkers")]
            return found or None

        [letter] = await eventually("the dead letter", letters)
        assert letter.reason == "schema mismatch \ufffd"
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


async def test_no_time_left_still_takes_what_is_queued(client: Client) -> None:
    await client.publish(*(ev(f"q{i}", "queued.x") for i in range(4)))
    async with client.subscribe("queued.x", start="earliest") as sub:

        async def all_read_ahead() -> bool | None:  # the four deliveries and the caught-up marker
            return True if sub._inbox._items.qsize() == 5 else None

        await eventually("the history to be read ahead", all_read_ahead)
        first = await sub.next_message(timeout=0)
        assert isinstance(first, Delivery) and first.event.id == "q0"
        assert (await sub.next(timeout=0)).event.id == "q1"
        assert (await sub.next(timeout=-1)).event.id == "q2", "a timeout already past is no time left, too"
        rest = await sub.until_caught_up(timeout=0)
        assert [d.event.id for d in rest] == ["q3"] and sub.caught_up
        with pytest.raises(TimeoutError):  # nothing queued any more
            await sub.next(timeout=0)


async def test_a_credit_protobuf_refuses_leaves_the_window_as_it_was(client: Client) -> None:
    async with client.subscribe("credit.x", max_in_flight=4, heartbeat_interval=0.2) as sub:
        window = sub._inbox._window
        for refused, error in ((2**32, ValueError), (-1, ValueError), (1.5, TypeError)):
            with pytest.raises(error):
                await sub.credit(refused)  # type: ignore[arg-type]
            assert sub._inbox._window == window, f"credit({refused}) widened the read-ahead"
        await sub.credit(2)
        assert sub._inbox._window == window + 2
        beat = await expect_idle(sub, heartbeats=1)  # the stream is still open, with the credit granted
        assert beat.credits == window + 2


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
    # positive, but a zero once in nanoseconds: the server refuses a set zero
    with pytest.raises(ValueError, match="it must be positive"):
        await client.request(ev("q", "negative.x"), timeout=1e-10)
    with pytest.raises(ValueError, match="it must be positive"):
        client.subscribe("negative.x", ack_deadline=1e-10)
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


async def test_close_raises_when_the_server_does_not_end_the_stream(server: ServerProcess) -> None:
    async with FreezableProxy(server.addr) as proxy, Client.connect(proxy.addr, ready_timeout=WAIT) as client:
        # no watchdog: nothing ends the stream but the server, which the frozen connection never lets answer
        sub = await client.subscribe("frozen.x", heartbeat_interval=0.2, heartbeat_timeout=0)
        await expect_idle(sub, heartbeats=1)
        proxy.freeze()
        with pytest.raises(DeadlineExceededError) as info:
            await asyncio.wait_for(sub.close(timeout=0.5), WAIT)
        assert "within 0.5s of the Close message" in info.value.message, info.value
        with pytest.raises(DeadlineExceededError) as again:
            await sub.close()
        assert again.value is info.value, "closing again raises the same"
        assert await sub.next_message() is None, "closed: reading ends at once"


async def test_close_raises_the_error_the_stream_ended_with(server: ServerProcess) -> None:
    async with FreezableProxy(server.addr) as proxy, Client.connect(proxy.addr, ready_timeout=WAIT) as client:
        # the watchdog (3 heartbeat intervals, 0.6s) ends the stream while close waits for the server's end
        sub = await client.subscribe("cut.x", heartbeat_interval=0.2)
        await expect_idle(sub, heartbeats=1)
        proxy.freeze()
        with pytest.raises(UnavailableError) as info:
            await asyncio.wait_for(sub.close(), WAIT)
        assert "heartbeats" in info.value.message, info.value

    async with FreezableProxy(server.addr) as proxy, Client.connect(proxy.addr, ready_timeout=WAIT) as client:
        # leaving `async with` closes as close() does, and raises as it does
        with pytest.raises(UnavailableError):
            async with client.subscribe("cut.y", heartbeat_interval=0.2) as sub:
                await expect_idle(sub, heartbeats=1)
                proxy.freeze()

    async with FreezableProxy(server.addr) as proxy, Client.connect(proxy.addr, ready_timeout=WAIT) as client:
        # but an exception leaving the block is the one raised: how the stream ended after it would hide it
        with pytest.raises(KeyError):
            async with client.subscribe("cut.z", heartbeat_interval=0.2) as sub:
                await expect_idle(sub, heartbeats=1)
                proxy.freeze()
                raise KeyError("the body's own error")


async def test_cancelling_the_block_of_a_subscription_cancels_the_stream_at_once(server: ServerProcess) -> None:
    async with FreezableProxy(server.addr) as proxy, Client.connect(proxy.addr, ready_timeout=WAIT) as client:
        opened: list[Subscription] = []

        async def read_in_the_block() -> None:
            # no watchdog: nothing ends the stream but the server, which the frozen connection never lets answer
            async with client.subscribe("left.x", heartbeat_interval=0.2, heartbeat_timeout=0) as sub:
                opened.append(sub)
                await expect_idle(sub, heartbeats=1)
                proxy.freeze()
                await sub.next()

        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(read_in_the_block(), 1.0)
        waited = loop.time() - started
        assert waited < 3, f"a cancelled task waited {waited:.1f}s for the stream's end"
        [sub] = opened
        assert sub.closed
        assert await asyncio.wait_for(sub._call.code(), WAIT) == grpc.StatusCode.CANCELLED


async def test_until_caught_up_keeps_what_it_read_when_it_raises(client: Client) -> None:
    await client.publish(*(ev(f"w{i}", "window.x") for i in range(3)))
    # a window of 2 for a backlog of 3: the server sends two, then neither more nor the caught-up marker
    async with client.subscribe("window.x", start="earliest", max_in_flight=2) as sub:
        history: list[Delivery] = []

        async def read_the_window() -> None:
            while len(history) < 2:  # the short timeout may come before the server's deliveries do
                with pytest.raises(TimeoutError):
                    await sub.until_caught_up(timeout=0.2, into=history)

        await asyncio.wait_for(read_the_window(), WAIT)
        assert [d.event.id for d in history] == ["w0", "w1"] and not sub.caught_up
        # what it read before raising is there to settle: the window opens again and the stream goes on
        await sub.ack(*history)
        rest = await sub.until_caught_up(timeout=WAIT)
        assert [d.event.id for d in rest] == ["w2"] and sub.caught_up


async def test_a_reader_that_falls_behind_holds_the_server_back(server: ServerProcess) -> None:
    # small HTTP/2 windows, so that the transport takes in few of the 4 KB deliveries beyond what the
    # subscription buffers, and flow control holds the server back soon
    async with Client.connect(server.addr, options=_SMALL_WINDOWS, ready_timeout=WAIT) as client:
        async with client.subscribe(
            "behind.x", group="behind", max_in_flight=1, ack_deadline=0.02, max_attempts=1000, heartbeat_interval=0.1
        ) as sub:
            await client.publish(event("//tests", "behind.x", bytes(4096), id="b1"))
            first = await sub.next(timeout=WAIT)
            assert first.attempt == 1
            # the application busy elsewhere (this is the slow reader, not a wait for something), for 200 ack
            # deadlines: each expired lease frees the window slot and the group hands the event out again,
            # attempt + 1, to this member. Read on regardless, the copies pile up here, about 45 a second; held
            # back, the server stops at what the buffers on the way take (about 60). It is also 13 heartbeat
            # timeouts (0.3s) without reading: the watchdog must not take that for a dead connection
            await asyncio.sleep(4)

            async def settle() -> list[int]:
                attempts = []
                while True:
                    message = await sub.next_message(timeout=WAIT)
                    assert message is not None, "the stream ended"
                    if isinstance(message, Delivery):
                        attempts.append(message.attempt)
                        await message.ack()  # stale copies' acks are ignored; the current one's settles it
                    elif isinstance(message, pb.Heartbeat) and message.in_flight == 0:
                        return attempts

            attempts = await asyncio.wait_for(settle(), WAIT)
    assert attempts == list(range(2, len(attempts) + 2)), "every copy once, in order"
    assert len(attempts) < 100, f"{len(attempts)} copies piled up while the reader was behind"


async def test_a_stream_ended_with_its_window_unread_keeps_its_deliveries_and_status(client: Client) -> None:
    # a reader behind by its whole window, as one working through a backlog is: the subscription still reads
    # all of it off the stream, and so the server's status too, which grpcio gives only after every message
    # before it. A send that fails on the ended stream before that makes grpcio report INTERNAL ("Internal
    # error from Core") instead and drop what it had not handed out; the sooner the status is read, the
    # less likely that is
    window = 64
    sub = await client.subscribe("hoard.x", group="hoarders", max_in_flight=window)
    await client.publish(*(ev(f"h{i}", "hoard.x") for i in range(window)))
    first = await sub.next(timeout=WAIT)

    async def all_handed_out() -> pb.GroupInfo | None:
        group = await client.group("hoarders")
        return group if group is not None and group.pending == window and group.lag == 0 else None

    await eventually("every event to be handed out", all_handed_out)
    assert await client.delete_group("hoarders")  # the server ends the stream with NOT_FOUND

    async def end_read() -> bool | None:
        return True if sub._stream_end.done() else None

    await eventually("the subscription to read the stream's end, past the deliveries unread", end_read)
    with pytest.raises(NotFoundError):
        await first.ack()
    # what was received before the end is still handed out, then the stream's error
    seen = {first.sequence}
    with pytest.raises(NotFoundError):
        while True:
            d = await sub.next(timeout=WAIT)
            assert d.sequence not in seen, f"sequence {d.sequence} delivered twice"
            seen.add(d.sequence)
    assert len(seen) == window
    await asyncio.wait_for(sub.close(), WAIT)  # the stream had ended: nothing to wait for


async def _fall_behind(client: Client, name: str) -> Subscription:
    """A group subscription (window 1) whose reader takes nothing while the group hands its one event out
    again every 20ms: returned once the pump waits for room, having read as much beyond the window as it does."""
    sub = await client.subscribe(f"{name}.x", group=name, max_in_flight=1, ack_deadline=0.02, max_attempts=1000)
    await client.publish(ev(f"{name}-1", f"{name}.x"))

    async def waiting() -> bool | None:
        return True if sub._inbox._deliveries >= 1 + _BEYOND_WINDOW else None

    await eventually("the pump to wait for room", waiting)
    return sub


async def test_close_reads_on_while_the_reader_is_behind(client: Client) -> None:
    sub = await _fall_behind(client, "stuck")
    # the server's end after the Close message comes behind what the pump has not read: it must read on
    await asyncio.wait_for(sub.close(), WAIT)  # raises unless the server ended the stream with OK
    group = await client.group("stuck")
    assert group is not None and group.consumers == 0 and group.pending == 1, "the event is back in the group"


async def test_a_send_on_a_broken_stream_returns_while_the_reader_is_behind(server: ServerProcess) -> None:
    async with Client.connect(server.addr, ready_timeout=WAIT) as client:
        sub = await _fall_behind(client, "broken")
        server.process.kill()  # the connection breaks
        server.process.wait()

        async def ack_until_refused() -> None:
            while True:
                await sub.ack("broken-1")
                await asyncio.sleep(0.01)  # polls for the break, which only a refused ack shows here

        # a refused ack waits for the stream's status, which the pump reads only after the messages still
        # unread, while nobody takes them: it must read on without a reader
        with pytest.raises(NerveError):
            await asyncio.wait_for(ack_until_refused(), WAIT)
        await asyncio.wait_for(sub.close(), WAIT)  # the stream had ended: nothing to wait for


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


def test_token_expired_reason_maps_to_its_class() -> None:
    def status(code: grpc.StatusCode, reason: str) -> status_pb2.Status:
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="nerve.v1"))
        return status_pb2.Status(code=code.value[0], message="m", details=[packed])

    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    expired = from_status(unauthenticated, "m", status(unauthenticated, "TOKEN_EXPIRED"))
    assert isinstance(expired, TokenExpiredError) and isinstance(expired, UnauthenticatedError)
    assert expired.reason == "TOKEN_EXPIRED"
    assert type(from_status(unauthenticated, "m", None)) is UnauthenticatedError
    assert type(from_status(unauthenticated, "m", status(unauthenticated, "OTHER"))) is UnauthenticatedError
    # the reason names the class only under its status code
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert type(from_status(denied, "m", status(denied, "TOKEN_EXPIRED"))) is PermissionDeniedError


#: The principal of the token tests: it publishes (as source "replayer", its id) and replays everything.
_REPLAYER_POLICY = """
[[principal]]
id = "replayer"
allow = { publish = [">"], replay = [">"] }
"""

#: Small HTTP/2 windows (no BDP probing to widen them): an unread replay holds the server back after a few
#: pages, so it cannot push the whole history into this side's buffers while a test waits.
_SMALL_WINDOWS = [("grpc.http2.lookahead_bytes", 16 * 1024), ("grpc.http2.bdp_probe", 0)]


@pytest.fixture
def jwt_server() -> Iterator[JwtServer]:
    server = JwtServer(server_binary(), _REPLAYER_POLICY)
    try:
        yield server
    finally:
        server.stop()


class _Tokens(grpc.AuthMetadataPlugin):
    """Call credentials that take a bearer token from ``mint`` for every call, as a refreshing credential
    fetches the current one; records when each call asked and the expiry of the token it got."""

    def __init__(self, mint: Callable[[], tuple[str, int]]) -> None:
        self._mint = mint
        self.asked: list[float] = []
        self.expiries: list[int] = []

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        token, expires = self._mint()
        self.asked.append(time.time())
        self.expiries.append(expires)
        callback((("authorization", f"Bearer {token}"),), None)


def _bearer(tokens: grpc.AuthMetadataPlugin) -> grpc.ChannelCredentials:
    # gRPC sends call credentials only on a secure channel; local credentials allow them over plaintext
    # loopback TCP, which the test server listens on
    return grpc.composite_channel_credentials(grpc.local_channel_credentials(), grpc.metadata_call_credentials(tokens))


def _in(seconds: float) -> int:
    """A token expiry (whole unix seconds, as ``exp``) at least ``seconds`` from now."""
    return math.ceil(time.time() + seconds)


async def _until_expired(expires: int) -> None:
    """Waits until a token of expiry ``expires`` is refused (the server allows no leeway), bounded."""
    wait = expires - time.time() + 0.2
    assert wait < 5, f"the token expires in {wait:.1f}s"
    await asyncio.sleep(max(wait, 0))


async def _publish_history(server: JwtServer, count: int) -> list[int]:
    """Publishes ``count`` events of about 1 KB of type ``history.x`` with a long-lived token."""
    long_lived = _Tokens(lambda: (server.token("replayer", _in(600)), _in(600)))
    async with Client.connect(server.addr, credentials=_bearer(long_lived), ready_timeout=WAIT) as client:
        sequences: list[int] = []
        for batch in range(0, count, 500):
            ids = range(batch, min(batch + 500, count))
            results = await client.publish(*(event("replayer", "history.x", bytes(1000), id=f"h{i:05}") for i in ids))
            sequences.extend(r.sequence for r in results)
        return sequences


async def _read(pages: AsyncIterator[pb.ReplayResponse], into: list[int]) -> None:
    async for page in pages:
        into.extend(e.sequence for e in page.events)


async def test_replay_resumes_when_its_token_expires(jwt_server: JwtServer) -> None:
    expected = await _publish_history(jwt_server, 3000)
    # each call gets a token that expires about 2s after it is made, as from a refreshing credential
    tokens = _Tokens(lambda: (jwt_server.token("replayer", _in(2)), _in(2)))
    async with Client.connect(
        jwt_server.addr, credentials=_bearer(tokens), options=_SMALL_WINDOWS, ready_timeout=WAIT
    ) as client:
        replay = client.replay("history.x", page_size=100)
        pages = replay.pages()
        first = await asyncio.wait_for(anext(pages), WAIT)
        seen = [e.sequence for e in first.events]
        assert len(seen) == 100 and len(tokens.expiries) == 1
        # the server ends the stream when the first token expires; the replay reopens it with a fresh one
        await _until_expired(tokens.expiries[0])
        await asyncio.wait_for(_read(pages, seen), WAIT)

    assert len(tokens.expiries) > 1, "the first call's stream did not end: nothing was resumed"
    assert tokens.asked[1] >= tokens.expiries[0], "reopened before the first token expired"
    assert seen == expected, "all 3,000 events, each once, in order"
    assert replay.end_of_history and replay.count == 3000


async def test_replay_with_a_static_token_raises_token_expired_at_its_first_refusal(jwt_server: JwtServer) -> None:
    await _publish_history(jwt_server, 3000)
    expires = _in(2)
    token = jwt_server.token("replayer", expires)
    tokens = _Tokens(lambda: (token, expires))  # a token that never refreshes
    async with Client.connect(
        jwt_server.addr, credentials=_bearer(tokens), options=_SMALL_WINDOWS, ready_timeout=WAIT
    ) as client:
        replay = client.replay("history.x", page_size=100)
        pages = replay.pages()
        seen = [e.sequence for e in (await asyncio.wait_for(anext(pages), WAIT)).events]
        await _until_expired(expires)
        with pytest.raises(TokenExpiredError) as info:
            await asyncio.wait_for(_read(pages, seen), WAIT)
        error = info.value
        assert isinstance(error, UnauthenticatedError) and error.code == grpc.StatusCode.UNAUTHENTICATED
        assert error.reason == "TOKEN_EXPIRED", error
        # the call the stream ended on, then one reopening refused with the same expired token: a second
        # refusal as expired with no page between is raised, though max_resumes (3) would allow more
        assert len(tokens.asked) == 1 + 1, tokens.asked
        assert len(seen) == replay.count < 3000 and not replay.end_of_history

        # a replay whose token has already expired is refused at once, and reopened only once
        with pytest.raises(TokenExpiredError):
            await asyncio.wait_for(client.replay("history.x").collect(), WAIT)
        assert len(tokens.asked) == 2 + 2, tokens.asked

        # any call made with an expired token is refused the same way
        with pytest.raises(TokenExpiredError):
            await client.publish(event("replayer", "history.x", "late"))

    # a token that does not verify is refused, but not as expired
    forged = jwt_server.token("replayer", _in(600), secret=b"0" * 64)
    async with Client.connect(
        jwt_server.addr, credentials=_bearer(_Tokens(lambda: (forged, 0))), ready_timeout=WAIT
    ) as client:
        with pytest.raises(UnauthenticatedError) as refused:
            await client.publish(event("replayer", "history.x", "forged"))
        assert not isinstance(refused.value, TokenExpiredError) and refused.value.reason != "TOKEN_EXPIRED"


@pytest.mark.parametrize(
    ("end_of_history", "limit"), [(True, 0), (False, 2)], ids=["at-the-end-of-history", "at-its-limit"]
)
async def test_a_replay_that_breaks_after_its_last_page_ends_cleanly(end_of_history: bool, limit: int) -> None:
    calls = 0

    async def broken(
        request: pb.ReplayRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ReplayResponse]:
        # one page of two events, then the stream breaks instead of ending with OK, as a connection lost
        # right after the last page does
        nonlocal calls
        calls += 1
        yield pb.ReplayResponse(
            events=[ev("r1", "history.x"), ev("r2", "history.x")], resume_token="after-r2", end_of_history=end_of_history
        )
        await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost after the last page")

    async with _event_bus(Replay=_replay_handler(broken)) as target:
        async with Client.connect(target, ready_timeout=WAIT) as client:
            replay = client.replay(limit=limit)
            events = await asyncio.wait_for(replay.collect(), WAIT)
            assert [e.id for e in events] == ["r1", "r2"] and calls == 1, calls


@contextlib.asynccontextmanager
async def _event_bus(**methods: grpc.RpcMethodHandler[Any, Any]) -> AsyncIterator[str]:
    """A gRPC server on a loopback port serving ``methods`` of nerve.v1.EventBus (the others UNIMPLEMENTED),
    as a server that misbehaves on purpose; yields its address."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("nerve.v1.EventBus", methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def _replay_handler(
    handler: Callable[[pb.ReplayRequest, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[pb.ReplayResponse]],
) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_stream_rpc_method_handler(
        handler,
        request_deserializer=pb.ReplayRequest.FromString,
        response_serializer=pb.ReplayResponse.SerializeToString,
    )


def _subscribe_handler(
    handler: Callable[[AsyncIterator[pb.SubscribeRequest], grpc.aio.ServicerContext[Any, Any]], Awaitable[None]],
) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.stream_stream_rpc_method_handler(
        handler,
        request_deserializer=pb.SubscribeRequest.FromString,
        response_serializer=pb.SubscribeResponse.SerializeToString,
    )


async def test_aclose_while_a_replay_backs_off_reopens_nothing() -> None:
    calls = 0

    async def breaking(
        request: pb.ReplayRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ReplayResponse]:
        # a page, then the stream breaks, every time: a replay reopens it after a backoff
        nonlocal calls
        calls += 1
        yield pb.ReplayResponse(events=[ev(f"r{calls}", "history.x")], resume_token=f"after-r{calls}")
        await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")

    async with _event_bus(Replay=_replay_handler(breaking)) as target:
        async with Client.connect(target, ready_timeout=WAIT) as client:
            replay = client.replay()
            pages = replay.pages()
            first = await asyncio.wait_for(anext(pages), WAIT)
            call = replay._call
            seen = [e.sequence for e in first.events]
            reading = asyncio.create_task(_read(pages, seen))  # reads on to the break, then backs off
            # the first call has ended: cancelling it stops nothing, and aclose() must keep the replay from
            # reopening it, whether the reader already backs off or has yet to see the break
            assert await asyncio.wait_for(call.code(), WAIT) == grpc.StatusCode.UNAVAILABLE
            await replay.aclose()
            await asyncio.wait_for(reading, WAIT)  # ends cleanly, raising nothing
            assert calls == 1, f"the replay was reopened after aclose(): {calls} calls"
            assert replay.count == 1 and replay.resume_token == "after-r1"


async def _stalled_replay(
    request: pb.ReplayRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[pb.ReplayResponse]:
    """A Replay handler that sends one page, then never the next."""
    yield pb.ReplayResponse(events=[ev("r1", "history.x")], resume_token="after-r1")
    await asyncio.Event().wait()


async def test_aclose_ends_the_iteration_of_a_replay_another_task_waits_on() -> None:
    async def read(replay: Replay, seen: list[str], first: asyncio.Event) -> None:
        async for page in replay.pages():
            seen.extend(e.id for e in page.events)
            first.set()  # from here the task goes on to wait for the next page

    async with _event_bus(Replay=_replay_handler(_stalled_replay)) as target:
        async with Client.connect(target, ready_timeout=WAIT) as client:
            # a task nobody cancels, waiting for a page when the replay is closed: its iteration ends
            seen: list[str] = []
            replay, first = client.replay(), asyncio.Event()
            reading = asyncio.create_task(read(replay, seen, first))
            await asyncio.wait_for(first.wait(), WAIT)
            await replay.aclose()
            await asyncio.wait([reading], timeout=WAIT)
            assert reading.done(), "the iteration did not end at aclose()"
            assert not reading.cancelled(), "aclose() raised CancelledError in a task nobody cancelled"
            reading.result()
            assert seen == ["r1"]
            # a task that is cancelled itself, as its replay is closed, still raises CancelledError
            # (Python 3.10 cannot tell that from the call's cancellation: the iteration ends there)
            if sys.version_info >= (3, 11):
                seen.clear()
                replay, first = client.replay(), asyncio.Event()
                reading = asyncio.create_task(read(replay, seen, first))
                await asyncio.wait_for(first.wait(), WAIT)
                reading.cancel()
                await replay.aclose()
                await asyncio.wait([reading], timeout=WAIT)
                assert reading.cancelled(), "the task's own cancellation was swallowed"
            # a replay closed before it is iterated opens no call
            closed = client.replay()
            await closed.aclose()
            assert await asyncio.wait_for(closed.collect(), WAIT) == [] and closed._call is None


async def test_closing_the_client_fails_a_call_in_flight_with_closed_error(client: Client) -> None:
    responder = await client.subscribe("unanswered.asked", group="silent")  # never answers
    asking = asyncio.create_task(client.request(ev("q1", "unanswered.asked"), timeout=30))
    await responder.next(timeout=WAIT)  # the request is in flight
    # and a task that is cancelled itself as the client closes still raises CancelledError
    # (Python 3.10 cannot tell that from the call's cancellation)
    cancelled = asyncio.create_task(client.request(ev("q2", "unanswered.asked"), timeout=30))
    await responder.next(timeout=WAIT)
    if sys.version_info >= (3, 11):
        cancelled.cancel()
    await client.close()
    with pytest.raises(ClosedError):
        await asyncio.wait_for(asking, WAIT)
    await asyncio.wait([cancelled], timeout=WAIT)
    if sys.version_info >= (3, 11):
        assert cancelled.cancelled(), "the task's own cancellation was swallowed"
    else:
        cancelled.cancel()


async def test_calls_after_the_client_closed_raise_closed_error(client: Client) -> None:
    await client.close()
    with pytest.raises(ClosedError):
        await client.publish(ev("late", "late.x"))
    with pytest.raises(ClosedError):
        await client.request(ev("late-q", "late.x"), timeout=1)
    with pytest.raises(ClosedError):
        await client.reply("inbox", ev("late-a", "late.x"))
    with pytest.raises(ClosedError):
        await client.get_event("late")
    with pytest.raises(ClosedError):
        await client.group("late")
    with pytest.raises(ClosedError):
        await client.list_groups()
    with pytest.raises(ClosedError):
        await client.list_event_types()
    with pytest.raises(ClosedError):
        await client.delete_group("late")
    with pytest.raises(ClosedError):
        await client.redrive_dead_letters("late", all=True)
    with pytest.raises(ClosedError):
        [d async for d in client.dead_letters("late")]
    with pytest.raises(ClosedError):
        await client.replay().collect()
    with pytest.raises(ClosedError):
        await client.subscribe("late.x")
    with pytest.raises(ClosedError):
        async with client.subscribe("late.x"):
            pass
    with pytest.raises(ClosedError):
        await client.publisher()


async def test_closing_the_client_ends_a_replay_in_flight_with_closed_error() -> None:
    async with _event_bus(Replay=_replay_handler(_stalled_replay)) as target:
        async with Client.connect(target, ready_timeout=WAIT) as client:
            pages = client.replay().pages()
            first = await asyncio.wait_for(anext(pages), WAIT)
            seen = [e.sequence for e in first.events]
            reading = asyncio.create_task(_read(pages, seen))  # waits for the next page
            await asyncio.sleep(0.1)
            await client.close()
            await asyncio.wait([reading], timeout=WAIT)
            assert reading.done(), "the iteration did not end when the client closed"
            assert not reading.cancelled(), "closing the client raised CancelledError in a task nobody cancelled"
            with pytest.raises(ClosedError):
                reading.result()


async def test_an_open_the_server_does_not_confirm_raises_timeout_error() -> None:
    ended = asyncio.Event()

    async def unconfirmed(
        requests: AsyncIterator[pb.SubscribeRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        try:
            await context.read()  # the open, never confirmed
            await asyncio.Event().wait()
        finally:
            ended.set()

    async with _event_bus(Subscribe=_subscribe_handler(unconfirmed)) as target:
        async with Client.connect(target, ready_timeout=WAIT) as client:
            # the builtin TimeoutError, as next() and until_caught_up() raise (asyncio's is another class
            # before Python 3.11), saying what timed out
            with pytest.raises(TimeoutError, match="did not confirm the subscription within 0.2s") as info:
                await asyncio.wait_for(client.subscribe("silent.x", open_timeout=0.2), WAIT)
            assert type(info.value) is TimeoutError and not isinstance(info.value, NerveError)
            await asyncio.wait_for(ended.wait(), WAIT)  # and the call was cancelled


class _OlderAdmin(admin_pb2_grpc.AdminServicer):
    """An Admin server from before GetGroup: it lists groups, one per page."""

    names = ["first", "second"]

    async def ListGroups(  # noqa: N802 (the generated servicer's name)
        self, request: admin_pb2.ListGroupsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.ListGroupsResponse:
        i = self.names.index(request.page_token) + 1 if request.page_token else 0
        if i >= len(self.names):
            return admin_pb2.ListGroupsResponse()
        token = self.names[i] if i + 1 < len(self.names) else ""
        return admin_pb2.ListGroupsResponse(groups=[admin_pb2.GroupInfo(name=self.names[i])], next_page_token=token)


async def test_group_falls_back_to_the_list_on_a_server_without_get_group() -> None:
    server = grpc.aio.server()
    # only ListGroups: the servicer answers every other method UNIMPLEMENTED, as an older server does GetGroup
    admin_pb2_grpc.add_AdminServicer_to_server(_OlderAdmin(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with Client.connect(f"127.0.0.1:{port}", ready_timeout=WAIT) as client:
            group = await client.group("second")
            assert group is not None and group.name == "second"
            assert await client.group("third") is None
    finally:
        await server.stop(None)


async def test_close_raises_an_error_end_nothing_had_told(client: Client) -> None:
    # the server ends the member's stream when its group is deleted; nothing here reads that end
    sub = await client.subscribe("told.x", group="told", heartbeat_interval=0.2)
    assert await client.delete_group("told")
    await asyncio.wait_for(asyncio.wait([sub._stream_end]), WAIT)
    with pytest.raises(NotFoundError):
        await sub.close()
    # an end reading already raised is not raised again
    read = await client.subscribe("told.y", group="told-read", heartbeat_interval=0.2)
    assert await client.delete_group("told-read")

    async def drain() -> None:
        while await read.next_message() is not None:
            pass

    with pytest.raises(NotFoundError):
        await asyncio.wait_for(drain(), WAIT)
    await read.close()


async def test_every_waiting_reader_gets_the_end(client: Client) -> None:
    # several worker tasks reading one subscription, all waiting for a delivery when it closes
    sub = await client.subscribe("readers.x", group="readers")
    readers = [asyncio.create_task(sub.next()) for _ in range(3)]
    await asyncio.sleep(0)
    await asyncio.wait_for(sub.close(), WAIT)
    ended = await asyncio.wait_for(asyncio.gather(*readers, return_exceptions=True), WAIT)
    assert all(isinstance(e, ClosedError) for e in ended), ended


async def test_the_read_ahead_takes_the_window_the_server_confirms() -> None:
    # a server whose default window is not the usual 64: a subscription that asks for none learns it on open,
    # and reads ahead all of it without the application taking any
    server = ServerProcess(server_binary(), {"NERVE_BUS__DEFAULT_MAX_IN_FLIGHT": "200"})
    try:
        async with Client.connect(server.addr, ready_timeout=WAIT) as client:
            await client.publish(*(ev(f"r{i}", "wide.x") for i in range(150)))
            async with client.subscribe("wide.x", start="earliest") as sub:
                assert sub.subscribed.max_in_flight == 200

                async def all_read_ahead() -> bool | None:
                    return True if sub._inbox._deliveries == 150 else None

                await eventually("every delivery read ahead", all_read_ahead)
                assert [(await sub.next(timeout=WAIT)).event.id for _ in range(150)] == [f"r{i}" for i in range(150)]
    finally:
        server.stop()


def test_a_replay_waits_at_most_five_seconds_before_reopening() -> None:
    # doubling from 0.2 s: a server back after a restart is used within 5 s, whatever max_resumes allows
    waits = {n: _resume_backoff(n) for n in (1, 2, 5, 6, 10, 100, 2000)}
    assert waits == {1: 0.2, 2: 0.4, 5: 3.2, 6: 5.0, 10: 5.0, 100: 5.0, 2000: 5.0}, waits
