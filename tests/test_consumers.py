# mypy: disallow-subclassing-any=False
"""PresenceConsumerMixin on each of the four websocket consumer bases."""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import weakref
from typing import Any

import pytest
from celery import Celery
from channels.consumer import SyncConsumer
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.test import override_settings
from django.urls import path

from channels_presence import dispatch, outbox, sync
from channels_presence.consumers import TRY_AGAIN_LATER, PresenceConsumerMixin
from channels_presence.groups import events_group
from channels_presence.models import Presence, Room
from channels_presence.outbox import Outbox
from channels_presence.sync import states as sync_state
from tests.consumers import (
    ECHO_CONSUMERS,
    ROOMS,
    AsyncEchoConsumer,
    AsyncJsonEchoConsumer,
    AsyncJsonLegacyConsumer,
    AsyncLegacyConsumer,
    Client,
    EchoConsumer,
    JsonEchoConsumer,
    JsonLegacyConsumer,
    LegacyConsumer,
    connected,
    url_room,
)
from tests.helpers import (
    HEARTBEATS,
    LONG_HEARTBEAT,
    TIMEOUT,
    adatabase_down,
    closed_port,
    group_members,
    last_seen,
    layer_down,
    layer_outages,
    make_user,
    set_last_seen_back,
    sockets,
    touched_since,
    wait_until,
    wait_until_touched,
)

pytestmark = pytest.mark.django_db(transaction=True)


def with_presence(base: type, **body: Any) -> Any:
    """``class C(PresenceConsumerMixin, base)`` with ``body`` as its class body."""
    return type(f"Presence{base.__name__}", (PresenceConsumerMixin, base), body)


def reject(self):
    self.close()


async def areject(self):
    await self.close()


def accept_then_close(self):
    self.accept()
    self.close(code=4003)


async def aaccept_then_close(self):
    await self.accept()
    await self.close(code=4003)


async def rows() -> set[tuple[str, str, int | None]]:
    """Every presence as (room, socket, user id)."""
    values = Presence.objects.values_list("room__channel_name", "channel_name", "user")
    return {row async for row in values}


def assert_in_rooms(socket: str, rooms: set[str], *, among: set[str]) -> None:
    """``socket`` is in the groups and events groups of ``rooms``, and no others."""
    for room in among:
        expected = {socket} if room in rooms else set()
        assert group_members(room) == expected, room
        assert group_members(events_group(room)) == expected, room


# Where the rooms come from.


class RoomFromUrlConsumer(PresenceConsumerMixin, JsonEchoConsumer):
    def get_presence_rooms(self):
        return [url_room(self), "news"]


class AsyncRoomFromUrlConsumer(PresenceConsumerMixin, AsyncEchoConsumer):
    async def get_presence_rooms(self):
        return [url_room(self), "news"]


class OneRoomConsumer(PresenceConsumerMixin, AsyncJsonEchoConsumer):
    presence_rooms = "lobby"


class OneRoomFromMethodConsumer(PresenceConsumerMixin, EchoConsumer):
    def get_presence_rooms(self):
        return "lobby"


class GatedConsumer(PresenceConsumerMixin, JsonEchoConsumer):
    presence_rooms = ("lobby", "staff", "news")

    def can_join(self, room):
        # A plain hook runs in a thread: it may use the ORM.
        user = self.scope["user"]
        staff = get_user_model().objects.filter(pk=user.pk, is_staff=True)
        return room != "staff" or staff.exists()


class AsyncGatedConsumer(PresenceConsumerMixin, AsyncEchoConsumer):
    presence_rooms = ("lobby", "staff", "news")

    async def can_join(self, room):
        user = self.scope["user"]
        staff = get_user_model().objects.filter(pk=user.pk, is_staff=True)
        return room != "staff" or await staff.aexists()


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_joins_the_presence_rooms_on_connect(base):
    alice = await make_user("alice")
    consumer = with_presence(base, presence_rooms=ROOMS)
    async with connected(consumer.as_asgi(), user=alice) as client:
        # Handled after connect, and so after the joins.
        await client.answer('"ping"')

        (socket,) = await sockets()
        assert await rows() == {(room, socket, alice.pk) for room in ROOMS}
        assert_in_rooms(socket, set(ROOMS), among=set(ROOMS))


@pytest.mark.parametrize("consumer", [RoomFromUrlConsumer, AsyncRoomFromUrlConsumer])
async def test_rooms_from_get_presence_rooms_using_url_route_kwargs(consumer):
    application = URLRouter([path("ws/<room>/", consumer.as_asgi())])
    async with connected(application, "/ws/kitchen/") as client:
        await client.answer('"ping"')

        (socket,) = await sockets()
        assert await rows() == {("kitchen", socket, None), ("news", socket, None)}
        assert_in_rooms(socket, {"kitchen", "news"}, among={"kitchen", "news"})


