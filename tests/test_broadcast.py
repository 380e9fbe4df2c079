"""What a room's sockets are sent: states, diffs, beacons, notices (wire protocol 2).

Each change set of a room sends one ``presence.diff`` to the room's events
group, and each subscribed socket that joined gets the room's ``presence.state``;
a prune tells the stale sockets (``presence.expired``) and its diff says why
they left. Every frame is plain JSON and never holds a channel name.
"""

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

from channels_presence import broadcast, operations, protocol
from channels_presence.consumers import PresenceConsumerMixin
from channels_presence.groups import events_group
from channels_presence.models import Presence, Room
from channels_presence.testing import RoomView, members_now
from tests.consumers import (
    ROOMS,
    AsyncJsonEchoConsumer,
    AsyncLegacyConsumer,
    LegacyConsumer,
    connected,
)
from tests.helpers import TIMEOUT, make_user, set_last_seen_back

pytestmark = pytest.mark.django_db(transaction=True)


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
    """``value`` is made of dicts with str keys, lists, str, int, float, bool, None."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{where} has key {key!r}"
            assert_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            assert_plain(item, f"{where}[{index}]")
    else:
        assert value is None or type(value) in (str, int, float, bool), (
            f"{where} is {type(value).__name__}: {value!r}"
        )


def assert_no_channel_names(frame: dict[str, Any], *names: str) -> None:
    text = json.dumps(frame)
    for name in names:
        assert name not in text
    assert "specific." not in text


async def presence_of(socket: str, room: str = "lobby") -> Presence:
    return await Presence.objects.aget(channel_name=socket, room__channel_name=room)


def meta_of(presence: Presence, reason: str | None = None) -> dict[str, Any]:
    meta = {
        "ref": presence.ref,
        "joined_at": presence.joined_at.timestamp(),
        "meta": {},
    }
    if reason is not None:
        meta["reason"] = reason
    return meta


# Diffs.


async def test_a_join_is_one_diff_of_plain_values_naming_its_key_and_ref():
    alice = await make_user("alice")
    watcher = await subscribe("lobby")
    socket = await layer().new_channel()

    room = await Room.objects.aadd("lobby", socket, alice)

    frame = await receive(watcher)
    assert_plain(frame)
    assert_no_channel_names(frame, socket)
    presence = await presence_of(socket)
    assert presence.key == f"u:{alice.pk}"
    assert frame == {
        "type": "presence.diff",
        "room": "lobby",
        "from": room.version - 1,
        "version": room.version,
        "joins": {
            f"u:{alice.pk}": {
                "user": {"id": alice.pk, "username": "alice"},
                "metas": [meta_of(presence)],
            }
        },
        "leaves": {},
        "counts": {"users": 1, "visitors": 0, "sockets": 1},
    }


async def test_a_leave_is_one_diff_with_the_last_meta_and_its_reason():
    alice = await make_user("alice")
    sockets = [await layer().new_channel() for _ in range(2)]
    await Room.objects.aadd("lobby", sockets[0], alice)
    await Room.objects.aadd("lobby", sockets[1])
    leaving = await presence_of(sockets[0])
    watcher = await subscribe("lobby")

    await Room.objects.aremove("lobby", sockets[0])

    frame = await receive(watcher)
    assert_plain(frame)
    assert frame["joins"] == {}
    assert frame["leaves"] == {
        f"u:{alice.pk}": {
            "user": {"id": alice.pk, "username": "alice"},
            "metas": [meta_of(leaving, "left")],
        }
    }
    assert frame["counts"] == {"users": 0, "visitors": 1, "sockets": 1}
    assert frame["version"] == frame["from"] + 1


async def test_two_tabs_of_one_user_are_one_member_with_two_metas():
    alice = await make_user("alice")
    tabs = [await layer().new_channel() for _ in range(2)]
    for tab in tabs:
        await Room.objects.aadd("lobby", tab, alice)

    state = await sync_to_async(operations.read_state)("lobby")
    (member,) = state["members"].values()
    assert len(member["metas"]) == 2
    assert state["counts"] == {"users": 1, "visitors": 0, "sockets": 2}


async def test_each_change_set_moves_the_version_by_one_and_a_touch_does_not():
    socket = await layer().new_channel()
    room = await Room.objects.aadd("lobby", socket)
    first = room.version
    await Presence.objects.atouch(socket)
    await room.arefresh_from_db()
    assert room.version == first
    await Room.objects.aadd("lobby", await layer().new_channel())
    await room.arefresh_from_db()
    assert room.version == first + 1


async def test_a_rooms_first_version_is_its_creation_time_so_a_new_room_never_repeats():
    socket = await layer().new_channel()
    room = await Room.objects.aadd("lobby", socket)
    await Room.objects.aremove("lobby", socket)
    await sync_to_async(operations.prune_rooms)()
    again = await Room.objects.aadd("lobby", socket)
    assert again.pk != room.pk
    assert again.version > room.version + 1


async def test_a_prune_tells_the_stale_sockets_then_sends_one_diff_per_room():
    alice = await make_user("alice")
    stale_everywhere, stale_in_lobby, fresh = [
        await layer().new_channel() for _ in range(3)
    ]
    for room in ROOMS:
        await sync_to_async(operations.join)(room, stale_everywhere, subscribe=True)
        await Room.objects.aadd(room, fresh, alice)
    await sync_to_async(operations.join)("lobby", stale_in_lobby, subscribe=["diff"])
    await set_last_seen_back(stale_everywhere)
    await set_last_seen_back(stale_in_lobby)
    stale_presences = {
        p.ref: p async for p in Presence.objects.filter(last_seen__lt=_an_hour_ago())
    }
    watcher = await subscribe(*ROOMS)

    await Room.objects.aprune_presences(age=60)

    # Only the socket that handles expiry notices is told, once per room.
    notices = [
        frame
        for frame in await receive_until_marker(stale_everywhere)
        if frame["type"] == "presence.expired"
    ]
    assert sorted(n["room"] for n in notices) == sorted(ROOMS)
    assert all(n == {"type": "presence.expired", "room": n["room"]} for n in notices)
    assert "presence.expired" not in [
        frame["type"] for frame in await receive_until_marker(stale_in_lobby)
    ]
    frames = await receive_until_marker(watcher)
    assert_plain(frames)
    assert sorted(f["room"] for f in frames) == sorted(ROOMS)
    for frame in frames:
        assert frame["joins"] == {}
        left = [meta for m in frame["leaves"].values() for meta in m["metas"]]
        assert {meta["reason"] for meta in left} == {"expired"}
        assert {meta["ref"] for meta in left} <= set(stale_presences)
        assert frame["counts"]["users"] == 1


def _an_hour_ago() -> Any:
    from tests.helpers import ago

    return ago(3000)


async def test_nothing_is_sent_while_broadcast_is_off():
    watcher = await subscribe("lobby")
    unheard, heard = await layer().new_channel(), await layer().new_channel()

    with override_settings(CHANNELS_PRESENCE_BROADCAST=False):
        await sync_to_async(operations.join)("lobby", unheard, subscribe=True)
        await Room.objects.aremove("lobby", unheard)
        await sync_to_async(operations.join)("lobby", unheard, subscribe=True)
        await sync_to_async(operations.send_beacons)(60)
    assert await receive_until_marker(unheard) == []
    await Room.objects.aadd("lobby", heard)

    # The first frame the watcher gets is the one sent once it was back on.
    frame = await receive(watcher)
    assert frame["type"] == "presence.diff"
    assert len(frame["joins"]) == 1
    heard_presence = await presence_of(heard)
    assert heard_presence.key in frame["joins"]


@pytest.mark.parametrize("legacy", [LegacyConsumer, AsyncLegacyConsumer])
async def test_a_consumer_without_presence_handlers_hears_no_presence_events(legacy):
    async with connected(legacy.as_asgi()) as old:
        await old.answer('"ping"')
        # Others come and go, and are pruned, in the old consumer's rooms.
        async with connected(WatchingConsumer.as_asgi()) as new:
            await new.receive_type("presence.state")
            socket = await layer().new_channel()
            for room in ROOMS:
                await Room.objects.aadd(room, socket)
            await Room.objects.aremove("lobby", socket)
        await set_last_seen_back(socket)
        await Room.objects.aprune_presences(age=60)
        await sync_to_async(operations.send_beacons)(60)

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
async def test_broadcast_changed_sends_the_signal_as_1_0_0_did_and_no_frame(
    call: Callable[[Room], Any], signals: list[dict[str, Any]]
):
    room = await Room.objects.aadd("lobby", await layer().new_channel())
    watcher = await subscribe("lobby")
    signals.clear()

    await call(room)

    assert [(s["room"], s["bulk_change"]) for s in signals] == [(room, True)]
    assert await receive_until_marker(watcher) == []


def leave_all_queries(channel_name: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        Presence.objects.leave_all(channel_name)
    return len(queries.captured_queries)


async def test_leave_all_of_many_rooms_sends_one_diff_per_room_in_few_queries():
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

    frames = await receive_until_marker(watcher)
    assert sorted(f["room"] for f in frames) == sorted(rooms)
    assert all(f["joins"] == {} and len(f["leaves"]) == 1 for f in frames)
    assert all(f["counts"] == {"users": 0, "visitors": 0, "sockets": 0} for f in frames)
    # Changing 50 rooms costs what changing 2 does.
    assert queries_for_many == queries_for_few


# States.


async def test_a_subscribed_socket_gets_the_rooms_state_once_its_join_is_applied():
    alice = await make_user("alice")
    await Room.objects.aadd("lobby", await layer().new_channel(), alice)
    socket = await layer().new_channel()

    await sync_to_async(operations.join)("lobby", socket, subscribe=["state"])

    frames = await receive_until_marker(socket)
    assert [f["type"] for f in frames] == ["presence.state"]
    (state,) = frames
    assert_plain(state)
    room = await Room.objects.aget(channel_name="lobby")
    assert state["version"] == room.version
    assert state["members"] == await sync_to_async(members_now)("lobby")
    assert state["counts"] == {"users": 1, "visitors": 1, "sockets": 2}
    assert_no_channel_names(state, socket)


async def test_a_joiner_gets_its_state_instead_of_its_own_joins_diff():
    # The state holds the join: the joiner is sent it alone, and the room's
    # other sockets the diff.
    present = await layer().new_channel()
    await sync_to_async(operations.join)("lobby", present, subscribe=True)
    await receive_until_marker(present)
    joiner = await layer().new_channel()
    await asyncio.sleep(0.15)  # past the throttle's interval: sent at once

    await sync_to_async(operations.join)("lobby", joiner, subscribe=True)

    (state,) = await receive_until_marker(joiner)
    (diff,) = await receive_until_marker(present)
    assert (state["type"], diff["type"]) == ("presence.state", "presence.diff")
    assert state["version"] == diff["version"] == diff["from"] + 1
    assert diff["joins"].keys() <= state["members"].keys()
    assert len(state["members"]) == 2


async def test_a_socket_that_handles_no_state_gets_none():
    socket = await layer().new_channel()
    await sync_to_async(operations.join)("lobby", socket, subscribe=["diff"])
    frames = await receive_until_marker(socket)
    assert [f["type"] for f in frames] == ["presence.diff"]


def _join_many(sockets: list[str]) -> int:
    """Join the sockets to the lobby in one batch; return the queries it took."""
    with CaptureQueriesContext(connection) as queries:
        operations.apply(
            [
                operations.checked_join("lobby", s, None, None, True, "", None)
                for s in sockets
            ]
        )
    return len(queries.captured_queries)


async def test_sockets_joining_in_one_batch_share_one_state_read():
    sockets = [await layer().new_channel() for _ in range(5)]

    few = await sync_to_async(_join_many)(sockets[:1])
    await receive_until_marker(sockets[0])
    await Room.objects.aremove("lobby", sockets[0])
    many = await sync_to_async(_join_many)(sockets)

    states = [
        frame
        for s in sockets
        for frame in await receive_until_marker(s)
        if frame["type"] == "presence.state"
    ]
    assert len(states) == len(sockets)
    assert all(state == states[0] for state in states)
    assert len(states[0]["members"]) == 5
    # The room's state is built once, not once per joiner (and here not read
    # at all: this process knew the room at the version the batch started).
    assert many <= few


# The throttle.


@pytest.fixture
def throttled() -> Any:
    # Long enough that a storm of five inline adds fits in one interval on a
    # loaded machine (at 0.3 s, a fresh-clone run split it in two).
    with override_settings(CHANNELS_PRESENCE_EVENT_INTERVAL=1.0):
        yield
    broadcast.throttle.flush()


async def test_a_lone_change_is_sent_at_once_and_a_storm_merged(throttled):
    watcher = await subscribe("lobby")
    sockets = [await layer().new_channel() for _ in range(6)]
    loop = asyncio.get_running_loop()

    started = loop.time()
    await Room.objects.aadd("lobby", sockets[0])
    first = await receive(watcher)
    assert loop.time() - started < 0.25, "a lone change waited for the throttle"
    for socket in sockets[1:]:
        await Room.objects.aadd("lobby", socket)
    merged = await receive(watcher)

    assert merged["from"] == first["version"]
    assert merged["version"] == first["version"] + 5
    assert len(merged["joins"]) == 5
    view = RoomView("lobby")
    view.receive(await sync_to_async(operations.read_state)("lobby"))
    assert view.members is not None
    assert len(view.members) == 6


async def test_a_held_diff_is_flushed_at_exit(throttled):
    watcher = await subscribe("lobby")
    await Room.objects.aadd("lobby", await layer().new_channel())
    await receive(watcher)
    await Room.objects.aadd("lobby", await layer().new_channel())

    await sync_to_async(broadcast.throttle.flush)()

    async with asyncio.timeout(0.2):
        frame = await layer().receive(watcher)
    assert frame["type"] == "presence.diff"


class _Recorded(broadcast.Throttle):
    """A throttle on a clock of the test's, recording what it sends; no timer."""

    def __init__(self) -> None:
        self.now = 1_000.0
        super().__init__(clock=lambda: self.now)
        self.sent: list[tuple[str, int]] = []

    def _ensure_running(self) -> None:
        pass

    def _send(self, layer: Any, diffs: list[Any], states: Any = ()) -> None:
        self.sent += [(diff.room, diff.version) for diff in diffs]

    def due(self) -> None:
        self._send_due(self.now)


