"""Touches: last_seen, group memberships kept fresh, and lost expiry notices.

Against the real Redis channel layer: a layer with a short ``group_expiry``
shows a socket's memberships lasting as long as it touches, and a layer of
capacity 1 loses a prune's notice, which the next touch makes good.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels_redis.core import RedisChannelLayer
from django.conf import settings
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from channels_presence import (
    broadcast,
    groups,
    keystore,
    operations,
    protocol,
    sql,
    tasks,
    touches,
)
from channels_presence.groups import events_group
from channels_presence.models import Presence, Room
from tests.helpers import ago, group_members

pytestmark = pytest.mark.django_db(transaction=True)

ROOM = "lobby"
OTHER_ROOM = "kitchen"


@pytest.fixture
def layer() -> Iterator[RedisChannelLayer]:
    """A layer of the run's prefix whose groups forget a member after 2 s, and
    whose channels hold one message."""
    made = RedisChannelLayer(
        hosts=[settings.REDIS_URL],
        prefix=settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"],
        group_expiry=2,
        capacity=1,
    )
    yield made
    async_to_sync(made.flush)()


def new_channel(layer: RedisChannelLayer) -> str:
    """A channel of no process ("!"-less), which a test can receive from on
    any event loop: a process's own channels are read through a buffer bound
    to one loop."""
    return f"touched.{uuid.uuid4().hex[:12]}"


def drain(layer: RedisChannelLayer, channel: str) -> None:
    while receive(layer, channel, timeout=0.1) is not None:
        pass


@pytest.fixture(autouse=True)
def _forget_told() -> Iterator[None]:
    yield
    with keystore.client() as client:
        keys = list(client.scan_iter(f"{keystore.key_prefix()}:{touches.TOLD}:*"))
        if keys:
            client.delete(*keys)


def receive(layer: RedisChannelLayer, channel: str, timeout: float = 1.0) -> Any:
    async def get() -> Any:
        try:
            return await asyncio.wait_for(layer.receive(channel), timeout)
        except TimeoutError:
            return None

    return async_to_sync(get)()


def group_send(layer: RedisChannelLayer, group: str) -> None:
    async_to_sync(layer.group_send)(group, {"type": "room.message"})


# Group expiry.


def test_a_touch_keeps_a_sockets_group_memberships_past_group_expiry(layer):
    touched, untouched = new_channel(layer), new_channel(layer)
    operations.join(ROOM, touched, subscribe=True, channel_layer=layer)
    operations.join(ROOM, untouched, channel_layer=layer)
    for _ in range(3):
        time.sleep(1.1)
        drain(layer, touched)
        operations.touch([touched], channel_layer=layer)
    # 3.3 s after the joins: the untouched socket's memberships expired.
    group_send(layer, ROOM)
    assert receive(layer, touched) == {"type": "room.message"}
    assert receive(layer, untouched, timeout=0.2) is None
    assert group_members(ROOM, layer) == {touched}
    assert group_members(events_group(ROOM), layer) == {touched}


def test_a_touch_refreshes_a_batch_of_many_rooms_in_one_pipeline(layer, monkeypatch):
    names = [f"specific.b!{n}" for n in range(50)]
    for number, name in enumerate(names):
        room = ROOM if number % 2 else OTHER_ROOM
        operations.join(room, name, subscribe=True, channel_layer=layer)
    trips: list[int] = []
    pipelined = groups._pipelined_now

    def counted(clients: Any, commands: Any) -> Any:
        trips.append(len(commands))
        return pipelined(clients, commands)

    monkeypatch.setattr(groups, "_pipelined_now", counted)
    # A touch is at least a microsecond later than the joins.
    time.sleep(0.01)
    assert operations.touch(names, channel_layer=layer) == 50
    # One ZADD XX per group: two rooms and their events groups.
    assert trips == [4]


def test_only_the_sockets_due_a_refresh_are_refreshed(layer, monkeypatch):
    names = [f"specific.r!{n}" for n in range(4)]
    for name in names:
        operations.join(ROOM, name, channel_layer=layer)
    refreshed: list[Any] = []

    def refresh_now(layer: Any, joins: list[Any]) -> bool:
        refreshed.extend(joins)
        return True

    monkeypatch.setattr(groups, "refresh_now", refresh_now)
    time.sleep(0.01)
    assert operations.touch(names, refresh=names[:1], channel_layer=layer) == 4
    assert refreshed == [(ROOM, names[0], 0)]


@override_settings(CHANNELS_PRESENCE_MAX_AGE=0.5)
@pytest.mark.parametrize("due", ["_refresh_due", "_rooms_due"])
def test_a_socket_is_due_a_refresh_and_its_rooms_check_a_while_after_its_join(
    layer, due
):
    # Its refresh once per quarter of group_expiry (2 s here), its rooms once
    # per MAX_AGE; neither at once: a join in flight is not taken for lost.
    from channels_presence import dispatch

    class Consumer:
        channel_name = "specific.s!1"
        channel_layer = layer

    consumer = Consumer()
    dispatch._joined(consumer, ROOM)
    asked = getattr(dispatch, due)
    assert not asked(consumer)
    time.sleep(0.6)
    assert asked(consumer)
    assert not asked(consumer)


def test_a_touch_never_puts_back_a_socket_that_left_its_group(layer):
    operations.join(ROOM, "specific.c!1", subscribe=True, channel_layer=layer)
    presence = Presence.objects.get()
    time.sleep(0.01)
    # The socket leaves between the touch's update and its refresh.
    moved = touches._move(Presence, "default", ["specific.c!1"], timezone.now())
    assert isinstance(moved, list)
    operations.leave(ROOM, "specific.c!1", channel_layer=layer)
    touches._refresh(layer, [(ROOM, name, events) for _, name, events in moved])
    assert moved == [(presence.room_id, "specific.c!1", presence.events)]
    assert group_members(ROOM, layer) == set()
    assert group_members(events_group(ROOM), layer) == set()


def test_a_group_add_that_lands_after_a_later_leave_is_taken_back(layer):
    # A join's add, after its commit, comes after a later leave had
    # committed and discarded: the join's own check takes it back.
    operations.join(ROOM, "specific.t!1", subscribe=True, channel_layer=layer)
    operations.leave(ROOM, "specific.t!1", channel_layer=layer)
    broadcast.settle(layer, [(ROOM, "specific.t!1", protocol.ALL_EVENTS)], [])
    assert group_members(ROOM, layer) == set()
    assert group_members(events_group(ROOM), layer) == set()


def test_without_the_redis_fast_path_a_refresh_adds_and_drops_who_left(
    layer, monkeypatch
):
    operations.join(ROOM, "specific.d!1", channel_layer=layer)
    operations.join(ROOM, "specific.d!2", channel_layer=layer)
    operations.leave(ROOM, "specific.d!2", channel_layer=layer)
    monkeypatch.setattr(groups, "_blocking_clients", lambda layer: None)
    pairs = [(ROOM, "specific.d!1", 0), (ROOM, "specific.d!2", 0)]
    touches._refresh(layer, pairs)
    assert group_members(ROOM, layer) == {"specific.d!1"}


# Lost expiry notices.


def _dropped_while_full(layer: RedisChannelLayer, room: str) -> str:
    """A socket joins ``room``, its channel fills, and a prune drops it: the
    prune's notice finds no room in the channel. Returns its name."""
    name = new_channel(layer)
    operations.join(room, name, subscribe=True, channel_layer=layer)
    assert receive(layer, name)["type"] == protocol.STATE
    async_to_sync(layer.send)(name, {"type": "filler"})
    Presence.objects.filter(channel_name=name).update(last_seen=ago(3600))
    assert len(operations.prune_presences(channel_layer=layer)) == 1
    assert receive(layer, name) == {"type": "filler"}
    assert receive(layer, name, timeout=0.2) is None
    return name


