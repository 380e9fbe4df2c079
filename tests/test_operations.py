"""The operations: join, leave, leave_all, touch and the prunes.

Most tests here pin down a defect of 1.0.0 that this version fixes; each is
named for the behaviour that 1.0.0 lacked.
"""

from __future__ import annotations

import asyncio
import copy
import math
import re
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from datetime import datetime, timedelta
from queue import Queue
from typing import Any, TypeVar, cast

import pytest
import redis
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels_redis.core import RedisChannelLayer
from django.conf import settings
from django.contrib.auth.models import AnonymousUser, Group
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connection, transaction
from django.db.models.signals import pre_delete
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from channels_presence import broadcast, changes, groups, operations, sql
from channels_presence.groups import events_group
from channels_presence.models import Presence, Room
from channels_presence.signals import presence_changed
from tests.helpers import ago, group_members, in_background, presence_writes_refused

pytestmark = pytest.mark.django_db(transaction=True)

ROOM = "lobby"
OTHER_ROOM = "kitchen"
SOCKET = "specific.test!alpha"
OTHER_SOCKET = "specific.test!beta"

T = TypeVar("T")

postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="SQLite lets one transaction write at a time (BEGIN IMMEDIATE): "
    "the racing transactions cannot interleave",
)


class Rollback(Exception):
    """Raised by a test to roll back the caller's transaction."""


def _elsewhere(query: Callable[[], T]) -> T:
    """Run ``query`` in another thread, so on another database connection."""
    return in_background(query).result()


def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)


def _all_groups() -> dict[str, set[str]]:
    """Every non-empty group of the configured layer, with its members."""
    layer: Any = get_channel_layer()
    marker = f"{layer.prefix}:group:"
    client = _redis()
    try:
        return {
            key[len(marker) :]: set(cast(list[str], client.zrange(key, 0, -1)))
            for key in client.scan_iter(match=marker + "*", count=1000)
        }
    finally:
        client.close()


def _state() -> tuple[list[str], list[tuple[Any, ...]], dict[str, set[str]]]:
    """Rooms, presences and group memberships: all that an operation may change."""
    rooms = sorted(Room.objects.values_list("channel_name", flat=True))
    presences = sorted(
        Presence.objects.values_list(
            "room__channel_name", "channel_name", "user_id", "last_seen"
        )
    )
    return rooms, presences, _all_groups()


def _group_add_all(pairs: Sequence[tuple[str, str]]) -> None:
    """Put each (room, socket) in the room's group and events group."""

    async def add() -> None:
        layer = groups.get_layer()
        for start in range(0, len(pairs), 50):
            await asyncio.gather(
                *(
                    groups.join(layer, room, socket, subscribe=True)
                    for room, socket in pairs[start : start + 50]
                )
            )

    async_to_sync(add)()


def _groups_of(pairs: Sequence[tuple[str, str]]) -> dict[str, set[str]]:
    """The groups and their members once each (room, socket) has joined, subscribed."""
    members: dict[str, set[str]] = {}
    for room, channel in pairs:
        members.setdefault(room, set()).add(channel)
        members.setdefault(events_group(room), set()).add(channel)
    return members


def _bulk_rooms(tag: str, count: int) -> list[Room]:
    Room.objects.bulk_create(Room(channel_name=f"{tag}-{i}") for i in range(count))
    return list(Room.objects.filter(channel_name__startswith=f"{tag}-"))


@pytest.fixture
def deleted_user(django_user_model: Any) -> Any:
    """A user instance that looks saved but whose row is gone."""
    user = django_user_model.objects.create_user(username="ghost")
    django_user_model.objects.filter(pk=user.pk).delete()
    return user


# One transaction per operation; presence_changed after commit, once per change


def test_join_inside_callers_atomic_block_signals_only_after_outer_commit(signals):
    with transaction.atomic():
        operations.join(ROOM, SOCKET)
        assert signals == []

    assert [s["added"].channel_name for s in signals] == [SOCKET]


REMOVALS: dict[str, Callable[[], object]] = {
    "leave": lambda: operations.leave(ROOM, SOCKET),
    "leave_all": lambda: operations.leave_all(SOCKET),
    "prune_presences": lambda: operations.prune_presences(30),
}


@pytest.mark.parametrize("remove", REMOVALS.values(), ids=REMOVALS.keys())
def test_removal_inside_callers_atomic_block_takes_effect_at_outer_commit(
    remove, signals
):
    operations.join(ROOM, SOCKET, at=ago(45), subscribe=True)
    signals.clear()

    with transaction.atomic():
        remove()
        assert signals == []
        assert group_members(ROOM) == {SOCKET}
        assert group_members(events_group(ROOM)) == {SOCKET}

    assert len(signals) == 1
    assert not Presence.objects.exists()
    assert group_members(ROOM) == set()
    assert group_members(events_group(ROOM)) == set()


@pytest.mark.parametrize("remove", REMOVALS.values(), ids=REMOVALS.keys())
def test_removal_rolled_back_by_caller_keeps_presence_and_group_and_sends_nothing(
    remove, signals
):
    operations.join(ROOM, SOCKET, at=ago(45), subscribe=True)
    signals.clear()
    before = _state()

    def remove_then_roll_back() -> None:
        with transaction.atomic():
            remove()
            raise Rollback

    with pytest.raises(Rollback):
        remove_then_roll_back()

    assert _state() == before
    assert signals == []