def _diff(room: str, version: int, sockets: int) -> protocol.Diff:
    return protocol.Diff(room, version - 1, version, protocol.Counts(sockets=sockets))


@override_settings(
    CHANNELS_PRESENCE_EVENT_INTERVAL=0.1, CHANNELS_PRESENCE_EVENT_SOCKETS=100
)
def test_a_room_of_many_sockets_gets_its_diffs_less_often_in_proportion():
    many = 300
    assert broadcast.interval(10) == pytest.approx(0.1)
    assert broadcast.interval(100) == pytest.approx(0.1)
    assert broadcast.interval(many) == pytest.approx(0.3)
    assert broadcast.interval(10**9) == pytest.approx(
        0.1 * broadcast.MAX_INTERVAL_FACTOR
    )
    throttle = _Recorded()
    layer = object()

    throttle.submit(layer, [_diff("big", 1, many), _diff("small", 1, 10)])
    assert throttle.sent == [("big", 1), ("small", 1)]  # lone changes: at once
    throttle.now += 0.15
    throttle.submit(layer, [_diff("big", 2, many), _diff("small", 2, 10)])
    # The small room's interval is over; the big room's is three times as long.
    assert throttle.sent[2:] == [("small", 2)]
    throttle.now += 0.1
    throttle.due()
    assert throttle.sent[3:] == []
    throttle.now += 0.06
    throttle.due()
    assert throttle.sent[3:] == [("big", 2)]