def test_a_socket_whose_expiry_notice_was_lost_is_told_by_its_next_touch(layer):
    name = _dropped_while_full(layer, ROOM)
    operations.touch([name], rooms={name: [ROOM]}, channel_layer=layer)
    assert receive(layer, name) == protocol.expired(ROOM)
    # At most once per MAX_AGE, whichever worker touches it next.
    operations.touch([name], rooms={name: [ROOM]}, channel_layer=layer)
    assert receive(layer, name, timeout=0.3) is None


def test_only_the_rooms_a_socket_lost_are_named(layer):
    name = _dropped_while_full(layer, ROOM)
    operations.join(OTHER_ROOM, name, subscribe=True, channel_layer=layer)
    assert receive(layer, name)["type"] == protocol.STATE
    tasks.touch_presences.apply(
        args=[[name]],
        kwargs={"at": time.time(), "rooms": {name: [OTHER_ROOM, ROOM]}},
    )
    assert receive(layer, name) == protocol.expired(ROOM)
    assert receive(layer, name, timeout=0.3) is None


def test_a_bad_rooms_entry_in_a_touch_batch_costs_the_batch_nothing(layer, caplog):
    name = _dropped_while_full(layer, ROOM)
    tasks.touch_presences.apply(
        args=[[name, "specific.v!1"]],
        kwargs={"rooms": {name: [ROOM], "specific.v!1": ["a b"]}},
    )
    assert receive(layer, name) == protocol.expired(ROOM)
    assert "rooms of 'specific.v!1' left out" in caplog.text