def test_receiver_on_another_connection_sees_the_committed_change():
    seen: list[bool] = []

    def receiver(sender, added=None, removed=None, **kwargs):
        pk = (added or removed).pk
        seen.append(_elsewhere(lambda: Presence.objects.filter(pk=pk).exists()))

    presence_changed.connect(receiver)
    try:
        operations.join(ROOM, SOCKET)
        operations.leave(ROOM, SOCKET)
    finally:
        presence_changed.disconnect(receiver)

    assert seen == [True, False]


def test_prune_commits_every_room_before_the_first_signal():
    for i in range(3):
        operations.join(f"room-{i}", f"specific.test!s{i}", at=ago(45))
    remaining: list[int] = []

    def receiver(**kwargs):
        remaining.append(_elsewhere(Presence.objects.count))

    presence_changed.connect(receiver)
    try:
        operations.prune_presences(30)
    finally:
        presence_changed.disconnect(receiver)

    assert remaining == [0, 0, 0]


def test_leave_all_commits_every_room_before_the_first_signal():
    for i in range(3):
        operations.join(f"room-{i}", SOCKET)
    remaining: list[int] = []

    def receiver(**kwargs):
        remaining.append(_elsewhere(Presence.objects.count))

    presence_changed.connect(receiver)
    try:
        operations.leave_all(SOCKET)
    finally:
        presence_changed.disconnect(receiver)

    assert remaining == [0, 0, 0]


def test_rejoin_with_same_socket_and_user_sends_no_signal_and_only_touches(
    alice, signals
):
    operations.join(ROOM, SOCKET, alice, at=ago(45))
    before = timezone.now()

    operations.join(ROOM, SOCKET, alice)

    assert len(signals) == 1
    presence = Presence.objects.get()
    assert presence.user_id == alice.pk
    assert presence.last_seen >= before


def test_leave_of_an_unknown_socket_sends_no_signal(signals):
    operations.join(ROOM, SOCKET)
    signals.clear()

    assert operations.leave(ROOM, OTHER_SOCKET) is None
    assert operations.leave(OTHER_ROOM, SOCKET) is None
    assert operations.leave_all(OTHER_SOCKET) == []

    assert signals == []
    assert Presence.objects.count() == 1


def test_touch_sends_no_signal(signals):
    operations.join(ROOM, SOCKET, at=ago(45))
    signals.clear()

    assert operations.touch([SOCKET]) == 1

    assert signals == []


def test_prune_with_nothing_stale_deletes_nothing_and_sends_no_signal(signals):
    operations.join(ROOM, SOCKET, at=ago(15))
    signals.clear()
    before = _state()

    assert operations.prune_presences(30) == []

    assert _state() == before
    assert signals == []


@pytest.mark.parametrize(
    "remove",
    [lambda: operations.leave(ROOM, SOCKET), lambda: operations.leave_all(SOCKET)],
    ids=["leave", "leave_all"],
)
def test_removed_presence_in_the_signal_keeps_its_pk(remove, signals):
    operations.join(ROOM, SOCKET)
    pk = Presence.objects.get().pk
    signals.clear()

    remove()

    assert [(s["removed"].pk, s["removed"].channel_name) for s in signals] == [
        (pk, SOCKET)
    ]
    assert not Presence.objects.filter(pk=pk).exists()


def test_removed_presences_returned_keep_their_pks():
    operations.join(ROOM, SOCKET, at=ago(45))
    operations.join(OTHER_ROOM, SOCKET, at=ago(45))
    pks = sorted(Presence.objects.values_list("pk", flat=True))

    assert sorted(p.pk for p in operations.prune_presences(30)) == pks

    operations.join(ROOM, SOCKET)
    operations.join(OTHER_ROOM, SOCKET)
    pks = sorted(Presence.objects.values_list("pk", flat=True))
    assert sorted(p.pk for p in operations.leave_all(SOCKET)) == pks

    operations.join(ROOM, SOCKET)
    pk = Presence.objects.get().pk
    removed = operations.leave(ROOM, SOCKET)
    assert removed is not None
    assert removed.pk == pk


# A presence is found by (room, socket), not by user


def test_join_as_anonymous_then_as_user_updates_the_row(alice, signals):
    operations.join(ROOM, SOCKET)
    pk = Presence.objects.get().pk

    operations.join(ROOM, SOCKET, alice)

    presence = Presence.objects.get()
    assert (presence.pk, presence.user_id) == (pk, alice.pk)
    assert [(s["added"].pk, s["added"].user_id) for s in signals] == [
        (pk, None),
        (pk, alice.pk),
    ]


def test_join_as_another_user_replaces_the_user_of_the_socket(alice, bob):
    operations.join(ROOM, SOCKET, alice)

    operations.join(ROOM, SOCKET, bob)

    assert list(Presence.objects.values_list("channel_name", "user_id")) == [
        (SOCKET, bob.pk)
    ]


def test_one_user_with_two_sockets_has_two_presences(alice):
    operations.join(ROOM, SOCKET, alice)
    operations.join(ROOM, OTHER_SOCKET, alice)

    assert sorted(Presence.objects.values_list("channel_name", "user_id")) == [
        (SOCKET, alice.pk),
        (OTHER_SOCKET, alice.pk),
    ]