@pytest.mark.parametrize("consumer", [OneRoomConsumer, OneRoomFromMethodConsumer])
async def test_a_single_room_name_is_one_room(consumer):
    async with connected(consumer.as_asgi()) as client:
        await client.answer('"ping"')

        (socket,) = await sockets()
        assert await rows() == {("lobby", socket, None)}


@pytest.mark.parametrize("consumer", [GatedConsumer, AsyncGatedConsumer])
async def test_can_join_refusing_a_room_keeps_the_socket_out_of_it(consumer):
    alice = await make_user("alice")
    bob = await make_user("bob", is_staff=True)
    async with connected(consumer.as_asgi(), user=alice) as client:
        await client.answer('"ping"')
        (socket,) = await sockets()
        assert await rows() == {("lobby", socket, alice.pk), ("news", socket, alice.pk)}
        assert_in_rooms(socket, {"lobby", "news"}, among={"lobby", "staff", "news"})

        async with connected(consumer.as_asgi(), user=bob) as staff:
            await staff.answer('"ping"')
            (staff_socket,) = await sockets() - {socket}
            assert {room for room, s, _ in await rows() if s == staff_socket} == {
                "lobby",
                "staff",
                "news",
            }


@pytest.mark.parametrize("consumer", [GatedConsumer, AsyncGatedConsumer])
async def test_a_refused_room_is_told_to_the_client_which_stays_open(consumer):
    alice = await make_user("alice")
    async with connected(consumer.as_asgi(), user=alice) as client:
        await client.answer('"ping"')
        errors = [m for m in client.received_since(0) if m["type"] == "presence.error"]
        assert errors == [
            {
                "type": "presence.error",
                "error": "forbidden",
                "room": "staff",
                "message": "This socket may not join room 'staff'.",
            }
        ]
        assert len(await sockets()) == 1
        assert {room for room, _, _ in await rows()} == {"lobby", "news"}


@pytest.mark.parametrize("consumer", [GatedConsumer, AsyncGatedConsumer])
async def test_close_on_refusal_closes_a_refused_socket_with_4403(consumer, signals):
    alice = await make_user("alice")
    closing: Any = type("Closing", (consumer,), {"close_on_refusal": True})
    client = Client(closing.as_asgi(), user=alice)
    accepted, _ = await client.connect(TIMEOUT)
    assert accepted
    error = json.loads(await client.receive_text())
    assert (error["error"], error["room"]) == ("forbidden", "staff")
    output = await client.receive_output(TIMEOUT)
    assert output == {"type": "websocket.close", "code": 4403}
    await client.disconnect()
    # Closed before its first join: no room was joined.
    assert signals == []
    assert await sockets() == set()
    assert group_members("lobby") == set()


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_a_rejected_connection_joins_nothing(base, signals):
    connect = reject if issubclass(base, SyncConsumer) else areject
    consumer = with_presence(base, presence_rooms=ROOMS, connect=connect)
    client = Client(consumer.as_asgi())
    try:
        accepted, _ = await client.connect(TIMEOUT)
        assert not accepted
    finally:
        await client.disconnect()

    # A join would have written a row and announced it, and a socket that had
    # no row would not have been taken out of the groups again.
    assert signals == []
    assert await sockets() == set()
    for room in ROOMS:
        assert group_members(room) == set()
        assert group_members(events_group(room)) == set()


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_a_connection_closed_during_connect_joins_nothing(base, signals):
    # Accepting, then closing, is how connect refuses with a close code of its own.
    sync = issubclass(base, SyncConsumer)
    connect = accept_then_close if sync else aaccept_then_close
    consumer = with_presence(base, presence_rooms=ROOMS, connect=connect)
    client = Client(consumer.as_asgi())
    try:
        accepted, _ = await client.connect(TIMEOUT)
        assert accepted
        closing = await client.receive_output(TIMEOUT)
        assert (closing["type"], closing["code"]) == ("websocket.close", 4003)
    finally:
        await client.disconnect(code=4003)

    # The room was never told this socket had come (and then gone).
    assert signals == []
    assert await sockets() == set()


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_a_room_name_channels_cannot_use_is_refused_before_connect(base, signals):
    consumer = with_presence(base, presence_rooms=("lobby", "no spaces"))
    client = Client(consumer.as_asgi())
    accepted, _ = await client.connect(TIMEOUT)
    # Accepted only to be told why, then closed with 4400.
    assert accepted
    error = json.loads(await client.receive_text())
    assert error["type"] == "presence.error"
    assert error["error"] == "bad_room"
    assert error["room"] == "no spaces"
    assert "not a valid Channels group name" in error["message"]
    assert await client.receive_output(TIMEOUT) == {
        "type": "websocket.close",
        "code": 4400,
    }
    await client.disconnect()
    await client.wait(TIMEOUT)
    # The consumer's own connect() and disconnect() never ran.
    assert client.calls == []

    # Checked before the first join: "lobby" was not joined and left behind.
    assert signals == []
    assert await sockets() == set()
    assert group_members("lobby") == set()
    assert group_members(events_group("lobby")) == set()