@override_settings(
    CHANNELS_PRESENCE_EVENT_INTERVAL=0.1, CHANNELS_PRESENCE_EVENT_SOCKETS=None
)
def test_event_sockets_none_keeps_every_room_at_the_event_interval():
    assert broadcast.interval(10**6) == pytest.approx(0.1)
    throttle = _Recorded()
    layer = object()
    throttle.submit(layer, [_diff("big", 1, 10**6)])
    throttle.now += 0.15
    throttle.submit(layer, [_diff("big", 2, 10**6)])
    assert throttle.sent == [("big", 1), ("big", 2)]


async def test_frames_hold_the_configured_member_fields_only():
    carol = await make_user("carol", email="carol@example.com", first_name="Carol")
    watcher = await subscribe("lobby")
    with override_settings(CHANNELS_PRESENCE_MEMBER_FIELDS={"name": "first_name"}):
        await Room.objects.aadd("lobby", await layer().new_channel(), carol)
    frame = await receive(watcher)
    assert frame["joins"][f"u:{carol.pk}"]["user"] == {"name": "Carol"}
    assert "carol@example.com" not in json.dumps(frame)


async def test_frame_types_are_the_protocols():
    assert (protocol.STATE, protocol.DIFF, protocol.VERSION, protocol.EXPIRED) == (
        "presence.state",
        "presence.diff",
        "presence.version",
        "presence.expired",
    )