# Constant queries however many rooms; every deleted socket leaves its groups


def _prune_queries(tag: str, rooms: int, signals: list[dict[str, Any]]) -> int:
    """Prune one stale presence in each of ``rooms`` new rooms; count the queries."""
    created = _bulk_rooms(tag, rooms)
    pairs = [(room.channel_name, f"specific.{tag}!{room.pk}") for room in created]
    Presence.objects.bulk_create(
        Presence(room=room, channel_name=socket, last_seen=ago(3600))
        for room, (_, socket) in zip(created, pairs, strict=True)
    )
    _group_add_all(pairs)
    assert _all_groups() == _groups_of(pairs)
    signals.clear()

    with CaptureQueriesContext(connection) as queries:
        removed = operations.prune_presences(30)

    assert len(removed) == rooms
    assert not Presence.objects.exists()
    assert _all_groups() == {}
    assert len(signals) == rooms
    assert {s["room"].channel_name for s in signals} == {room for room, _ in pairs}
    assert all(s["bulk_change"] for s in signals)
    return len(queries)


def test_prune_presences_queries_do_not_grow_with_the_number_of_rooms(signals):
    small = _prune_queries("small", 10, signals)
    large = _prune_queries("large", 1000, signals)

    print(
        f"prune_presences queries ({connection.vendor}): "
        f"10 rooms={small}, 1000 rooms={large}"
    )
    assert small == large


def _leave_all_queries(tag: str, rooms: int, signals: list[dict[str, Any]]) -> int:
    """Take one socket out of ``rooms`` new rooms; count the queries."""
    socket = f"specific.{tag}!socket"
    created = _bulk_rooms(tag, rooms)
    Presence.objects.bulk_create(
        Presence(room=room, channel_name=socket) for room in created
    )
    pairs = [(room.channel_name, socket) for room in created]
    _group_add_all(pairs)
    assert _all_groups() == _groups_of(pairs)
    signals.clear()

    with CaptureQueriesContext(connection) as queries:
        removed = operations.leave_all(socket)

    assert len(removed) == rooms
    assert not Presence.objects.exists()
    assert _all_groups() == {}
    assert len(signals) == rooms
    assert all(s["removed"].channel_name == socket for s in signals)
    return len(queries)


def test_leave_all_queries_do_not_grow_with_the_number_of_rooms(signals):
    small = _leave_all_queries("small", 10, signals)
    large = _leave_all_queries("large", 1000, signals)

    print(
        f"leave_all queries ({connection.vendor}): 10 rooms={small}, 1000 rooms={large}"
    )
    assert small == large


def test_prune_presences_discards_every_pruned_socket_and_signals_once_per_room(
    signals,
):
    operations.join("a", "specific.test!a1", at=ago(45), subscribe=True)
    operations.join("a", "specific.test!a2", at=ago(45), subscribe=True)
    operations.join("a", "specific.test!a3", at=ago(15), subscribe=True)
    operations.join("b", "specific.test!b1", at=ago(45), subscribe=True)
    operations.join("c", "specific.test!c1", at=ago(15), subscribe=True)
    signals.clear()

    removed = operations.prune_presences(30)

    assert sorted(p.channel_name for p in removed) == [
        "specific.test!a1",
        "specific.test!a2",
        "specific.test!b1",
    ]
    assert _all_groups() == {
        "a": {"specific.test!a3"},
        events_group("a"): {"specific.test!a3"},
        "c": {"specific.test!c1"},
        events_group("c"): {"specific.test!c1"},
    }
    assert sorted(
        (s["room"].channel_name, s["added"], s["removed"], s["bulk_change"])
        for s in signals
    ) == [("a", None, None, True), ("b", None, None, True)]


@pytest.mark.parametrize("delete_receiver", [False, True])
def test_removed_presences_are_returned_as_they_were_with_room_and_user(
    alice, delete_receiver, django_assert_max_num_queries
):
    # With a pre_delete receiver the rows go through QuerySet.delete(), which
    # runs it; without, one DELETE ... RETURNING: both give the same presences.
    operations.join(ROOM, SOCKET, alice, at=ago(45))
    operations.join(OTHER_ROOM, OTHER_SOCKET, at=ago(50))
    before = {p.pk: p for p in Presence.objects.select_related("room", "user")}
    deleted: list[int] = []

    def receiver(instance: Presence, **kwargs: Any) -> None:
        deleted.append(instance.pk)

    if delete_receiver:
        pre_delete.connect(receiver, sender=Presence)
    try:
        removed = operations.prune_presences(30)
    finally:
        pre_delete.disconnect(receiver, sender=Presence)

    assert sorted(deleted) == (sorted(before) if delete_receiver else [])
    assert [p.pk for p in removed] == sorted(before)
    with django_assert_max_num_queries(0):
        for presence in removed:
            was = before[presence.pk]
            assert [getattr(presence, f.attname) for f in Presence._meta.fields] == [
                getattr(was, f.attname) for f in Presence._meta.fields
            ]
            assert presence.last_seen.utcoffset() == timedelta(0)
            assert presence.room.channel_name == was.room.channel_name
            assert presence.user == was.user
    assert not Presence.objects.exists()


