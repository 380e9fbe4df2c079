"""DESIGN invariant 1: the socket's order decides, not the order tasks run in.

Celery may run a socket's tasks in any order, and a task more than once (a
redelivery after a lost worker). Each task carries ``at``, the moment it
happened on the socket, and the operations order themselves by it. These tests
apply every order of a socket's tasks through the task functions, in this
process, and compare the end state with what the socket did.

Also here: two workers racing for one socket (PostgreSQL), and migration 0006,
which gives existing presences their ``joined_at``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from queue import Queue
from typing import Any

import pytest
import redis
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.loader import MigrationLoader

from channels_presence import locks, tasks
from channels_presence.groups import events_group
from channels_presence.models import Departure, Presence, Room
from channels_presence.signals import presence_changed
from tests.helpers import group_members, in_background

pytestmark = pytest.mark.django_db(transaction=True)

ROOM = "lobby"
OTHER_ROOM = "kitchen"
SOCKET = "specific.order!alpha"
GROUPS = [ROOM, events_group(ROOM), OTHER_ROOM, events_group(OTHER_ROOM)]

postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="SQLite lets one transaction write at a time (BEGIN IMMEDIATE): "
    "the racing transactions cannot interleave",
)


# A socket's history, as the tasks its server sent


@dataclass(frozen=True)
class Step:
    """One task of the socket: what happened, and ``at`` seconds after the start."""

    kind: str  # add_presence, touch_presences, remove_presence or leave_all
    at: int
    room: str = ROOM
    user: str | None = None  # a username, or None for anonymous

    def __str__(self) -> str:
        return f"{self.kind}@t{self.at}"


def _moment(start: float, step: int) -> datetime:
    return datetime.fromtimestamp(start + step, UTC)


def _apply(step: Step, start: float, users: dict[str, int]) -> None:
    """Run the task of ``step``, as a worker would."""
    at = start + step.at
    if step.kind == "add_presence":
        user_id = users[step.user] if step.user else None
        tasks.add_presence(step.room, SOCKET, user_id, at=at, subscribe=True)
    elif step.kind == "touch_presences":
        tasks.touch_presences([SOCKET], at=at)
    elif step.kind == "remove_presence":
        tasks.remove_presence(step.room, SOCKET, at=at)
    else:
        assert step.kind == "leave_all"
        tasks.leave_all(SOCKET, at=at)


JOIN = Step("add_presence", 0)
TOUCH = Step("touch_presences", 1)

# Each history in socket order (t0 < t1 < t2), with the presences it ends with:
# (room, user) -> the step of the join that made the presence.
HISTORIES: dict[str, tuple[list[Step], dict[tuple[str, str | None], int]]] = {
    "join, touch, leave_all": (
        [JOIN, TOUCH, Step("leave_all", 2)],
        {},
    ),
    "join, touch, remove": (
        [JOIN, TOUCH, Step("remove_presence", 2)],
        {},
    ),
    "join, remove, join again": (
        [JOIN, Step("remove_presence", 1), Step("add_presence", 2)],
        {(ROOM, None): 2},
    ),
    "join, join as another user": (
        [Step("add_presence", 0, user="alice"), Step("add_presence", 1, user="bob")],
        {(ROOM, "bob"): 1},
    ),
    "join, touch": (
        [JOIN, TOUCH],
        {(ROOM, None): 0},
    ),
    "join, touch, join another room": (
        [JOIN, TOUCH, Step("add_presence", 2, room=OTHER_ROOM)],
        {(ROOM, None): 0, (OTHER_ROOM, None): 2},
    ),
    "join two rooms, leave_all": (
        [JOIN, Step("add_presence", 1, room=OTHER_ROOM), Step("leave_all", 2)],
        {},
    ),
}


def _orders(history: list[Step]) -> Iterator[tuple[int, ...]]:
    """Every order of the history's steps, by index; then each with one step twice.

    The orders without a repeat come first, so that each order with one can be
    compared with the same order without it.
    """
    indexes = range(len(history))
    yield from itertools.permutations(indexes)
    for repeated in indexes:
        yield from sorted(set(itertools.permutations([*indexes, repeated])))


def _without_the_repeat(history: list[Step], order: tuple[int, ...]) -> tuple[int, ...]:
    """``order`` without the run of its repeated step that should change nothing.

    That is the second run, except for a touch with a join between its runs:
    the first run found no row of that join to touch, the second does.
    """
    for position, index in enumerate(order):
        if index in order[:position]:
            first = order.index(index)
            lost = history[index].kind == "touch_presences" and any(
                history[between].kind == "add_presence"
                for between in order[first + 1 : position]
            )
            drop = first if lost else position
            return order[:drop] + order[drop + 1 :]
    return order


def _expected_last_seen(
    history: list[Step], order: tuple[int, ...], room: str, join: int
) -> int:
    """The latest join or touch a worker could apply to the room's presence.

    A touch that runs before the room's join finds no row there, and is lost:
    touches never create a presence (the socket's next touch, within
    TOUCH_INTERVAL, makes up for it).
    """
    applied = [join]
    for position, index in enumerate(order):
        step = history[index]
        if step.kind == "touch_presences" and any(
            history[earlier].kind == "add_presence" and history[earlier].room == room
            for earlier in order[:position]
        ):
            applied.append(step.at)
    return max(applied)


def _rows() -> dict[tuple[str, str, int | None], tuple[datetime, datetime]]:
    rows = Presence.objects.values_list(
        "room__channel_name", "channel_name", "user_id", "joined_at", "last_seen"
    )
    return {
        (room, name, user): (joined, seen) for room, name, user, joined, seen in rows
    }


def _times_by_pk() -> dict[int, tuple[datetime, datetime]]:
    rows = Presence.objects.values_list("pk", "joined_at", "last_seen")
    return {pk: (joined, seen) for pk, joined, seen in rows}


def _groups() -> dict[str, set[str]]:
    """The members of the rooms' groups, read from Redis in one round trip."""
    layer: Any = get_channel_layer()
    client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    try:
        pipeline = client.pipeline(transaction=False)
        for group in GROUPS:
            pipeline.zrange(layer._group_key(group), 0, -1)
        found = pipeline.execute()
    finally:
        client.close()
    return {group: set(members) for group, members in zip(GROUPS, found, strict=True)}


