# mypy: disallow-subclassing-any=False
"""Limits a public site needs: rooms per socket, heartbeat floods, can_join.

A socket may be in CHANNELS_PRESENCE_MAX_ROOMS_PER_CONNECTION rooms at most;
however many heartbeats it sends, its presences are written at most once per
touch interval; and whatever its frames say, it is only ever in the rooms its
URL (or hook) names and ``can_join`` allows.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import redis
from channels.routing import URLRouter
from django.conf import settings
from django.core.checks import run_checks
from django.test import override_settings
from django.urls import path

from channels_presence import dispatch, operations, outbox
from channels_presence.consumers import PresenceConsumerMixin
from channels_presence.decorators import add_presence
from channels_presence.models import Presence
from example.consumers import RoomConsumer
from tests.consumers import (
    AsyncJsonDecoratedConsumer,
    AsyncJsonEchoConsumer,
    Client,
    JsonDecoratedConsumer,
    JsonEchoConsumer,
    connected,
)
from tests.helpers import celery_mode, group_members, sockets, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

ROOMS = ["red", "green", "blue"]


# The number of rooms.


class ThreeRooms(PresenceConsumerMixin, AsyncJsonEchoConsumer):
    presence_rooms = ROOMS


class SyncThreeRooms(PresenceConsumerMixin, JsonEchoConsumer):
    presence_rooms = ROOMS


class TwoDecoratedRooms(JsonDecoratedConsumer):
    @add_presence("red")
    @add_presence("green")
    def connect(self):
        self.accept()


class AsyncTwoDecoratedRooms(AsyncJsonDecoratedConsumer):
    @add_presence("red")
    @add_presence("green")
    async def connect(self):
        await self.accept()


async def refusal(client: Client) -> tuple[dict[str, Any], int]:
    """The error frame the socket got, and the code it was closed with."""
    frame = await client.receive_output(3)
    while frame["type"] == "websocket.send" and '"presence.state"' in frame.get(
        "text", ""
    ):
        frame = await client.receive_output(3)
    assert frame["type"] == "websocket.send", frame
    close = await client.receive_output(3)
    assert close["type"] == "websocket.close", close
    return json.loads(frame["text"]), close["code"]


@pytest.mark.parametrize("consumer", [ThreeRooms, SyncThreeRooms])
async def test_a_socket_asking_for_too_many_rooms_is_told_closed_and_joins_none(
    consumer,
) -> None:
    with override_settings(CHANNELS_PRESENCE_MAX_ROOMS_PER_CONNECTION=2):
        client = Client(consumer.as_asgi())
        accepted, _ = await client.connect(3)
        assert accepted
        error, code = await refusal(client)
        await client.disconnect()

    assert code == dispatch.TOO_MANY_ROOMS == 4429
    assert error == {
        "type": "presence.error",
        "error": "too_many_rooms",
        "limit": 2,
        "message": "This connection may be in 2 rooms at most.",
    }
    assert await sockets() == set()
    for room in ROOMS:
        assert group_members(room) == set()


@pytest.mark.parametrize("consumer", [ThreeRooms, SyncThreeRooms])
async def test_a_socket_within_the_limit_joins_every_room(consumer) -> None:
    with override_settings(CHANNELS_PRESENCE_MAX_ROOMS_PER_CONNECTION=3):
        async with connected(consumer.as_asgi()) as client:
            await client.receive_type("presence.state")
            assert len(await sockets()) == 1
            for room in ROOMS:
                assert len(group_members(room)) == 1


async def test_no_limit_with_none() -> None:
    with override_settings(CHANNELS_PRESENCE_MAX_ROOMS_PER_CONNECTION=None):
        async with connected(ThreeRooms.as_asgi()) as client:
            await client.receive_type("presence.state")
            assert await Presence.objects.acount() == len(ROOMS)


@pytest.mark.parametrize("consumer", [TwoDecoratedRooms, AsyncTwoDecoratedRooms])
async def test_a_decorated_socket_past_the_limit_is_told_and_closed(consumer) -> None:
    with override_settings(CHANNELS_PRESENCE_MAX_ROOMS_PER_CONNECTION=1):
        client = Client(consumer.as_asgi())
        accepted, _ = await client.connect(3)
        assert accepted
        error, code = await refusal(client)
        # The room within the limit was joined; the one past it never was.
        assert [p.room.channel_name async for p in _presences()] == ["green"]
        assert group_members("red") == set()
        await client.disconnect()

    assert code == 4429
    assert error["error"] == "too_many_rooms"
    assert await sockets() == set()
    assert group_members("green") == set()


def _presences() -> Any:
    return Presence.objects.select_related("room")


@pytest.mark.parametrize("value", [0, -1, 2.5, "10", True])
def test_a_bad_room_limit_is_reported_at_startup(value: Any) -> None:
    with override_settings(CHANNELS_PRESENCE_MAX_ROOMS_PER_CONNECTION=value):
        found = [m for m in run_checks() if m.id == "channels_presence.E007"]
    assert len(found) == 1
    assert "MAX_ROOMS_PER_CONNECTION" in found[0].msg


@pytest.mark.parametrize("value", [None, 1, 100])
def test_a_good_room_limit_is_not_reported(value: Any) -> None:
    with override_settings(CHANNELS_PRESENCE_MAX_ROOMS_PER_CONNECTION=value):
        assert not [m for m in run_checks() if m.id == "channels_presence.E007"]


# A heartbeat flood.

#: The touch interval of the flood tests, and how long they flood.
INTERVAL = 0.5
FLOOD_SECONDS = 1.6


class Lobby(PresenceConsumerMixin, AsyncJsonEchoConsumer):
    presence_rooms = ["lobby"]


async def flood(client: Client) -> tuple[int, float]:
    """Heartbeats as fast as the socket takes them; how many, and for how long."""
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < FLOOD_SECONDS:
        for _ in range(200):
            await client.send_to(text_data='"heartbeat"')
        sent += 200
        # Each frame is handled in order: once this is echoed, all were seen.
        await client.answer('"ping"')
    return sent, time.monotonic() - start


async def test_a_heartbeat_flood_writes_once_per_touch_interval_inline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    touches: list[list[str]] = []
    touch = operations.touch

    def counted(channel_names: Any, **kwargs: Any) -> int:
        # The real touch runs: only how often it runs is noted.
        touches.append(list(channel_names))
        return touch(channel_names, **kwargs)

    monkeypatch.setattr(operations, "touch", counted)
    with override_settings(CHANNELS_PRESENCE_TOUCH_INTERVAL=INTERVAL):
        async with connected(Lobby.as_asgi()) as client:
            await client.receive_type("presence.state")
            sent, took = await flood(client)

    with capsys.disabled():
        print(
            f"\n[limits] inline: {sent} heartbeats in {took:.1f} s, "
            f"{len(touches)} touches"
        )
    assert sent >= 1000
    # The join wrote last_seen: the first touch is due one interval later.
    assert 1 <= len(touches) <= took / INTERVAL + 1
    assert all(len(names) == 1 for names in touches)


async def test_a_heartbeat_flood_sends_one_touch_per_interval_to_the_broker(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with (
        celery_mode(),
        override_settings(CHANNELS_PRESENCE_TOUCH_INTERVAL=INTERVAL),
    ):
        async with connected(Lobby.as_asgi()) as client:
            await wait_until(lambda: bool(group_members("lobby")))
            (channel,) = group_members("lobby")
            sent, took = await flood(client)
            assert outbox.default.flush(10)
            touched = [
                names
                for task, (names, *_) in queued_tasks()
                if task == outbox.TOUCH_TASK
                for name in names
                if name == channel
            ]

    with capsys.disabled():
        print(
            f"\n[limits] Celery: {sent} heartbeats in {took:.1f} s, "
            f"{len(touched)} touches"
        )
    assert sent >= 1000
    # Each touch_presences task is one UPDATE at the worker.
    assert 1 <= len(touched) <= took / INTERVAL + 1


def queued_tasks() -> list[tuple[str, list[Any]]]:
    """The tasks waiting in the run's queue: (name, args), oldest first."""
    prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"]
    with redis.Redis.from_url(settings.CELERY_BROKER_URL) as client:
        raw = client.lrange(prefix + settings.CELERY_TASK_DEFAULT_QUEUE, 0, -1)
    found = []
    for item in reversed(raw):
        message = json.loads(item)
        args, _, _ = json.loads(base64.b64decode(message["body"]))
        found.append((message["headers"]["task"], args))
    return found