@pytest.mark.parametrize("rooms", [7, ["lobby", None], ["presence_events.x"]])
async def test_rooms_that_are_not_room_names_are_refused_with_4400(rooms):
    consumer = with_presence(AsyncJsonEchoConsumer, get_presence_rooms=lambda _: rooms)
    client = Client(consumer.as_asgi())
    await client.connect(TIMEOUT)
    error = json.loads(await client.receive_text())
    assert error["error"] == "bad_room"
    assert error["message"]
    output = await client.receive_output(TIMEOUT)
    assert output == {"type": "websocket.close", "code": 4400}
    await client.disconnect()
    assert await sockets() == set()


# Touches and heartbeats.


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_receiving_a_frame_touches(base):
    consumer = with_presence(base, presence_rooms=ROOMS)
    with override_settings(CHANNELS_PRESENCE_TOUCH_INTERVAL=0):
        async with connected(consumer.as_asgi()) as client:
            await client.answer('"ping"')
            before = await set_last_seen_back()

            await client.answer('"pong"')

            assert await touched_since(before)


#: The bases whose handler takes raw text, JSON or not, and binary frames.
RAW_BASES = (EchoConsumer, AsyncEchoConsumer)


@pytest.mark.parametrize("frame", HEARTBEATS)
@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_heartbeat_touches_without_calling_the_handler(base, frame):
    consumer = with_presence(base, presence_rooms=ROOMS)
    with override_settings(CHANNELS_PRESENCE_TOUCH_INTERVAL=0):
        async with connected(consumer.as_asgi()) as client:
            await client.answer('"ping"')
            before = await set_last_seen_back()

            await client.send_to(text_data=frame)
            await wait_until_touched(before)

            # Frames are handled in order: a handled heartbeat would answer first.
            await client.answer('"pong"')
            echoes = [m for m in client.received_since(0) if m["type"] == "echo"]
            assert len(echoes) == 2


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_frames_that_only_look_like_a_heartbeat_reach_the_handler(base):
    frames = [LONG_HEARTBEAT, '"heartbeats"', '["heartbeat"]', '"Heartbeat"']
    if base in RAW_BASES:
        # Text that is not JSON, which a JSON consumer would refuse.
        frames += ["heartbeat", '"heartbeat', "'heartbeat'"]
    consumer = with_presence(base, presence_rooms=ROOMS)
    async with connected(consumer.as_asgi()) as client:
        for frame in frames:
            await client.answer(frame)


@pytest.mark.parametrize("base", RAW_BASES)
async def test_binary_frames_touch_and_reach_the_handler(base):
    consumer = with_presence(base, presence_rooms=ROOMS)
    with override_settings(CHANNELS_PRESENCE_TOUCH_INTERVAL=0):
        async with connected(consumer.as_asgi()) as client:
            await client.answer('"ping"')
            before = await set_last_seen_back()

            for frame in (b"\x00\xff", b'"heartbeat"'):
                await client.send_to(bytes_data=frame)
                echo = await client.receive_type("echo")
                assert echo == {"type": "echo", "bytes": frame.hex()}

            assert await touched_since(before)


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_no_touch_within_the_touch_interval_of_the_join(base):
    consumer = with_presence(base, presence_rooms=ROOMS)
    with override_settings(CHANNELS_PRESENCE_TOUCH_INTERVAL=60):
        async with connected(consumer.as_asgi()) as client:
            # Each join sends its state once its row is written; no frame
            # sent yet, so only the joins can have started the touch clock.
            for _ in ROOMS:
                await client.receive_type("presence.state")
            before = await set_last_seen_back()

            for n in range(5):
                await client.send_to(text_data='"heartbeat"')
                await client.answer(json.dumps(f"frame {n}"))

            assert await last_seen() == [before] * len(ROOMS)