def _groups_of_rows() -> dict[str, set[str]]:
    """The groups as the worker alone should leave them: those of the rows."""
    members: dict[str, set[str]] = {group: set() for group in GROUPS}
    for room, name in Presence.objects.values_list(
        "room__channel_name", "channel_name"
    ):
        members[room].add(name)
        members[events_group(room)].add(name)
    return members


def _snapshot(signals: list[dict[str, Any]]) -> tuple[Any, ...]:
    """Everything the tasks may change, and the signals they sent."""
    return (
        sorted(Room.objects.values_list("channel_name", flat=True)),
        _rows(),
        sorted(
            Departure.objects.values_list(
                "channel_name", "room_channel_name", "left_at"
            )
        ),
        _groups(),
        [
            (
                s["room"].channel_name,
                s["added"] and (s["added"].channel_name, s["added"].user_id),
                s["removed"] and s["removed"].channel_name,
                s["bulk_change"],
            )
            for s in signals
        ],
    )


def _start_over(signals: list[dict[str, Any]]) -> None:
    with transaction.atomic():
        Presence.objects.all().delete()
        Room.objects.all().delete()
        Departure.objects.all().delete()
    layer: Any = get_channel_layer()
    async_to_sync(layer.flush)()
    signals.clear()


@pytest.mark.parametrize(
    ("history", "ends_with"), HISTORIES.values(), ids=HISTORIES.keys()
)
def test_every_order_of_a_sockets_tasks_each_possibly_twice_ends_as_the_socket_did(
    history, ends_with, alice, bob, signals
):
    """Any order of the tasks, any one of them run twice, ends as the socket order says.

    After each task (committed, as a worker commits it):

    * joined_at and last_seen of a presence never move backwards;
    * the room's group and events group hold exactly the sockets that have a
      presence in the room. The socket side adds itself to the group when it
      joins and discards itself when it leaves, at the real time and in the
      real order; the worker, which only sees tasks, must leave the group as
      the rows say: it adds on a join it applies (not on one it drops as
      late) and discards on a leave it applies, unless a newer join of the
      socket left a presence in the room.

    At the end:

    * the presences are those the socket order says, whatever the order the
      tasks ran in; a surviving presence joined at the time of the join that
      made it, and was last seen at the latest join or touch applied to it
      (a touch that runs before any join finds no row and is lost);
    * running a task a second time, anywhere after its first run, changed
      nothing: rooms, presences, departures, groups and signals are those of
      the same order without the repeat (a touch that was lost because it ran
      before the join is applied by its second run, after the join, as if
      its first run had not happened).
    """
    users = {"alice": alice.pk, "bob": bob.pk}
    start = time.time() - 10
    outcomes: dict[tuple[int, ...], tuple[Any, ...]] = {}
    for order in _orders(history):
        _start_over(signals)
        times: dict[int, tuple[datetime, datetime]] = {}
        for position, index in enumerate(order):
            _apply(history[index], start, users)
            done = [str(history[i]) for i in order[: position + 1]]
            now = _times_by_pk()
            for pk, (joined, seen) in now.items():
                if pk in times:
                    assert joined >= times[pk][0], done
                    assert seen >= times[pk][1], done
            times.update(now)
            assert _groups() == _groups_of_rows(), done

        ran = [str(history[index]) for index in order]
        expected = {
            (room, SOCKET, users[user] if user else None): (
                _moment(start, joined),
                _moment(start, _expected_last_seen(history, order, room, joined)),
            )
            for (room, user), joined in ends_with.items()
        }
        assert _rows() == expected, ran
        outcome = _snapshot(signals)
        base = _without_the_repeat(history, order)
        if base == order:
            outcomes[order] = outcome
        else:
            assert outcome == outcomes[base], ran