# can_join, whatever the frames say.


class Guarded(RoomConsumer):
    """The example's consumer, allowed in the lobby only; notes what it was asked."""

    async def can_join(self, room: str) -> bool:
        self.scope["asked"].append(room)
        return room == "lobby"


def guarded() -> Any:
    return URLRouter([path("ws/rooms/<str:room>/", Guarded.as_asgi())])


#: Frames that a client might hope would put it in a room.
CRAFTED = [
    {"join": "secret"},
    {"type": "join", "room": "secret"},
    {"type": "presence.join", "rooms": ["secret", "SECRET", "Secret"]},
    {"type": "websocket.connect", "room": "secret"},
    {"type": "presence.changed", "room": "secret", "members": []},
    {"type": "presence.expired", "room": "secret", "channel_names": []},
    {"room": "secret", "join": True, "extra": {"nested": [{"room": "secret"}]}},
    {"message": "hi", "room": "secret"},
    {"rooms": ["s\u00e9cret", "secret\u0000", "secret" * 30]},
    ["join", "secret"],
    "secret",
]


async def test_no_frame_puts_a_socket_in_a_room_can_join_refused() -> None:
    asked: list[str] = []
    async with connected(guarded(), "/ws/rooms/lobby/", asked=asked) as client:
        await client.receive_type("presence.state")
        (channel,) = group_members("lobby")
        for frame in CRAFTED:
            for _ in range(2):
                await client.send_to(text_data=json.dumps(frame))
        # The chat message above went to the lobby, the socket's own room.
        await client.receive_type("chat")

        assert asked == ["lobby"]
        present = Presence.objects.filter(channel_name=channel)
        assert [
            p async for p in present.values_list("room__channel_name", flat=True)
        ] == ["lobby"]
        for room in ("secret", "SECRET", "Secret"):
            assert group_members(room) == set()


