"""A value of the wrong type is refused where the message is built, with a TypeError naming the argument (protobuf's
own says only "bad argument type for built-in operation"); what protobuf takes (str, UTF-8 bytes, None for a
field it leaves unset) still works. No nerve-server needed: nothing here reaches one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from nerve_client import Client, event, exact, pb, prefix, suffix

from .conftest import WAIT
from .test_client import _event_bus, _subscribe_handler


def test_filter_builders_name_a_value_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match="^exact attribute subject must be a str, not int$"):
        exact(subject=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^prefix attribute type must be a str, not NoneType$"):
        prefix({"type": None})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="^suffix attribute name must be a str, not int$"):
        suffix({7: "x"})  # type: ignore[dict-item]
    # a name given as bytes is named as its text
    with pytest.raises(TypeError, match="^exact attribute subject must be a str, not int$"):
        exact({b"subject": 5})  # type: ignore[dict-item]
    # as protobuf takes them: UTF-8 bytes as their text
    built = exact({b"subject": b"invoice-7"})  # type: ignore[dict-item]
    assert dict(built.exact.attributes) == {"subject": "invoice-7"}


def test_event_names_an_extension_name_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match="^event extension name must be a str, not int$"):
        event("//s", "t", extensions={5: "x"})  # type: ignore[dict-item]
    assert list(event("//s", "t", extensions={b"tenant": "acme"}).extensions) == ["tenant"]  # type: ignore[dict-item]


@pytest.fixture
async def offline() -> AsyncIterator[Client]:
    """A client of an address nothing listens on, never connected: the calls here raise before sending."""
    async with Client.connect("127.0.0.1:1", ready_timeout=None) as client:
        yield client


async def test_subscribe_names_its_group_and_types(offline: Client) -> None:
    with pytest.raises(TypeError, match="^subscribe group must be a str, not int$"):
        offline.subscribe("a.x", group=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^subscribe types\[1\] must be a str, not int$"):
        offline.subscribe(["a.x", 5])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="^subscribe types must be a str or an iterable of str, not int$"):
        offline.subscribe(5)  # type: ignore[arg-type]
    # an iterable, but of ints: not one pattern
    with pytest.raises(TypeError, match="^subscribe types must be a str or an iterable of str, not bytes$"):
        offline.subscribe(b"a.x")  # type: ignore[arg-type]
    # what protobuf takes still opens (lazily: nothing is sent until awaited)
    offline.subscribe((t for t in ["a.x", b"b.>"]), group=b"workers")  # type: ignore[misc, arg-type]


async def test_replay_names_its_text_arguments(offline: Client) -> None:
    with pytest.raises(TypeError, match="^replay source must be a str, not int$"):
        offline.replay(source=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^replay resume_token must be a str, not bytearray$"):
        offline.replay(resume_token=bytearray(b"t"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^replay types\[0\] must be a str, not NoneType$"):
        offline.replay([None])  # type: ignore[list-item]
    replay = offline.replay(subject=b"invoice-7", correlation_id=None)  # type: ignore[arg-type]
    assert replay._request.subject == "invoice-7"


async def test_reply_names_reply_to(offline: Client) -> None:
    with pytest.raises(TypeError, match="^reply_to must be a str, Delivery or Event, not int$"):
        await offline.reply(5, event("//s", "t"))  # type: ignore[arg-type]
    # an empty inbox is still the ValueError it was
    with pytest.raises(ValueError, match="reply_to is empty"):
        await offline.reply(event("//s", "t"), event("//s", "t"))


async def test_admin_calls_name_their_text_arguments(offline: Client) -> None:
    with pytest.raises(TypeError, match="^get_event id must be a str, not int$"):
        await offline.get_event(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^get_event source must be a str, not list$"):
        await offline.get_event("e1", ["//s"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^group name must be a str, not int$"):
        await offline.group(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^delete_group group must be a str, not int$"):
        await offline.delete_group(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^dead_letters group must be a str, not int$"):
        await offline.dead_letters(5).__anext__()  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^redrive_dead_letters group must be a str, not int$"):
        await offline.redrive_dead_letters(5, all=True)  # type: ignore[arg-type]


async def test_dead_letter_names_its_reason_and_takes_bytes_and_none() -> None:
    received: asyncio.Queue[pb.SubscribeRequest] = asyncio.Queue()

    async def confirms(
        requests: AsyncIterator[pb.SubscribeRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await context.read()  # the open
        await context.write(pb.SubscribeResponse(subscribed=pb.Subscribed(subscription_id="s1")))
        while (request := await context.read()) is not grpc.aio.EOF:
            if request.WhichOneof("action") == "close":
                return
            received.put_nowait(request)

    async with _event_bus(Subscribe=_subscribe_handler(confirms)) as target:
        async with Client.connect(target, ready_timeout=WAIT) as client:
            async with await asyncio.wait_for(client.subscribe("a.x"), WAIT) as sub:
                with pytest.raises(TypeError, match="^dead_letter reason must be a str, not int$"):
                    await sub.dead_letter("d1", reason=5)  # type: ignore[arg-type]
                # as protobuf takes text: UTF-8 bytes (mended where they are not), None as no reason
                await sub.dead_letter("d2", reason=b"bad \xff input")  # type: ignore[arg-type]
                await sub.dead_letter("d3", reason=None)  # type: ignore[arg-type]
                first = (await asyncio.wait_for(received.get(), WAIT)).nack
                second = (await asyncio.wait_for(received.get(), WAIT)).nack
    assert (list(first.delivery_ids), first.reason) == (["d2"], "bad \ufffd input")
    assert (list(second.delivery_ids), second.reason, second.dead_letter) == (["d3"], "", True)