# Leaving.


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_disconnect_leaves_every_room_then_runs_the_consumers_disconnect(
    base,
):
    consumer = with_presence(base, presence_rooms=ROOMS)
    async with connected(consumer.as_asgi()) as staying:
        await staying.answer('"ping"')
        (stayer,) = await sockets()
        async with connected(consumer.as_asgi()) as leaving:
            await leaving.answer('"ping"')
            (leaver,) = await sockets() - {stayer}
            for room in ROOMS:
                assert group_members(events_group(room)) == {stayer, leaver}

            await leaving.disconnect(code=4002)

        # The consumer's own disconnect ran, after every row had gone.
        assert leaving.calls == [("disconnect", 4002, 0)]
        assert await sockets() == {stayer}
        assert_in_rooms(stayer, set(ROOMS), among=set(ROOMS))


# Presence events reach the client.


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_presence_changes_reach_every_client_in_the_room(base):
    alice = await make_user("alice")
    bob = await make_user("bob")
    consumer = with_presence(base, presence_rooms=("lobby",))
    application = consumer.as_asgi()
    async with connected(application, user=alice) as a:
        await a.until_sees("alice")
        async with connected(application, user=bob) as b:
            await b.until_sees("alice", "bob")
            await a.until_sees("alice", "bob")
            async with connected(application, user=AnonymousUser()) as c:
                await c.until_sees("alice", "bob", visitors=1)
                await b.until_sees("alice", "bob", visitors=1)
                await a.until_sees("alice", "bob", visitors=1)
                channel_names = await sockets()
                await c.disconnect()
            await b.until_sees("alice", "bob")
            await a.until_sees("alice", "bob")
            await b.disconnect()
        await a.until_sees("alice")

    # Each client got one state, then one diff per change.
    kinds = [json.loads(text)["type"] for text in a.texts]
    assert kinds.count("presence.state") == 1
    assert kinds.count("presence.diff") == 4
    # What reaches a browser names users, never sockets.
    assert len(channel_names) == 3
    for text in a.texts + b.texts + c.texts:
        assert "specific." not in text
        assert not any(name in text for name in channel_names), text


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_a_client_is_not_told_of_its_own_departure(base):
    layer: Any = get_channel_layer()
    consumer = with_presence(base, presence_rooms=("lobby",))
    async with connected(consumer.as_asgi()) as a:
        await a.until_sees(visitors=1)
        (a_socket,) = await sockets()
        async with connected(consumer.as_asgi()) as b:
            await b.until_sees(visitors=2)
            await a.until_sees(visitors=2)
            start = len(a.texts)

            await a.answer(json.dumps({"leave": "lobby"}))
            await b.until_sees(visitors=1)

            # Behind anything the layer had for a's socket when b was told.
            await layer.send(a_socket, {"type": "test.marker"})
            await a.receive_type("marker")
            assert [m["type"] for m in a.received_since(start)] == ["echo", "marker"]
            assert group_members(events_group("lobby")) == await sockets()


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_diffs_that_arrive_before_the_sockets_state_wait_for_it(
    base, monkeypatch
):
    layer: Any = get_channel_layer()
    consumer = with_presence(base, presence_rooms=("lobby",))
    async with connected(consumer.as_asgi()) as a:
        state = json.loads(await a.receive_text())
        assert state["type"] == "presence.state"
        (socket,) = await sockets()
        room = await Room.objects.aget(channel_name="lobby")
        # The join again below is taken as done and never applied: no real
        # state can come before the test's own, in Celery or inline mode.
        monkeypatch.setattr(dispatch, "ajoin", _joined_without_a_state)
        # A diff sent to the socket before a (second) state, as another
        # worker's may arrive first: held, then sent after the state, and one
        # the state already covers is dropped.
        await layer.send(socket, {"type": "presence.expired", "room": "lobby"})
        await a.receive_type("presence.expired")
        ahead = {
            "type": "presence.diff",
            "room": "lobby",
            "from": room.version + 1,
            "version": room.version + 2,
            "joins": {},
            "leaves": {},
            "counts": state["counts"],
        }
        covered = {**ahead, "from": room.version - 1, "version": room.version}
        await a.send_to(text_data='"heartbeat"')  # joins again
        await layer.send(socket, ahead)
        await layer.send(socket, covered)
        await layer.send(socket, {"type": "test.marker"})
        await a.receive_type("marker")
        assert [m["type"] for m in a.received_since(2)] == ["marker"]

        await layer.send(socket, {**state, "version": room.version})

        assert json.loads(await a.receive_text())["type"] == "presence.state"
        assert json.loads(await a.receive_text()) == ahead


async def _joined_without_a_state(*args: Any, **kwargs: Any) -> bool:
    return True