@pytest.mark.parametrize("room", ["secret", "SECRET", "Secret", "secret.", "s-e_c"])
async def test_a_refused_room_is_never_joined_whatever_its_case(room: str) -> None:
    asked: list[str] = []
    async with connected(guarded(), f"/ws/rooms/{room}/", asked=asked) as client:
        for _ in range(3):
            await client.send_to(text_data=json.dumps({"join": room}))
            await client.send_to(text_data='"heartbeat"')
        await client.send_to(text_data=json.dumps({"message": "hi"}))
        # Told once, at connect, that the room is refused.
        refused = json.loads(await client.receive_from(3))
        assert (refused["error"], refused["room"]) == ("forbidden", room)
        # Not in the room's group: neither its chat nor its presence reaches it.
        assert await client.receive_nothing(0.5)
        # Asked, with the exact name it would have been joined under.
        assert asked == [room]
        assert await sockets() == set()
        assert group_members(room) == set()


async def test_a_room_channels_cannot_use_joins_nothing_and_says_why() -> None:
    client = Client(guarded(), "/ws/rooms/s\u00e9cret/", asked=[])
    # Refused before the consumer's connect(): told why, then closed (4400).
    await client.connect(3)
    error = json.loads(await client.receive_from(3))
    assert error["error"] == "bad_room"
    assert "not a valid Channels group name" in error["message"]
    assert await client.receive_output(3) == {"type": "websocket.close", "code": 4400}
    await client.disconnect()
    assert await sockets() == set()