# Two workers at once (PostgreSQL)


def _start_blocked_by_us(call: Callable[[], Any]) -> Future[Any]:
    """Start ``call`` on another connection; return once it waits for our locks."""
    pids: Queue[int] = Queue()

    def run() -> Any:
        connection.ensure_connection()
        pids.put(connection.connection.info.backend_pid)
        return call()

    started = in_background(run)
    pid = pids.get(timeout=10)
    with connection.cursor() as cursor:
        for _ in range(1000):
            cursor.execute("SELECT pg_backend_pid() = ANY(pg_blocking_pids(%s))", [pid])
            (blocked,) = cursor.fetchone()
            if blocked:
                return started
            if wait([started], timeout=0.01).done:
                started.result()
                raise AssertionError("the task ran without waiting for the socket")
    raise AssertionError("the task never waited for the socket's lock")


RACES = {
    # What runs first, then what runs at once: (kind, at) pairs.
    "join and leave": ([], [("add_presence", 0), ("remove_presence", 1)]),
    "leave and join again": (
        [("add_presence", 0)],
        [("remove_presence", 1), ("add_presence", 2)],
    ),
}


@postgresql_only
@pytest.mark.parametrize("first", [0, 1], ids=["first gets the lock", "second does"])
@pytest.mark.parametrize(("before", "racing"), RACES.values(), ids=RACES.keys())
def test_a_join_and_a_leave_two_workers_run_at_once_end_as_ordered_by_at(
    before, racing, first, signals
):
    """Two workers take one socket's join and leave at once; ``at`` decides.

    Both tasks start while this test holds the socket's lock, so both are in
    flight together and queue for it; ``first`` says which of them queues
    first. The presence that remains, and the group, are what the socket did.
    A presence_changed receiver that is slow on the leave (any user receiver
    may be) holds the leave's after-commit work until the join is done.
    """
    start = time.time() - 10
    for kind, at in before:
        _apply(Step(kind, at), start, {})
    racers = [Step(kind, at) for kind, at in racing]
    if first:
        racers.reverse()
    joins: list[Future[Any]] = []

    def slow_on_leave(sender: Any, removed: Any = None, **kwargs: Any) -> None:
        if removed is not None and joins:
            joins[0].result(timeout=10)

    presence_changed.connect(slow_on_leave, dispatch_uid="tests.slow_on_leave")
    try:
        with transaction.atomic():
            locks.lock_sockets([SOCKET])
            running = []
            for step in racers:
                future = _start_blocked_by_us(partial(_apply, step, start, {}))
                running.append(future)
                if step.kind == "add_presence":
                    joins.append(future)
        for future in running:
            future.result(timeout=10)
    finally:
        presence_changed.disconnect(dispatch_uid="tests.slow_on_leave")

    last_join = max(at for kind, at in [*before, *racing] if kind == "add_presence")
    last_leave = max(at for kind, at in racing if kind == "remove_presence")
    if last_join > last_leave:
        assert _rows() == {
            (ROOM, SOCKET, None): (_moment(start, last_join), _moment(start, last_join))
        }
        assert group_members(ROOM) == {SOCKET}
        assert group_members(events_group(ROOM)) == {SOCKET}
    else:
        assert _rows() == {}
        assert group_members(ROOM) == set()
        assert group_members(events_group(ROOM)) == set()
    assert list(
        Departure.objects.values_list("channel_name", "room_channel_name", "left_at")
    ) == [(SOCKET, ROOM, _moment(start, last_leave))]