# Syncs.


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_a_sync_is_answered_with_the_rooms_state(base):
    alice = await make_user("alice")
    consumer = with_presence(base, presence_rooms=("lobby",))
    async with connected(consumer.as_asgi(), user=alice) as a:
        await a.until_sees("alice")
        await Room.objects.aadd("lobby", "specific.other!1")
        sync_state.clear()

        await a.send_to(
            text_data=json.dumps({"type": "presence.sync", "room": "lobby"})
        )

        state = await a.receive_type("presence.state")
        room = await Room.objects.aget(channel_name="lobby")
        assert state["version"] == room.version
        assert state["counts"] == {"users": 1, "visitors": 1, "sockets": 2}
        # The sync never reaches the consumer's own handler.
        await a.answer('"ping"')
        assert [m["type"] for m in a.received_since(0)].count("echo") == 1


@pytest.mark.parametrize("base", [AsyncJsonEchoConsumer, EchoConsumer])
async def test_a_sync_of_a_room_the_socket_is_not_in_is_refused(base):
    await Room.objects.aadd("staff", "specific.other!1")
    consumer = with_presence(base, presence_rooms=("lobby",))
    async with connected(consumer.as_asgi()) as a:
        await a.receive_type("presence.state")
        for room in ("staff", "nowhere", "", 7):
            await a.send_to(
                text_data=json.dumps({"type": "presence.sync", "room": room})
            )
            error = await a.receive_type("presence.error")
            assert error["error"] == "not_in_room"
            assert "members" not in error
        texts = " ".join(a.texts)
        assert "specific.other" not in texts


async def test_syncs_more_often_than_once_a_second_get_the_next_allowed_state():
    consumer = with_presence(AsyncJsonEchoConsumer, presence_rooms=("lobby",))
    async with connected(consumer.as_asgi()) as a:
        await a.receive_type("presence.state")
        sync = json.dumps({"type": "presence.sync", "room": "lobby"})
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(5):
            await a.send_to(text_data=sync)
        await a.receive_type("presence.state")
        await a.receive_type("presence.state")
        elapsed = loop.time() - started
        await a.answer('"ping"')
        states = [m for m in a.received_since(1) if m["type"] == "presence.state"]
        assert len(states) == 2
        assert elapsed >= 0.9


def never_sending() -> Outbox:
    """An outbox that keeps what it is given: its broker is a closed port."""
    broker = f"redis://127.0.0.1:{closed_port()}/0"
    box = Outbox(Celery("t", broker=broker, set_as_current=False), exit_timeout=0.5)
    box.close()
    atexit.unregister(box.close)
    return box