def test_a_socket_that_says_no_rooms_is_told_nothing(layer):
    name = _dropped_while_full(layer, ROOM)
    operations.touch([name], channel_layer=layer)
    operations.touch([name], rooms={}, channel_layer=layer)
    assert receive(layer, name, timeout=0.3) is None


@pytest.mark.parametrize(
    ("rooms", "error", "match"),
    [
        ("lobby", TypeError, "must map channel names"),
        ({"specific.h!2": ["lobby"]}, ValueError, "not among the sockets touched"),
        ({"specific.h!1": "lobby"}, TypeError, "must be a list of room names"),
        ({"specific.h!1": ["a b"]}, ValueError, "not a valid Channels group name"),
    ],
)
def test_bad_rooms_are_refused_before_anything_is_written(rooms, error, match):
    operations.join(ROOM, "specific.h!1", at=ago(30))
    with pytest.raises(error, match=match):
        operations.touch(["specific.h!1"], rooms=rooms)
    assert Presence.objects.get().last_seen < ago(20)


# The database's side.


def test_a_touch_of_40000_sockets_is_cut_below_the_limit_on_parameters(monkeypatch):
    room = Room.objects.create(channel_name=ROOM)
    names = [f"specific.i!{n}" for n in range(40_000)]
    Presence.objects.bulk_create(
        (Presence(room=room, channel_name=name, last_seen=ago(45)) for name in names),
        batch_size=5_000,
    )
    # SQLite's limit before 3.32, which a build may still set; PostgreSQL
    # takes the names as one array, and is cut the same way.
    monkeypatch.setattr(sql, "max_params", lambda connection: 999)
    with CaptureQueriesContext(connection) as queries:
        assert operations.touch(names, refresh=[]) == 40_000
    updates = [q for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    assert len(updates) == math.ceil(40_000 / 997)
    assert not Presence.objects.filter(last_seen__lt=ago(30)).exists()


def test_a_touch_from_a_clock_ahead_sets_last_seen_no_later_than_now():
    operations.join(ROOM, "specific.j!1", at=ago(30))
    ahead = timezone.now() + timedelta(hours=1)
    assert operations.touch(["specific.j!1"], at=ahead) == 1
    assert Presence.objects.get().last_seen <= timezone.now()