def test_leave_all_discards_the_socket_from_every_group_and_signals_each_removal(
    signals,
):
    operations.join(ROOM, SOCKET, subscribe=True)
    operations.join(OTHER_ROOM, SOCKET, subscribe=True)
    operations.join(ROOM, OTHER_SOCKET, subscribe=True)
    signals.clear()

    operations.leave_all(SOCKET)

    assert _all_groups() == {
        ROOM: {OTHER_SOCKET},
        events_group(ROOM): {OTHER_SOCKET},
    }
    assert sorted(
        (
            s["room"].channel_name,
            s["added"],
            s["removed"].channel_name,
            s["bulk_change"],
        )
        for s in signals
    ) == [(OTHER_ROOM, None, SOCKET, False), (ROOM, None, SOCKET, False)]


# A prune tells the sockets it drops, before it drops them

MARKER = {"type": "test.marker"}


async def _next(layer: Any, channel: str) -> dict[str, Any]:
    message: dict[str, Any] = await asyncio.wait_for(layer.receive(channel), 10)
    return message


async def test_prune_tells_each_stale_socket_before_it_leaves_then_each_room():
    layer: Any = get_channel_layer()
    join = database_sync_to_async(operations.join)
    lobby_stale = sorted([await layer.new_channel(), await layer.new_channel()])
    kitchen_stale = await layer.new_channel()
    for stale in lobby_stale:
        await join(ROOM, stale, at=ago(45), subscribe=True)
    await join(ROOM, SOCKET, at=ago(15))
    await join(OTHER_ROOM, kitchen_stale, at=ago(45), subscribe=["expired"])
    await join("attic", OTHER_SOCKET, at=ago(15))
    for channel in (*lobby_stale, kitchen_stale):
        await _drain(layer, channel)
    # Each room's events group gets a watcher that stays.
    watchers = {room: await layer.new_channel() for room in (ROOM, OTHER_ROOM, "attic")}
    for room, watcher in watchers.items():
        await layer.group_add(events_group(room), watcher)

    await database_sync_to_async(operations.prune_presences)(30)
    # Sent last: whatever a channel receives before its marker came from the prune.
    for room in watchers:
        await layer.group_send(events_group(room), MARKER)
    for channel in (*lobby_stale, kitchen_stale):
        await layer.send(channel, MARKER)

    for room in (ROOM, OTHER_ROOM):
        diff = await _next(layer, watchers[room])
        assert (diff["type"], diff["room"], diff["joins"]) == (
            "presence.diff",
            room,
            {},
        )
        reasons = [m["reason"] for v in diff["leaves"].values() for m in v["metas"]]
        assert reasons == ["expired"] * (2 if room == ROOM else 1)
        assert await _next(layer, watchers[room]) == MARKER
    assert await _next(layer, watchers["attic"]) == MARKER
    # The dropped sockets heard their notice: it went out before they left
    # the events group, and they did not hear of their own departure.
    for channel in lobby_stale:
        assert await _next(layer, channel) == {"type": "presence.expired", "room": ROOM}
        assert await _next(layer, channel) == MARKER
    expired = {"type": "presence.expired", "room": OTHER_ROOM}
    assert await _next(layer, kitchen_stale) == expired
    assert await _next(layer, kitchen_stale) == MARKER


async def _drain(layer: Any, channel: str) -> None:
    """Read what ``channel`` got so far (its joins' states and diffs)."""
    await layer.send(channel, MARKER)
    while await _next(layer, channel) != MARKER:
        pass


# The channel layer is resolved at call time


def test_operations_use_the_channel_layer_configured_at_call_time():
    other: Any = copy.deepcopy(settings.CHANNEL_LAYERS)
    other["default"]["CONFIG"]["prefix"] += "-other"

    with override_settings(CHANNEL_LAYERS=other):
        try:
            operations.join(ROOM, SOCKET, subscribe=True)
            joined = group_members(ROOM), group_members(events_group(ROOM))
            operations.leave(ROOM, SOCKET)
            left = group_members(ROOM), group_members(events_group(ROOM))
        finally:
            async_to_sync(groups.get_layer().flush)()

    assert joined == ({SOCKET}, {SOCKET})
    assert left == (set(), set())
    operations.join(ROOM, SOCKET)
    assert group_members(ROOM) == {SOCKET}


NEEDS_A_LAYER: dict[str, Callable[[Room], object]] = {
    "join": lambda room: operations.join(OTHER_ROOM, OTHER_SOCKET),
    "join an existing room": lambda room: operations.join(ROOM, OTHER_SOCKET),
    "leave": lambda room: operations.leave(ROOM, SOCKET),
    "leave_all": lambda room: operations.leave_all(SOCKET),
    "prune_presences": lambda room: operations.prune_presences(30),
    "Room.objects.add": lambda room: Room.objects.add(OTHER_ROOM, OTHER_SOCKET),
    "Room.objects.remove": lambda room: Room.objects.remove(ROOM, SOCKET),
    "Room.objects.prune_presences": lambda room: Room.objects.prune_presences(age=30),
    "Presence.objects.leave_all": lambda room: Presence.objects.leave_all(SOCKET),
    "room.add_presence": lambda room: room.add_presence(OTHER_SOCKET),
    "room.remove_presence": lambda room: room.remove_presence(SOCKET),
    "room.prune_presences": lambda room: room.prune_presences(30),
}