@pytest.fixture
def no_worker(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Celery mode, with joins kept in an outbox that never sends them."""
    monkeypatch.setattr(outbox, "default", never_sending())
    monkeypatch.setattr(sync, "JOIN_STATE_WAIT", 1.5)
    with override_settings(CHANNELS_PRESENCE_USE_CELERY=True):
        yield


async def test_a_sync_before_the_joins_state_is_answered_by_that_state(no_worker):
    # A client with no state 2 s after joining asks; the worker's state for
    # its join is on the way, and is the only copy of the room it gets.
    layer: Any = get_channel_layer()
    consumer = with_presence(AsyncJsonEchoConsumer, presence_rooms=("lobby",))
    async with connected(consumer.as_asgi()) as a:
        await a.answer('"ping"')
        (socket,) = group_members(events_group("lobby"))
        await a.send_to(
            text_data=json.dumps({"type": "presence.sync", "room": "lobby"})
        )
        await a.answer('"ping"')
        state = {
            "type": "presence.state",
            "room": "lobby",
            "version": 7,
            "members": {},
            "counts": {"users": 0, "visitors": 1, "sockets": 1},
        }
        await layer.send(socket, state)
        assert await a.receive_type("presence.state") == state

        await asyncio.sleep(sync.JOIN_STATE_WAIT + 0.5)
        await a.answer('"ping"')
        states = [m for m in a.received_since(0) if m["type"] == "presence.state"]
        assert states == [state]


async def test_a_sync_whose_joins_state_never_comes_is_answered_from_the_rows(
    no_worker,
):
    await Room.objects.aadd("lobby", "specific.other!1")
    consumer = with_presence(AsyncJsonEchoConsumer, presence_rooms=("lobby",))
    async with connected(consumer.as_asgi()) as a:
        await a.answer('"ping"')
        loop = asyncio.get_running_loop()
        asked = loop.time()
        for _ in range(3):
            await a.send_to(
                text_data=json.dumps({"type": "presence.sync", "room": "lobby"})
            )

        state = await a.receive_type("presence.state")
        assert loop.time() - asked >= sync.JOIN_STATE_WAIT - 0.5
        room = await Room.objects.aget(channel_name="lobby")
        assert state["version"] == room.version
        assert state["counts"] == {"users": 0, "visitors": 1, "sockets": 1}
        await a.answer('"ping"')
        states = [m for m in a.received_since(0) if m["type"] == "presence.state"]
        assert len(states) == 1


async def test_a_joins_state_after_a_sync_was_answered_is_sent_only_if_newer(
    no_worker,
):
    # In a storm, the join's state can come after the deferred sync was
    # answered from the rows: the client has the room then, and the diffs
    # after it; the room's whole list again is bytes for nothing.
    layer: Any = get_channel_layer()
    await Room.objects.aadd("lobby", "specific.other!1")
    consumer = with_presence(AsyncJsonEchoConsumer, presence_rooms=("lobby",))
    async with connected(consumer.as_asgi()) as a:
        await a.answer('"ping"')
        (socket,) = group_members(events_group("lobby"))
        await a.send_to(
            text_data=json.dumps({"type": "presence.sync", "room": "lobby"})
        )
        answered = await a.receive_type("presence.state")
        v = answered["version"]
        counts = {"users": 0, "visitors": 1, "sockets": 1}
        diff = {
            "type": "presence.diff",
            "room": "lobby",
            "from": v,
            "version": v + 1,
            "joins": None,
            "leaves": None,
            "counts": counts,
        }
        await layer.send(socket, diff)
        assert await a.receive_type("presence.diff") == diff

        def state(version: int) -> dict[str, Any]:
            return {**answered, "version": version, "counts": counts}

        for late in (state(v), state(v + 1), state(v + 2)):
            await layer.send(socket, late)
        assert await a.receive_type("presence.state") == state(v + 2)
        await a.answer('"ping"')
        sent = [m for m in a.received_since(0) if m["type"] == "presence.state"]
        assert sent == [answered, state(v + 2)]


# A socket a prune dropped is told, and joins again.


def no_socket_names(texts: list[str], channel_names: set[str]) -> bool:
    """Whether none of ``texts`` names a socket."""
    return not any(
        "specific." in text or any(name in text for name in channel_names)
        for text in texts
    )


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_a_pruned_socket_is_told_and_joins_again_at_its_next_frame(base):
    alice = await make_user("alice")
    bob = await make_user("bob")
    application = with_presence(base, presence_rooms=("lobby",)).as_asgi()
    async with connected(application, user=alice) as a:
        await a.until_sees("alice")
        (a_socket,) = await sockets()
        async with connected(application, user=bob) as b:
            await b.until_sees("alice", "bob")
            await a.until_sees("alice", "bob")
            (b_socket,) = await sockets() - {a_socket}
            a_start, b_start = len(a.texts), len(b.texts)
            await set_last_seen_back(a_socket)

            pruned = await Room.objects.aprune_presences()

            assert [p.channel_name for p in pruned] == [a_socket]
            expired = {"type": "presence.expired", "room": "lobby"}
            assert await a.receive_type("presence.expired") == expired
            await b.until_sees("bob")
            (left,) = b.received_since(b_start)
            assert left["leaves"][f"u:{alice.pk}"]["metas"][0]["reason"] == "expired"
            assert await rows() == {("lobby", b_socket, bob.pk)}
            assert_in_rooms(b_socket, {"lobby"}, among={"lobby"})

            # Any frame will do; a heartbeat goes no further than the mixin.
            await a.send_to(text_data='"heartbeat"')

            await b.until_sees("alice", "bob")
            await a.until_sees("alice", "bob")
            assert await rows() == {
                ("lobby", a_socket, alice.pk),
                ("lobby", b_socket, bob.pk),
            }
            assert group_members("lobby") == {a_socket, b_socket}
            assert group_members(events_group("lobby")) == {a_socket, b_socket}
            # a was told of its expiry and of nothing else the prune sent,
            # then of the room it joined again; b, which stayed, of each change.
            assert [m["type"] for m in a.received_since(a_start)] == [
                "presence.expired",
                "presence.state",
            ]
            assert [m["type"] for m in b.received_since(b_start)] == [
                "presence.diff",
                "presence.diff",
            ]

    assert no_socket_names(a.texts + b.texts, {a_socket, b_socket})


@pytest.mark.parametrize(
    "legacy",
    [LegacyConsumer, JsonLegacyConsumer, AsyncLegacyConsumer, AsyncJsonLegacyConsumer],
)
async def test_a_pruned_consumer_without_presence_handlers_is_told_nothing(legacy):
    layer: Any = get_channel_layer()
    watching = with_presence(AsyncJsonEchoConsumer, presence_rooms=ROOMS)
    async with connected(legacy.as_asgi()) as old:
        await old.answer('"ping"')
        (old_socket,) = await sockets()
        async with connected(watching.as_asgi()) as new:
            for _ in ROOMS:
                await new.receive_type("presence.state")
            (new_socket,) = await sockets() - {old_socket}
            await set_last_seen_back()

            pruned = await Room.objects.aprune_presences()

            assert sorted(p.channel_name for p in pruned) == sorted(
                [old_socket, new_socket] * len(ROOMS)
            )
            # The mixin socket is told, once per room; the old one is not.
            for _ in ROOMS:
                await new.receive_type("presence.expired")
            await old.assert_got_nothing_it_cannot_handle(layer, old_socket)


# A join that failed during an outage is tried again.


def noting_can_join(self, room):
    self.scope["calls"].append(("can_join", room))
    return room not in self.scope["refused"]


async def anoting_can_join(self, room):
    return noting_can_join(self, room)


def with_noted_gate(base: type, rooms: tuple[str, ...]) -> Any:
    """A mixin consumer of ``rooms`` whose can_join notes each room it is asked.

    It refuses the rooms in ``scope["refused"]``, a set the test may change.
    """
    sync = issubclass(base, SyncConsumer)
    gate = noting_can_join if sync else anoting_can_join
    return with_presence(base, presence_rooms=rooms, can_join=gate)


def asked(client: Client) -> list[str]:
    """The rooms can_join was asked about, in order."""
    return [call[1] for call in client.calls if call[0] == "can_join"]


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_a_join_that_failed_while_the_database_was_down_is_retried(base):
    client = Client(with_noted_gate(base, ("lobby", "news")).as_asgi(), refused=set())
    with override_settings(CHANNELS_PRESENCE_TOUCH_INTERVAL=0):
        try:
            async with adatabase_down():
                accepted, _ = await client.connect(TIMEOUT)
                assert accepted
                # The socket works; each frame tries the joins again, in vain.
                await client.answer('"ping"')
                assert asked(client) == ["lobby", "news", "lobby", "news"]
                # The client is told once per room, not at every retry.
                told = [
                    (m["error"], m["room"])
                    for m in client.received_since(0)
                    if m["type"] == "presence.error"
                ]
                assert told == [("unavailable", "lobby"), ("unavailable", "news")]
                for room in ("lobby", "news"):
                    assert group_members(room) == set()
                    assert group_members(events_group(room)) == set()

            assert await sockets() == set()

            await client.answer('"pong"')

            (socket,) = await sockets()
            assert await rows() == {("lobby", socket, None), ("news", socket, None)}
            assert_in_rooms(socket, {"lobby", "news"}, among={"lobby", "news"})
            # The joins are applied, and the socket sent each room's state.
            for room in ("lobby", "news"):
                await client.until_sees(visitors=1, room=room)
            # Joined: nothing is left to try again.
            await client.answer('"again"')
            assert asked(client) == ["lobby", "news"] * 3
        finally:
            await client.disconnect()


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_a_room_can_join_refused_is_not_retried(base):
    refused = {"staff"}
    consumer = with_noted_gate(base, ("lobby", "news", "staff"))
    client = Client(consumer.as_asgi(), refused=refused)
    with override_settings(CHANNELS_PRESENCE_TOUCH_INTERVAL=0):
        try:
            async with adatabase_down():
                accepted, _ = await client.connect(TIMEOUT)
                assert accepted
                await client.answer('"ping"')
                # Refused at connect: only the rooms that failed are tried again.
                assert asked(client) == ["lobby", "news", "staff", "lobby", "news"]

            # Refused when tried again: dropped too.
            refused.add("news")
            await client.answer('"pong"')
            await client.answer('"again"')

            assert asked(client) == ["lobby", "news", "staff"] + ["lobby", "news"] * 2
            (socket,) = await sockets()
            assert await rows() == {("lobby", socket, None)}
            assert_in_rooms(socket, {"lobby"}, among={"lobby", "news", "staff"})
        finally:
            await client.disconnect()


# The channel layer down: the socket is closed (4503), the outage logged once.


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_a_socket_whose_channel_layer_is_down_is_told_and_closed_with_4503(
    base, no_outage_yet, caplog
):
    application = with_presence(base, presence_rooms=("lobby",)).as_asgi()
    with layer_down():
        for _ in range(2):
            client = Client(application)
            accepted, _ = await client.connect(TIMEOUT)
            assert accepted
            assert await client.until_closed() == TRY_AGAIN_LATER
            # Its join failed, and it was told before the close.
            assert [m["error"] for m in client.received_since(0)] == ["unavailable"]
            # Its close ends the consumer, which does not raise; disconnect()
            # runs, after the leave.
            await client.disconnect(TRY_AGAIN_LATER)
            assert client.calls == [("disconnect", TRY_AGAIN_LATER, 0)]
    # Two sockets, one line.
    assert len(layer_outages(caplog)) == 1


def noting_rooms(self):
    self.scope["calls"].append(("rooms",))
    return ["lobby"]


async def anoting_rooms(self):
    return noting_rooms(self)


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_a_socket_whose_layer_fails_before_connect_runs_none_of_its_hooks(
    base, no_outage_yet
):
    rooms = noting_rooms if issubclass(base, SyncConsumer) else anoting_rooms
    application = with_presence(base, get_presence_rooms=rooms).as_asgi()
    with layer_down():
        client = Client(application)
        # The consumer starts: its layer receive fails before the handshake.
        client.future  # noqa: B018
        await asyncio.sleep(0.2)
        accepted, _ = await client.connect(TIMEOUT)
        # Accepted only to be closed: a close before it would reach a
        # browser as a refused handshake (1006), which says nothing.
        assert accepted
        assert await client.until_closed() == TRY_AGAIN_LATER
        await client.disconnect(TRY_AGAIN_LATER)
    # Neither get_presence_rooms, connect() nor disconnect() ran.
    assert client.calls == []
    assert client.received_since(0) == []


def raising(self, content, **kwargs):
    raise RuntimeError("a bug in the handler")


async def araising(self, content, **kwargs):
    raising(self, content)


@pytest.mark.parametrize("base", [JsonEchoConsumer, AsyncJsonEchoConsumer])
async def test_a_consumer_whose_handler_raises_leaves_its_rooms(base):
    handler = raising if issubclass(base, SyncConsumer) else araising
    application = with_presence(
        base, presence_rooms=("lobby",), receive_json=handler
    ).as_asgi()
    client = Client(application)
    assert (await client.connect(TIMEOUT))[0]
    await client.until_sees(visitors=1)
    await client.send_to(text_data='"boom"')
    # Channels sends a consumer that died no disconnect: the mixin leaves.
    with pytest.raises(RuntimeError, match="a bug in the handler"):
        await client.wait(TIMEOUT)
    assert await sockets() == set()
    assert group_members("lobby") == set()


# Nothing is sent once the socket is closed.


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
async def test_nothing_is_sent_after_the_consumer_closed_the_socket(base):
    layer: Any = get_channel_layer()
    application = with_presence(base, presence_rooms=("lobby",)).as_asgi()
    async with connected(application) as closing:
        await closing.until_sees(visitors=1)
        (socket,) = await sockets()
        await closing.send_to(text_data=json.dumps({"close": 4000}))
        closed = await closing.receive_output(TIMEOUT)
        assert (closed["type"], closed["code"]) == ("websocket.close", 4000)

        # Until the server says the socket is gone, it is still in the room and
        # hears its events: another socket joins, then a prune drops this one.
        async with connected(application) as other:
            await other.until_sees(visitors=2)
            assert socket in group_members(events_group("lobby"))
            await set_last_seen_back(socket)
            assert len(await Room.objects.aprune_presences()) == 1
            await other.until_sees(visitors=1)

            # Handled after both events, and answered by no frame of its own.
            await layer.send(socket, {"type": "test.note", "what": "events"})
            await wait_until(lambda: ("note", "events") in closing.calls)
            assert closing.sent_so_far() == []

        await closing.disconnect(code=4000)
        assert closing.sent_so_far() == []


# Memory.


@pytest.mark.parametrize("base", [AsyncEchoConsumer, AsyncJsonEchoConsumer])
async def test_a_closed_socket_is_freed_without_the_cycle_collector(base):
    # A consumer that its own objects refer back to is a cycle: every closed
    # socket would wait for the collector's full passes, which take a tenth
    # of a second in a daphne of a thousand sockets and come more often the
    # more such garbage there is. Reference counting must free it. (Channels'
    # sync consumers are a cycle without the mixin: the StopConsumer of their
    # disconnect keeps its frames.)
    consumers: list[weakref.ref[Any]] = []

    def get_presence_rooms(self):
        consumers.append(weakref.ref(self))
        return ["lobby"]

    consumer = with_presence(base, get_presence_rooms=get_presence_rooms)
    gc.collect()
    gc.disable()
    try:
        async with connected(consumer.as_asgi()) as client:
            await client.answer('"ping"')
        del client
        await asyncio.sleep(0.05)  # the consumer's own tasks end
        assert consumers
        assert consumers[0]() is None, gc.get_referrers(consumers[0]())
    finally:
        gc.enable()
