"""The built-in presence_changed receiver: each change, to the room's events group."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from channels_presence.consumers import PresenceConsumerMixin
from channels_presence.groups import events_group
from channels_presence.models import Presence, Room
from tests.consumers import (
    ROOMS,
    AsyncJsonEchoConsumer,
    AsyncLegacyConsumer,
    LegacyConsumer,
    connected,
)
from tests.helpers import TIMEOUT, make_user, set_last_seen_back

pytestmark = pytest.mark.django_db(transaction=True)

EVENT = "presence.changed"
EXPIRED = "presence.expired"


class WatchingConsumer(PresenceConsumerMixin, AsyncJsonEchoConsumer):
    presence_rooms = ("lobby",)


def layer() -> Any:
    return get_channel_layer()


async def subscribe(*rooms: str) -> str:
    """A new channel in the events groups of ``rooms``, as a consumer would be."""
    channel: str = await layer().new_channel()
    for room in rooms:
        await layer().group_add(events_group(room), channel)
    return channel


async def receive(channel: str) -> dict[str, Any]:
    async with asyncio.timeout(TIMEOUT):
        message: dict[str, Any] = await layer().receive(channel)
    return message


async def receive_until_marker(channel: str) -> list[dict[str, Any]]:
    """Everything ``channel`` got before a marker sent now."""
    await layer().send(channel, {"type": "test.marker"})
    messages = []
    while (message := await receive(channel))["type"] != "test.marker":
        messages.append(message)
    return messages


def assert_plain(value: Any, where: str = "message") -> None:
    """``value`` is made of dicts with str keys, lists, str, int, bool and None."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{where} has key {key!r}"
            assert_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            assert_plain(item, f"{where}[{index}]")
    else:
        assert value is None or type(value) in (str, int, bool), (
            f"{where} is {type(value).__name__}: {value!r}"
        )


def described(channel_name: str, user: Any = None) -> dict[str, Any]:
    return {
        "channel_name": channel_name,
        "user_id": user.pk if user is not None else None,
        "username": user.username if user is not None else None,
    }


async def test_a_join_is_sent_as_plain_values():
    alice = await make_user("alice")
    watcher = await subscribe("lobby")
    socket = await layer().new_channel()

    await Room.objects.aadd("lobby", socket, alice)

    message = await receive(watcher)
    json.dumps(message)
    assert_plain(message)
    assert message == {
        "type": EVENT,
        "room": "lobby",
        "added": described(socket, alice),
        "removed": None,
        "bulk_change": False,
        "members": [{"id": alice.pk, "username": "alice"}],
        "anonymous": 0,
    }


async def test_a_leave_is_sent_as_plain_values():
    alice = await make_user("alice")
    sockets = [await layer().new_channel() for _ in range(2)]
    await Room.objects.aadd("lobby", sockets[0], alice)
    await Room.objects.aadd("lobby", sockets[1])
    watcher = await subscribe("lobby")

    await Room.objects.aremove("lobby", sockets[0])

    message = await receive(watcher)
    json.dumps(message)
    assert_plain(message)
    assert message == {
        "type": EVENT,
        "room": "lobby",
        "added": None,
        "removed": described(sockets[0], alice),
        "bulk_change": False,
        "members": [],
        "anonymous": 1,
    }


async def test_a_prune_is_sent_as_one_notice_then_one_bulk_change_per_room():
    alice = await make_user("alice")
    stale_everywhere, stale_in_lobby, fresh = [
        await layer().new_channel() for _ in range(3)
    ]
    for room in ROOMS:
        await Room.objects.aadd(room, stale_everywhere)
        await Room.objects.aadd(room, fresh, alice)
    await Room.objects.aadd("lobby", stale_in_lobby)
    await set_last_seen_back(stale_everywhere)
    await set_last_seen_back(stale_in_lobby)
    watcher = await subscribe(*ROOMS)

    await Room.objects.aprune_presences(age=60)

    messages = await receive_until_marker(watcher)
    json.dumps(messages)
    assert_plain(messages)
    stale = {
        "lobby": sorted([stale_everywhere, stale_in_lobby]),
        "news": [stale_everywhere],
    }
    for room, channel_names in stale.items():
        notice, change = [m for m in messages if m["room"] == room]
        # The notice names the room's stale sockets, in no particular order.
        assert {**notice, "channel_names": sorted(notice["channel_names"])} == {
            "type": EXPIRED,
            "room": room,
            "channel_names": channel_names,
        }
        assert change == {
            "type": EVENT,
            "room": room,
            "added": None,
            "removed": None,
            "bulk_change": True,
            "members": [{"id": alice.pk, "username": "alice"}],
            "anonymous": 0,
        }