@pytest.mark.parametrize("call", NEEDS_A_LAYER.values(), ids=NEEDS_A_LAYER.keys())
def test_operation_without_a_channel_layer_raises_improperly_configured(call, signals):
    room = operations.join(ROOM, SOCKET, at=ago(45))
    assert room is not None
    signals.clear()
    before = _state()

    with (
        override_settings(CHANNEL_LAYERS={}),
        pytest.raises(ImproperlyConfigured, match="CHANNEL_LAYERS"),
    ):
        call(room)

    assert _state() == before
    assert signals == []


# The channel layer down after commit: the rows are gone, the failure is told

# What a call to a Redis channel layer that cannot be reached raises.
LAYER_DOWN = (redis.RedisError, OSError)


@pytest.fixture
def dead_layer() -> RedisChannelLayer:
    """A Redis channel layer pointing at a closed port: every call fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return RedisChannelLayer(hosts=[f"redis://127.0.0.1:{port}"])


REMOVALS_WITH_A_LAYER: dict[str, Callable[[Any], object]] = {
    "Room.objects.prune_presences": lambda layer: Room.objects.prune_presences(
        layer, 30
    ),
    "leave": lambda layer: operations.leave(ROOM, SOCKET, channel_layer=layer),
}


@pytest.mark.parametrize(
    "remove", REMOVALS_WITH_A_LAYER.values(), ids=REMOVALS_WITH_A_LAYER.keys()
)
def test_removal_with_the_channel_layer_down_commits_signals_and_logs_it(
    remove, dead_layer, signals, caplog
):
    operations.join(ROOM, SOCKET, at=ago(45))
    signals.clear()

    remove(dead_layer)

    # Committed, announced, and not repeated: the discard waits in the
    # background for the layer, and the clients catch up by version.
    assert not Presence.objects.exists()
    assert [s["room"].channel_name for s in signals] == [ROOM]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert any("retried in the background" in r.getMessage() for r in errors)
    assert broadcast.retries.pending() == 1


@pytest.mark.parametrize(
    "remove", REMOVALS_WITH_A_LAYER.values(), ids=REMOVALS_WITH_A_LAYER.keys()
)
def test_removal_in_callers_transaction_with_the_layer_down_lets_their_commit_finish(
    remove, dead_layer, signals
):
    operations.join(ROOM, SOCKET, at=ago(45))
    signals.clear()
    ran: list[str] = []

    with transaction.atomic():
        remove(dead_layer)
        transaction.on_commit(lambda: ran.append("the caller's callback"))

    assert ran == ["the caller's callback"]
    assert not Presence.objects.exists()
    assert [s["room"].channel_name for s in signals] == [ROOM]


# touch: indexed, one UPDATE, forward only, never creates


def test_touch_finds_sockets_by_index_not_by_table_scan():
    operations.join(ROOM, SOCKET, at=ago(45))
    with CaptureQueriesContext(connection) as queries:
        operations.touch([SOCKET, OTHER_SOCKET])
    # The update, then the names of the rooms whose groups are refreshed.
    update, rooms = [query["sql"] for query in queries]
    assert update.startswith("UPDATE ")
    assert rooms.startswith("SELECT ")

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # A tiny table is cheapest to scan: make the planner show the index.
            cursor.execute("SET enable_seqscan = off")
            try:
                cursor.execute(f"EXPLAIN {update}")
                rows = cursor.fetchall()
            finally:
                cursor.execute("RESET enable_seqscan")
        else:
            cursor.execute(f"EXPLAIN QUERY PLAN {update}")
            rows = cursor.fetchall()
    plan = "\n".join(str(row[-1]) for row in rows)

    if connection.vendor == "postgresql":
        assert re.search(r"Index Scan (using|on) channels_presence_socket_idx", plan)
        assert "Seq Scan" not in plan
    else:
        assert re.search(r"SEARCH \S+ USING INDEX channels_presence_socket_idx", plan)
        assert "SCAN" not in plan.replace("SEARCH", "")


def test_touch_moves_last_seen_forward_and_returns_the_rows_updated():
    operations.join(ROOM, SOCKET, at=ago(45))
    operations.join(OTHER_ROOM, SOCKET, at=ago(45))
    operations.join(ROOM, OTHER_SOCKET, at=ago(45))
    now = timezone.now()

    assert operations.touch([SOCKET], at=now) == 2

    touched = Presence.objects.filter(channel_name=SOCKET)
    assert list(touched.values_list("last_seen", flat=True)) == [now, now]
    assert Presence.objects.get(channel_name=OTHER_SOCKET).last_seen < now


def test_touch_never_moves_last_seen_backwards():
    operations.join(ROOM, SOCKET)
    before = _state()

    assert operations.touch([SOCKET], at=ago(45)) == 0

    assert _state() == before


def test_touch_never_creates_a_presence():
    Room.objects.create(channel_name=ROOM)

    assert operations.touch([SOCKET]) == 0
    Presence.objects.touch(SOCKET)

    assert not Presence.objects.exists()
    assert _all_groups() == {}


def test_touch_of_many_sockets_is_one_update_and_one_read_of_room_names():
    room = Room.objects.create(channel_name=ROOM)
    names = [f"specific.test!{i}" for i in range(500)]
    Presence.objects.bulk_create(
        Presence(room=room, channel_name=name, last_seen=ago(45)) for name in names
    )

    with CaptureQueriesContext(connection) as queries:
        updated = operations.touch(names)

    assert updated == 500
    assert [q["sql"].split()[0] for q in queries] == ["UPDATE", "SELECT"]
    assert not Presence.objects.filter(last_seen__lt=ago(30)).exists()


# join: subscribing, and failing without leaving the socket in a group


def test_join_with_subscribe_adds_the_socket_to_the_events_group():
    operations.join(ROOM, SOCKET, subscribe=True)

    assert group_members(ROOM) == {SOCKET}
    assert group_members(events_group(ROOM)) == {SOCKET}


def test_join_without_subscribe_keeps_the_socket_out_of_the_events_group():
    operations.join(ROOM, SOCKET)

    assert _all_groups() == {ROOM: {SOCKET}}


def test_join_accepts_the_longest_room_name_channels_allows():
    name = "r" * 99

    operations.join(name, SOCKET, subscribe=True)

    assert Room.objects.get().channel_name == name
    assert group_members(name) == {SOCKET}
    assert group_members(events_group(name)) == {SOCKET}


def test_join_whose_database_write_fails_leaves_no_group_membership(signals):
    with presence_writes_refused(), pytest.raises(DatabaseError, match="write refused"):
        operations.join(ROOM, SOCKET, subscribe=True)

    assert not Room.objects.exists()
    assert not Presence.objects.exists()
    assert _all_groups() == {}
    assert signals == []


def test_failed_rejoin_keeps_the_existing_presence_in_its_group(alice):
    operations.join(ROOM, SOCKET, subscribe=True)
    before = _state()

    # As another user: a new presence, whose write is refused.
    with presence_writes_refused(), pytest.raises(DatabaseError, match="refused"):
        operations.join(ROOM, SOCKET, alice, subscribe=True)

    # The row is still there, so the socket must still be in the room's groups.
    assert _state() == before


def test_a_join_as_a_user_deleted_since_is_anonymous_with_a_warning(
    deleted_user, caplog
):
    room = operations.join(ROOM, SOCKET, deleted_user, subscribe=True)

    (presence,) = Presence.objects.all()
    assert presence.user_id is None
    assert presence.key.startswith("v:")
    assert room.counts() == (0, 1, 1)
    assert "does not exist" in caplog.text


# Bad input: refused before anything is written


@pytest.fixture
def existing() -> tuple[list[str], list[tuple[Any, ...]], dict[str, set[str]]]:
    """A stale presence that a bad call must leave alone; the state before."""
    operations.join(ROOM, SOCKET, at=ago(45), subscribe=True)
    return _state()


BAD_ROOM_NAMES = ["a b", "ünïcode", "", "r" * 100, "room/1", "room!1"]


@pytest.mark.parametrize("name", BAD_ROOM_NAMES)
def test_join_refuses_a_room_name_channels_cannot_use(name, existing, signals):
    with pytest.raises(ValueError, match="not a valid Channels group name"):
        operations.join(name, OTHER_SOCKET, subscribe=True)
    with pytest.raises(ValueError, match="not a valid Channels group name"):
        Room.objects.add(name, OTHER_SOCKET)

    assert _state() == existing
    assert signals == []


@pytest.mark.parametrize("name", BAD_ROOM_NAMES)
def test_leave_refuses_a_room_name_channels_cannot_use(name, existing, signals):
    with pytest.raises(ValueError, match="not a valid Channels group name"):
        operations.leave(name, SOCKET)

    assert _state() == existing
    assert signals == []


@pytest.mark.parametrize("name", [42, None, b"lobby", ["lobby"]])
def test_room_name_that_is_not_a_str_raises_type_error(name, existing):
    with pytest.raises(TypeError, match="room name must be a str"):
        operations.join(name, OTHER_SOCKET)
    with pytest.raises(TypeError, match="room name must be a str"):
        operations.leave(name, SOCKET)

    assert _state() == existing


BAD_SOCKET_NAMES = ["a b", "", "s" * 100, "socket?", "ünï", "a!b c", "a!b!c"]
SOCKET_OPERATIONS: dict[str, Callable[[str], object]] = {
    "join": lambda name: operations.join(OTHER_ROOM, name, subscribe=True),
    "leave": lambda name: operations.leave(ROOM, name),
    "leave_all": lambda name: operations.leave_all(name),
    "touch": lambda name: operations.touch([SOCKET, name]),
}


@pytest.mark.parametrize("name", BAD_SOCKET_NAMES)
@pytest.mark.parametrize(
    "call", SOCKET_OPERATIONS.values(), ids=SOCKET_OPERATIONS.keys()
)
def test_socket_name_channels_cannot_use_raises_value_error_saying_what_is_allowed(
    call, name, existing, signals
):
    with pytest.raises(ValueError, match="not a valid Channels channel name") as info:
        call(name)

    message = str(info.value)
    assert repr(name)[:40] in message
    assert "ASCII alphanumerics, hyphens, underscores, or periods" in message
    assert "length < 100" in message
    assert _state() == existing
    assert signals == []


@pytest.mark.parametrize("name", [42, None, b"specific.test!x"])
@pytest.mark.parametrize(
    "call", SOCKET_OPERATIONS.values(), ids=SOCKET_OPERATIONS.keys()
)
def test_socket_name_that_is_not_a_str_raises_type_error(call, name, existing):
    with pytest.raises(TypeError, match="channel name must be a str"):
        call(name)

    assert _state() == existing


def test_touch_refuses_a_single_str_instead_of_a_list(existing):
    with pytest.raises(TypeError, match="list of str"):
        operations.touch(SOCKET)

    assert _state() == existing


@pytest.mark.parametrize("pk", [None, 12345], ids=["without pk", "with a pk"])
def test_join_with_an_unsaved_user_raises_value_error(pk, existing, django_user_model):
    unsaved = django_user_model(pk=pk, username="new")

    with pytest.raises(ValueError, match="has not been saved"):
        operations.join(OTHER_ROOM, OTHER_SOCKET, unsaved)

    assert _state() == existing


@pytest.mark.parametrize(
    "user",
    [object(), "alice", 5, Group(pk=1, name="staff")],
    ids=["object", "str", "int", "auth Group"],
)
def test_join_with_something_that_is_not_a_user_raises_type_error(user, existing):
    with pytest.raises(TypeError, match="user must be a saved"):
        operations.join(OTHER_ROOM, OTHER_SOCKET, user)

    assert _state() == existing


def test_join_stores_none_and_anonymous_user_as_anonymous():
    operations.join(ROOM, SOCKET, None)
    operations.join(ROOM, OTHER_SOCKET, AnonymousUser())

    rows: list[tuple[str, int | None]] = sorted(
        Presence.objects.values_list("channel_name", "user_id")
    )
    assert rows == [
        (SOCKET, None),
        (OTHER_SOCKET, None),
    ]


AGE_OPERATIONS: dict[str, Callable[[Any], object]] = {
    "prune_presences": lambda age: operations.prune_presences(age),
    "stale_presences": lambda age: operations.stale_presences(age),
    "Room.objects.prune_presences": lambda age: Room.objects.prune_presences(age=age),
    "room.prune_presences": lambda age: Room.objects.get().prune_presences(age),
}


@pytest.mark.parametrize("age", [-1, -0.5, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("call", AGE_OPERATIONS.values(), ids=AGE_OPERATIONS.keys())
def test_negative_or_non_finite_age_raises_value_error(call, age, existing, signals):
    with pytest.raises(ValueError, match="finite number of seconds, 0 or more"):
        call(age)

    assert _state() == existing
    assert signals == []


@pytest.mark.parametrize("age", ["60", b"60", [60], True, timedelta(seconds=60)])
@pytest.mark.parametrize("call", AGE_OPERATIONS.values(), ids=AGE_OPERATIONS.keys())
def test_age_that_is_not_a_number_raises_type_error(call, age, existing, signals):
    with pytest.raises(TypeError, match="age must be a number of seconds"):
        call(age)

    assert _state() == existing
    assert signals == []


@pytest.mark.parametrize("at", [datetime(2020, 1, 1), "2020-01-01T00:00:00Z", 0.0])
def test_at_that_is_not_an_aware_datetime_raises_type_error(at, existing, signals):
    with pytest.raises(TypeError, match="aware datetime"):
        operations.join(OTHER_ROOM, OTHER_SOCKET, at=at)
    with pytest.raises(TypeError, match="aware datetime"):
        operations.touch([SOCKET], at=at)

    assert _state() == existing
    assert signals == []


# Races that the operations handle (PostgreSQL: SQLite runs one writer at a time)


@postgresql_only
def quote(name: str) -> str:
    return connection.ops.quote_name(name)


@postgresql_only
def test_join_retries_when_a_concurrent_prune_rooms_deletes_its_room(
    signals, monkeypatch
):
    # Statement by statement, where another transaction can come between the
    # room's upsert and its lock (in one round trip it cannot be stopped there).
    monkeypatch.setattr(sql, "can_combine", lambda connection: False)
    deleted = Room.objects.create(channel_name=ROOM)
    pruned: list[list[str]] = []

    def prune_rooms_elsewhere(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        # Once: join has made sure of its room, and is about to lock it.
        if sql.startswith(f"INSERT INTO {quote(Room._meta.db_table)}") and not pruned:
            pruned.append(_elsewhere(operations.prune_rooms))
        return result

    with connection.execute_wrapper(prune_rooms_elsewhere):
        room = operations.join(ROOM, SOCKET, subscribe=True)

    assert pruned == [[ROOM]]
    assert room.pk != deleted.pk
    assert Room.objects.get().pk == room.pk
    presence = Presence.objects.get()
    assert (presence.room_id, presence.channel_name) == (room.pk, SOCKET)
    assert group_members(ROOM) == {SOCKET}
    assert group_members(events_group(ROOM)) == {SOCKET}
    assert [(s["room"].pk, s["added"].channel_name) for s in signals] == [
        (room.pk, SOCKET)
    ]


@postgresql_only
def test_join_in_one_round_trip_goes_step_by_step_when_its_room_is_gone(
    signals, monkeypatch
):
    # As if prune_rooms had deleted the room between the round trip's upsert
    # and its lock: the round trip finds the room missing, and the join makes
    # and locks it again, statement by statement.
    made: list[list[str]] = []

    def new_rooms(names: list[str], using: str, make: Any = changes._new_rooms) -> Any:
        made.append(names)
        return [] if len(made) == 1 else make(names, using)

    monkeypatch.setattr(changes, "_new_rooms", new_rooms)
    combined: list[bool] = []

    def can_combine(connection: Any, combine: Any = sql.can_combine) -> bool:
        combined.append(combine(connection))
        return combined[-1]

    monkeypatch.setattr(sql, "can_combine", can_combine)

    room = operations.join(ROOM, SOCKET, subscribe=True)

    assert combined[0] is True
    assert made == [[ROOM], [ROOM]]
    assert Room.objects.get().pk == room.pk
    presence = Presence.objects.get()
    assert (presence.room_id, presence.channel_name) == (room.pk, SOCKET)
    assert [(s["room"].pk, s["added"].channel_name) for s in signals] == [
        (room.pk, SOCKET)
    ]


@postgresql_only
def test_prune_rooms_keeps_a_room_that_gains_a_presence_before_its_delete():
    joined = Room.objects.create(channel_name=ROOM)
    Room.objects.create(channel_name=OTHER_ROOM)
    inserted: list[Presence] = []

    def insert_before_the_first_delete(execute, sql, params, many, context):
        # Once: prune_rooms has read both rooms as empty, and deletes next.
        if sql.startswith("DELETE") and not inserted:
            inserted.append(
                _elsewhere(
                    lambda: Presence.objects.create(room=joined, channel_name=SOCKET)
                )
            )
        return execute(sql, params, many, context)

    with connection.execute_wrapper(insert_before_the_first_delete):
        names = operations.prune_rooms()

    assert len(inserted) == 1
    assert names == [OTHER_ROOM]
    assert list(Room.objects.values_list("channel_name", flat=True)) == [ROOM]
    assert list(Presence.objects.values_list("pk", "room_id")) == [
        (inserted[0].pk, joined.pk)
    ]


RACING_REMOVALS: dict[str, Callable[[], list[Presence]]] = {
    "leave_all": lambda: operations.leave_all(SOCKET),
    "prune_presences": lambda: operations.prune_presences(30),
}


def _wait_until_blocked_by_us(racer: Future[Any], pid: int) -> None:
    """Wait until backend ``pid`` waits for a lock this connection holds, or is done."""
    with connection.cursor() as cursor:
        for _ in range(1000):
            cursor.execute("SELECT pg_backend_pid() = ANY(pg_blocking_pids(%s))", [pid])
            (blocked,) = cursor.fetchone()
            if blocked or wait([racer], timeout=0.01).done:
                return
    raise AssertionError("the racing removal neither waited for us nor finished")


@postgresql_only
@pytest.mark.parametrize(
    ("holder", "racer"),
    [("leave_all", "prune_presences"), ("prune_presences", "leave_all")],
)
def test_a_presence_that_two_removals_race_for_is_removed_once(holder, racer, signals):
    operations.join(ROOM, SOCKET, at=ago(45), subscribe=True)
    signals.clear()
    racing: list[Future[list[Presence]]] = []

    def race_while_holding_the_row(**kwargs: Any) -> None:
        # Once, in the holder's transaction: it has read the presence and is
        # about to delete it. The racer runs until it finishes or waits for us.
        if racing:
            return
        pids: Queue[int] = Queue()

        def race() -> list[Presence]:
            connection.ensure_connection()
            pids.put(connection.connection.info.backend_pid)
            return RACING_REMOVALS[racer]()

        racing.append(in_background(race))
        _wait_until_blocked_by_us(racing[0], pids.get(timeout=10))

    pre_delete.connect(race_while_holding_the_row, sender=Presence)
    try:
        removed = RACING_REMOVALS[holder]()
    finally:
        pre_delete.disconnect(race_while_holding_the_row, sender=Presence)
    removed += racing[0].result(timeout=10)

    assert [p.channel_name for p in removed] == [SOCKET]
    assert [s["room"].channel_name for s in signals] == [ROOM]
    assert signals[0]["removed"] is not None or signals[0]["bulk_change"]
    assert not Presence.objects.exists()
    assert group_members(ROOM) == set()
    assert group_members(events_group(ROOM)) == set()


# prune_rooms, and the read-only queries behind --dry-run


def test_prune_rooms_deletes_only_empty_rooms_and_returns_their_names():
    operations.join(ROOM, SOCKET)
    Room.objects.create(channel_name="empty-1")
    Room.objects.create(channel_name="empty-2")

    assert sorted(operations.prune_rooms()) == ["empty-1", "empty-2"]

    assert list(Room.objects.values_list("channel_name", flat=True)) == [ROOM]
    assert Presence.objects.get().channel_name == SOCKET
    assert operations.prune_rooms() == []


def test_empty_rooms_and_stale_presences_change_nothing(signals):
    operations.join(ROOM, SOCKET, at=ago(45), subscribe=True)
    operations.join(ROOM, OTHER_SOCKET, at=ago(15), subscribe=True)
    Room.objects.create(channel_name="empty")
    signals.clear()
    before = _state()

    empty = list(operations.empty_rooms().values_list("channel_name", flat=True))
    stale = list(operations.stale_presences(30).values_list("channel_name", flat=True))

    assert empty == ["empty"]
    assert stale == [SOCKET]
    assert _state() == before
    assert signals == []