# Migration 0006: ordering columns for a database that had presences


APP = "channels_presence"
BEFORE_0006 = (APP, "0005_labels_and_help_texts")
AT_0006 = (APP, "0006_joined_at_and_departures")


def _migrate(target: tuple[str, str]) -> None:
    MigrationExecutor(connection).migrate([target])


@pytest.fixture
def at_0005() -> Iterator[None]:
    """This app's tables as 0005 left them; the latest schema again afterwards."""
    ((_, leaf),) = MigrationLoader(connection).graph.leaf_nodes(APP)
    try:
        _migrate(BEFORE_0006)
        yield
    finally:
        _migrate((APP, leaf))


def test_migration_0006_gives_existing_presences_joined_at_their_last_seen(at_0005):
    old = MigrationLoader(connection).project_state(BEFORE_0006, at_end=True).apps
    OldRoom = old.get_model(APP, "Room")
    OldPresence = old.get_model(APP, "Presence")
    user = get_user_model().objects.create_user("alice")
    lobby = OldRoom.objects.create(channel_name=ROOM)
    seen = datetime(2021, 6, 1, 8, 15, 30, 654321, tzinfo=UTC)
    rows = {
        "specific.old!1": (None, seen),
        "specific.old!2": (user.pk, seen - timedelta(days=3)),
        "specific.old!3": (None, seen + timedelta(microseconds=1)),
    }
    for name, (user_id, last_seen) in rows.items():
        OldPresence.objects.create(
            room=lobby, channel_name=name, user_id=user_id, last_seen=last_seen
        )

    _migrate(AT_0006)

    new = MigrationLoader(connection).project_state(AT_0006, at_end=True).apps
    migrated = new.get_model(APP, "Presence").objects.values_list(
        "channel_name", "user_id", "last_seen", "joined_at"
    )
    assert sorted(migrated) == sorted(
        (name, user_id, last_seen, last_seen)
        for name, (user_id, last_seen) in rows.items()
    )
    assert not new.get_model(APP, "Departure").objects.exists()


# A prune and a rejoin of the same socket


@pytest.mark.parametrize("many", [False, True], ids=["one stale socket", "many"])
def test_a_socket_that_rejoins_while_a_prune_finishes_keeps_its_groups(many, signals):
    """A rejoin applied between a prune's commit and its group discards.

    The prune told the stale socket (``presence.expired``); the socket is alive,
    joins again, and a worker applies that join before the prune has discarded
    the socket from its groups. The discard must not undo the rejoin: the row
    is there, so the socket stays in the room's groups (invariant 2).
    """
    others = [f"{SOCKET}-{n}" for n in range(3)] if many else []
    for name in [SOCKET, *others]:
        tasks.add_presence(ROOM, name, at=time.time() - 120, subscribe=True)
    rejoined: list[str] = []

    def rejoin_during_the_prune(sender: Any, bulk_change: bool = False, **kw: Any):
        if bulk_change and not rejoined:
            rejoined.append(SOCKET)
            tasks.add_presence(ROOM, SOCKET, at=time.time(), subscribe=True)

    presence_changed.connect(rejoin_during_the_prune, dispatch_uid="tests.rejoin")
    try:
        assert tasks.prune_presences() == 1 + len(others)
    finally:
        presence_changed.disconnect(dispatch_uid="tests.rejoin")

    assert rejoined == [SOCKET]
    assert list(Presence.objects.values_list("channel_name", flat=True)) == [SOCKET]
    assert group_members(ROOM) == {SOCKET}
    assert group_members(events_group(ROOM)) == {SOCKET}