async def test_nothing_is_sent_while_broadcast_is_off():
    watcher = await subscribe("lobby")
    unheard, heard = await layer().new_channel(), await layer().new_channel()

    with override_settings(CHANNELS_PRESENCE_BROADCAST=False):
        await Room.objects.aadd("lobby", unheard)
        await Room.objects.aremove("lobby", unheard)
        await Room.objects.aadd("lobby", unheard)
        room = await Room.objects.aget(channel_name="lobby")
        await room.abroadcast_changed(bulk_change=True)
    await Room.objects.aadd("lobby", heard)

    # The first message the watcher gets is the one sent once it was back on.
    message = await receive(watcher)
    assert message["added"] == described(heard)


@pytest.mark.parametrize("legacy", [LegacyConsumer, AsyncLegacyConsumer])
async def test_a_consumer_without_presence_handlers_hears_no_presence_events(legacy):
    async with connected(legacy.as_asgi()) as old:
        await old.answer('"ping"')
        # Others come and go, and are pruned, in the old consumer's rooms.
        async with connected(WatchingConsumer.as_asgi()) as new:
            await new.receive_type("presence")
            socket = await layer().new_channel()
            for room in ROOMS:
                await Room.objects.aadd(room, socket)
            await Room.objects.aremove("lobby", socket)
        await set_last_seen_back(socket)
        await Room.objects.aprune_presences(age=60)
        lobby = await Room.objects.aget(channel_name="lobby")
        await lobby.abroadcast_changed(bulk_change=True)

        # The room's group still reaches it, behind anything sent before: a
        # presence event would have closed it ("No handler for message type").
        await layer().group_send("lobby", {"type": "chat.message", "text": "hi"})
        assert await old.receive_type("chat") == {"type": "chat", "text": "hi"}
        await old.answer('"still here"')
        assert [m["type"] for m in old.received_since(0)] == ["echo", "chat", "echo"]
        assert await Presence.objects.acount() == len(ROOMS)


@pytest.mark.parametrize(
    "call",
    [
        lambda room: sync_to_async(room.broadcast_changed)(bulk_change=True),
        lambda room: room.abroadcast_changed(bulk_change=True),
    ],
    ids=["broadcast_changed", "abroadcast_changed"],
)
async def test_broadcast_changed_called_directly_sends(call: Callable[[Room], Any]):
    alice = await make_user("alice")
    room = await Room.objects.aadd("lobby", await layer().new_channel(), alice)
    watcher = await subscribe("lobby")

    await call(room)

    message = await receive(watcher)
    assert_plain(message)
    assert message == {
        "type": EVENT,
        "room": "lobby",
        "added": None,
        "removed": None,
        "bulk_change": True,
        "members": [{"id": alice.pk, "username": "alice"}],
        "anonymous": 0,
    }


def leave_all_queries(channel_name: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        Presence.objects.leave_all(channel_name)
    return len(queries.captured_queries)


async def test_leave_all_of_many_rooms_sends_one_message_per_room_in_few_queries():
    rooms = [f"room-{n}" for n in range(50)]
    few, many = await layer().new_channel(), await layer().new_channel()
    for room in rooms[:2]:
        await Room.objects.aadd(room, few)
    for room in rooms:
        await Room.objects.aadd(room, many)
    watcher = await subscribe(*rooms)

    queries_for_few = await sync_to_async(leave_all_queries)(few)
    await receive_until_marker(watcher)
    queries_for_many = await sync_to_async(leave_all_queries)(many)

    messages = await receive_until_marker(watcher)
    assert sorted(m["room"] for m in messages) == sorted(rooms)
    assert all(m["removed"] == described(many) for m in messages)
    assert all(m["members"] == [] and m["anonymous"] == 0 for m in messages)
    # Reading the members of 50 rooms costs what reading those of 2 does.
    assert queries_for_many == queries_for_few
