"""The Celery tasks, run in this process: names, options, arguments, idempotence.

Calling a task object runs its body here, at once, as a worker would run it:
these tests are about what the body does, not about the broker. Tests that run
real workers live in test_pipeline.py.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Task
from django.contrib.auth import get_user_model
from django.db import OperationalError, connections
from django.test import override_settings
from django.utils import timezone

from channels_presence import outbox, tasks
from channels_presence.groups import events_group
from channels_presence.models import Departure, Presence, Room
from tasks import app as celery_app
from tests.helpers import database_down, group_members

pytestmark = pytest.mark.django_db(transaction=True)

ROOM = "lobby"
OTHER_ROOM = "kitchen"
SOCKET = "specific.tasks!alpha"
OTHER_SOCKET = "specific.tasks!beta"
TOO_LONG = "specific." + "x" * 92  # 101 characters: Channels allows 100

NAMES = [
    "add_presence",
    "remove_presence",
    "leave_all",
    "apply_batch",
    "touch_presences",
    "prune_presences",
    "prune_presence",
    "prune_rooms",
]
# Losing one of these would lose a change that no later task repeats.
DURABLE = ["add_presence", "remove_presence", "leave_all", "apply_batch"]


def _task(name: str) -> Any:
    """The task object (a proxy to the app's task) the module names ``name``."""
    task: Task[Any, Any] = getattr(tasks, name)
    return task


def _state() -> tuple[Any, ...]:
    """Everything a task may write: rooms, presences, departures and groups."""
    rooms = sorted(Room.objects.values_list("channel_name", flat=True))
    presences = sorted(
        Presence.objects.values_list(
            "room__channel_name", "channel_name", "user_id", "last_seen", "joined_at"
        )
    )
    departures = sorted(
        Departure.objects.values_list("channel_name", "room_channel_name", "left_at")
    )
    members = {
        group: group_members(group)
        for room in (ROOM, OTHER_ROOM)
        for group in (room, events_group(room))
    }
    return rooms, presences, departures, members


def _moment(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


def _between(earlier: datetime, moment: datetime, later: datetime) -> bool:
    # Databases keep microseconds: compare at that precision.
    return earlier - timedelta(microseconds=1) <= moment <= later


@pytest.fixture
def existing() -> tuple[Any, ...]:
    """A socket in the other room; the state as it is, to compare with later."""
    tasks.add_presence(OTHER_ROOM, OTHER_SOCKET, subscribe=True)
    return _state()


# Names and options: what a worker, a beat schedule and a sender rely on


@pytest.mark.parametrize("name", NAMES)
def test_every_task_is_registered_under_its_public_name(name):
    public = f"channels_presence.tasks.{name}"

    assert _task(name).name == public
    registered: Any = celery_app.tasks[public]
    # The project's app runs the very function this module defines.
    assert registered.__wrapped__.__module__ == "channels_presence.tasks"
    assert registered.__wrapped__.__qualname__ == name


def test_prune_presence_is_1_0_0s_name_for_prune_presences(signals):
    tasks.add_presence(ROOM, SOCKET, at=time.time() - 120)
    tasks.add_presence(ROOM, OTHER_SOCKET)

    assert tasks.prune_presence() == 1

    assert list(Presence.objects.values_list("channel_name", flat=True)) == [
        OTHER_SOCKET
    ]
    assert group_members(ROOM) == {OTHER_SOCKET}
    assert [s["bulk_change"] for s in signals if s["removed"] is None][-1] is True
    assert tasks.prune_presence(0) == 1
    assert not Presence.objects.exists()


@pytest.mark.parametrize("name", DURABLE)
def test_tasks_that_carry_a_change_are_acked_late_and_redelivered_if_the_worker_dies(
    name,
):
    task = _task(name)

    assert task.acks_late is True
    assert task.reject_on_worker_lost is True


@pytest.mark.parametrize("name", [*DURABLE, "touch_presences"])
def test_socket_tasks_retry_on_operational_error_without_limit(name):
    task = _task(name)

    assert any(issubclass(OperationalError, kind) for kind in task.autoretry_for)
    assert task.max_retries is None
    assert task.retry_backoff
    # Celery wraps run() in its retry loop when the task is registered.
    assert hasattr(task, "_orig_run")


@pytest.mark.parametrize("name", ["prune_presences", "prune_presence", "prune_rooms"])
def test_prunes_do_not_retry_beat_runs_them_again(name):
    # Retries of a task that beat sends every few seconds would pile up
    # while the database is down.
    assert not getattr(_task(name), "autoretry_for", ())


CALLS: dict[str, Callable[[], Any]] = {
    "add_presence": lambda: tasks.add_presence(ROOM, SOCKET),
    "remove_presence": lambda: tasks.remove_presence(ROOM, SOCKET),
    "leave_all": lambda: tasks.leave_all(SOCKET),
    "touch_presences": lambda: tasks.touch_presences([SOCKET]),
    "prune_presences": lambda: tasks.prune_presences(),
    "prune_presence": lambda: tasks.prune_presence(),
    "prune_rooms": lambda: tasks.prune_rooms(),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_every_task_lets_operational_error_through_for_celery_to_retry(call):
    # Called directly, Celery re-raises what it would retry on: the body
    # itself must not swallow the outage.
    with database_down(), pytest.raises(OperationalError):
        call()


# Arguments: JSON in, JSON out


def test_the_arguments_of_typical_calls_survive_a_json_round_trip(alice):
    at = time.time()
    typical: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        ("add_presence", (ROOM, SOCKET, alice.pk), {"at": at, "subscribe": True}),
        ("touch_presences", ([SOCKET, OTHER_SOCKET],), {"at": at + 1}),
        ("remove_presence", (ROOM, SOCKET), {"at": at + 2}),
        ("add_presence", (ROOM, OTHER_SOCKET), {"at": at + 3}),
        ("leave_all", (OTHER_SOCKET,), {"at": at + 4}),
        ("prune_presences", (30.0,), {}),
        ("prune_rooms", (), {}),
    ]
    for name, args, kwargs in typical:
        sent = json.dumps([args, kwargs])
        received_args, received_kwargs = json.loads(sent)
        assert (tuple(received_args), received_kwargs) == (args, kwargs)
        _task(name)(*received_args, **received_kwargs)

    assert not Presence.objects.exists()
    assert sorted(
        Departure.objects.values_list("channel_name", "room_channel_name", "left_at")
    ) == [(SOCKET, ROOM, _moment(at + 2)), (OTHER_SOCKET, "", _moment(at + 4))]
    assert not Room.objects.exists()


def test_at_may_be_a_whole_number_as_json_gives_it_back():
    at = int(time.time()) - 5

    tasks.add_presence(ROOM, SOCKET, at=json.loads(json.dumps(at)))
    tasks.touch_presences([SOCKET], at=at + 1)

    presence = Presence.objects.get()
    assert presence.joined_at == _moment(at)
    assert presence.last_seen == _moment(at + 1)


def test_at_none_means_now_for_every_task_that_takes_it():
    before = timezone.now()
    tasks.add_presence(ROOM, SOCKET, at=None)
    joined = Presence.objects.get()
    assert _between(before, joined.joined_at, timezone.now())
    assert joined.last_seen == joined.joined_at

    before = timezone.now()
    assert tasks.touch_presences([SOCKET], at=None) == 1
    assert _between(before, Presence.objects.get().last_seen, timezone.now())

    tasks.remove_presence(ROOM, SOCKET, at=None)
    assert not Presence.objects.exists()
    tasks.add_presence(ROOM, SOCKET, at=None)
    tasks.leave_all(SOCKET, at=None)
    assert not Presence.objects.exists()
    assert group_members(ROOM) == set()


# Idempotence: a task run again changes nothing more


def _signalled(signals: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            s["room"].channel_name,
            s["added"] and (s["added"].channel_name, s["added"].user_id),
            s["removed"] and s["removed"].channel_name,
            s["bulk_change"],
        )
        for s in signals
    ]


TWICE: dict[str, tuple[Callable[[float], Any], int]] = {
    # the call, given "now"; the signals its first run sends
    "add_presence": (
        lambda now: tasks.add_presence(ROOM, SOCKET, at=now, subscribe=True),
        1,
    ),
    "add_presence as a user": (
        lambda now: tasks.add_presence(OTHER_ROOM, OTHER_SOCKET, _alice_pk(), at=now),
        1,
    ),
    "remove_presence": (lambda now: tasks.remove_presence(OTHER_ROOM, OTHER_SOCKET), 1),
    "remove_presence at": (
        lambda now: tasks.remove_presence(OTHER_ROOM, OTHER_SOCKET, at=now),
        1,
    ),
    "leave_all at": (lambda now: tasks.leave_all(OTHER_SOCKET, at=now), 2),
    "touch_presences": (lambda now: tasks.touch_presences([OTHER_SOCKET], at=now), 0),
    "prune_presences": (lambda now: tasks.prune_presences(30), 2),
    "prune_rooms": (lambda now: tasks.prune_rooms(), 0),
}


def _alice_pk() -> int:
    pk: int = get_user_model().objects.get(username="alice").pk
    return pk


@pytest.mark.parametrize(("call", "sent"), TWICE.values(), ids=TWICE.keys())
def test_each_task_run_twice_changes_nothing_more(call, sent, alice, signals):
    # The other socket: in two rooms since a minute ago; one empty room.
    minute_ago = time.time() - 60
    tasks.add_presence(OTHER_ROOM, OTHER_SOCKET, at=minute_ago, subscribe=True)
    tasks.add_presence("attic", OTHER_SOCKET, at=minute_ago)
    Room.objects.create(channel_name="empty")
    signals.clear()
    now = time.time()

    call(now)
    once, signalled = _state(), _signalled(signals)
    assert len(signalled) == sent
    call(now)

    assert _state() == once
    assert _signalled(signals) == signalled


# Bad input: a clear error, and nothing written


BAD_CALLS: dict[str, tuple[Callable[[], Any], type[Exception], str]] = {
    "add_presence, room with a space": (
        lambda: tasks.add_presence("a b", SOCKET, subscribe=True),
        ValueError,
        "room name 'a b' is not a valid Channels group name",
    ),
    "add_presence, reserved room": (
        lambda: tasks.add_presence(events_group(ROOM), SOCKET),
        ValueError,
        "reserved",
    ),
    "add_presence, socket over 100 characters": (
        lambda: tasks.add_presence(ROOM, TOO_LONG),
        ValueError,
        "not a valid Channels channel name",
    ),
    "add_presence, socket with a space": (
        lambda: tasks.add_presence(ROOM, "a b"),
        ValueError,
        "not a valid Channels channel name",
    ),
    "add_presence, at a word": (
        lambda: tasks.add_presence(ROOM, SOCKET, at="yesterday"),
        ValueError,
        "at must be a UNIX time in seconds",
    ),
    "add_presence, at True": (
        lambda: tasks.add_presence(ROOM, SOCKET, at=True),
        ValueError,
        "at must be a UNIX time in seconds",
    ),
    "add_presence, at NaN": (
        lambda: tasks.add_presence(ROOM, SOCKET, at=math.nan),
        ValueError,
        "at must be a UNIX time in seconds",
    ),
    "add_presence, at infinity": (
        lambda: tasks.add_presence(ROOM, SOCKET, at=math.inf),
        ValueError,
        "at must be a UNIX time in seconds",
    ),
    "add_presence, at beyond datetime": (
        lambda: tasks.add_presence(ROOM, SOCKET, at=1e20),
        ValueError,
        "not a time a datetime can hold",
    ),
    "remove_presence, room with a space": (
        lambda: tasks.remove_presence("a b", OTHER_SOCKET, at=time.time()),
        ValueError,
        "room name 'a b' is not a valid Channels group name",
    ),
    "remove_presence, socket over 100 characters": (
        lambda: tasks.remove_presence(OTHER_ROOM, TOO_LONG, at=time.time()),
        ValueError,
        "not a valid Channels channel name",
    ),
    "remove_presence, at a word": (
        lambda: tasks.remove_presence(OTHER_ROOM, OTHER_SOCKET, at="yesterday"),
        ValueError,
        "at must be a UNIX time in seconds",
    ),
    "leave_all, socket over 100 characters": (
        lambda: tasks.leave_all(TOO_LONG, at=time.time()),
        ValueError,
        "not a valid Channels channel name",
    ),
    "leave_all, at True": (
        lambda: tasks.leave_all(OTHER_SOCKET, at=True),
        ValueError,
        "at must be a UNIX time in seconds",
    ),
    "leave_all, at NaN": (
        lambda: tasks.leave_all(OTHER_SOCKET, at=math.nan),
        ValueError,
        "at must be a UNIX time in seconds",
    ),
    "touch_presences, one string": (
        lambda: tasks.touch_presences(OTHER_SOCKET),
        TypeError,
        r"not one string: pass \['specific.tasks!beta'\]",
    ),
    "touch_presences, one bad name among good": (
        lambda: tasks.touch_presences([OTHER_SOCKET, TOO_LONG], at=time.time()),
        ValueError,
        "not a valid Channels channel name",
    ),
    "touch_presences, at NaN": (
        lambda: tasks.touch_presences([OTHER_SOCKET], at=math.nan),
        ValueError,
        "at must be a UNIX time in seconds",
    ),
    "prune_presences, negative age": (
        lambda: tasks.prune_presences(-1),
        ValueError,
        "age must be a finite number of seconds",
    ),
}


@pytest.mark.parametrize(
    ("call", "error", "message"), BAD_CALLS.values(), ids=BAD_CALLS.keys()
)
def test_bad_input_raises_a_clear_error_and_writes_nothing(
    call, error, message, existing, signals
):
    with pytest.raises(error, match=message):
        call()

    assert _state() == existing
    assert not Departure.objects.exists()
    assert signals == []


def test_add_presence_of_a_user_deleted_since_joins_anonymously(
    django_user_model, caplog
):
    ghost = django_user_model.objects.create_user(username="ghost")
    ghost_pk = ghost.pk
    ghost.delete()

    with caplog.at_level(logging.WARNING, logger="channels_presence"):
        tasks.add_presence(ROOM, SOCKET, ghost_pk, at=time.time())

    presence = Presence.objects.get()
    assert (presence.channel_name, presence.user_id) == (SOCKET, None)
    assert group_members(ROOM) == {SOCKET}
    assert f"user {ghost_pk!r} does not exist" in caplog.text


def test_add_presence_with_a_user_id_stores_that_user(alice):
    tasks.add_presence(ROOM, SOCKET, alice.pk, at=time.time())

    assert Presence.objects.get().user_id == alice.pk


# Celery mode keeps the managers' documented meaning


def _committed_elsewhere() -> list[tuple[str, str]]:
    """The presences another connection sees: only what was committed."""

    def query() -> list[tuple[str, str]]:
        try:
            return sorted(
                Presence.objects.values_list("room__channel_name", "channel_name")
            )
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(query).result()


@override_settings(CHANNELS_PRESENCE_USE_CELERY=True)
def test_managers_in_celery_mode_still_write_at_once_not_through_a_task(alice):
    pending = outbox.default.pending()

    room = Room.objects.add(ROOM, SOCKET, alice)
    assert room.channel_name == ROOM
    assert _committed_elsewhere() == [(ROOM, SOCKET)]
    assert group_members(ROOM) == {SOCKET}
    Room.objects.add(OTHER_ROOM, SOCKET, alice)

    seen = Presence.objects.get(room__channel_name=ROOM).last_seen
    Presence.objects.touch(SOCKET)
    assert Presence.objects.get(room__channel_name=ROOM).last_seen > seen

    Room.objects.remove(ROOM, SOCKET)
    assert _committed_elsewhere() == [(OTHER_ROOM, SOCKET)]
    assert group_members(ROOM) == set()

    Presence.objects.leave_all(SOCKET)
    assert _committed_elsewhere() == []
    assert group_members(OTHER_ROOM) == set()

    assert sorted(Room.objects.prune_rooms()) == [OTHER_ROOM, ROOM]
    assert outbox.default.pending() == pending


# The prunes


def _left(channel_name: str, seconds_ago: float) -> None:
    tasks.remove_presence(ROOM, channel_name, at=time.time() - seconds_ago)


@pytest.mark.parametrize("name", ["prune_presences", "prune_presence"])
def test_prune_task_forgets_departures_older_than_the_retention_keeps_newer(name):
    # MAX_AGE 6: departures are remembered for 60 seconds.
    with override_settings(CHANNELS_PRESENCE_MAX_AGE=6):
        _left("specific.tasks!old", 70)
        _left("specific.tasks!new", 50)
        tasks.leave_all("specific.tasks!gone", at=time.time() - 61)

        _task(name)()

    assert list(Departure.objects.values_list("channel_name", flat=True)) == [
        "specific.tasks!new"
    ]


def test_a_join_older_than_a_remembered_departure_is_ignored_until_forgotten():
    left = time.time() - 30
    tasks.remove_presence(ROOM, SOCKET, at=left)

    tasks.add_presence(ROOM, SOCKET, at=left - 1)
    assert not Presence.objects.exists()
    assert group_members(ROOM) == set()

    with override_settings(CHANNELS_PRESENCE_MAX_AGE=2):
        tasks.prune_presences()
        assert not Departure.objects.exists()
    # Forgotten: the late join is applied, and prune drops it as stale later.
    tasks.add_presence(ROOM, SOCKET, at=left - 1)
    assert Presence.objects.get().channel_name == SOCKET


def test_prune_presences_task_removes_stale_presences_and_returns_how_many():
    tasks.add_presence(ROOM, SOCKET, at=time.time() - 120, subscribe=True)
    tasks.add_presence(OTHER_ROOM, SOCKET, at=time.time() - 120)
    tasks.add_presence(ROOM, OTHER_SOCKET, subscribe=True)

    assert tasks.prune_presences() == 2

    assert list(Presence.objects.values_list("channel_name", flat=True)) == [
        OTHER_SOCKET
    ]
    assert group_members(ROOM) == {OTHER_SOCKET}
    assert group_members(events_group(ROOM)) == {OTHER_SOCKET}
    assert group_members(OTHER_ROOM) == set()
    assert tasks.prune_presences() == 0


def test_prune_rooms_task_deletes_empty_rooms_and_returns_the_count():
    tasks.add_presence(ROOM, SOCKET)
    Room.objects.create(channel_name="empty-1")
    Room.objects.create(channel_name="empty-2")

    assert tasks.prune_rooms() == 2

    assert list(Room.objects.values_list("channel_name", flat=True)) == [ROOM]
    assert Presence.objects.get().channel_name == SOCKET
    assert tasks.prune_rooms() == 0


def test_tasks_ignore_their_results():
    # Nobody waits on a presence task: storing results would fill the backend.
    for name in NAMES:
        assert _task(name).ignore_result is True, name


@pytest.mark.parametrize("name", DURABLE)
def test_joins_and_leaves_retry_while_the_channel_layer_is_down(name):
    # The socket side changed its groups already: only this task writes the row.
    from redis.exceptions import RedisError

    assert RedisError in _task(name).autoretry_for


# apply_batch: what an outbox sends when several joins and leaves wait

ADD_PRESENCE = "channels_presence.tasks.add_presence"


def test_apply_batch_runs_its_calls_in_order_as_one_change_set_per_room(alice, signals):
    at = time.time()
    add, leave_all = ADD_PRESENCE, "channels_presence.tasks.leave_all"
    tasks.apply_batch(
        [
            [add, [ROOM, SOCKET, alice.pk], {"at": at}],
            [add, [ROOM, OTHER_SOCKET], {"at": at}],
            [add, [OTHER_ROOM, OTHER_SOCKET], {"at": at}],
            [leave_all, [OTHER_SOCKET], {"at": at + 1}],
        ]
    )

    assert list(Presence.objects.values_list("channel_name", "user_id")) == [
        (SOCKET, alice.pk)
    ]
    assert group_members(ROOM) == {SOCKET}
    # OTHER_SOCKET joined and left within the batch: the rooms never had it.
    added = [s["added"].channel_name for s in signals if s["added"] is not None]
    removed = [s["removed"] for s in signals if s["removed"] is not None]
    assert (added, removed) == ([SOCKET], [])
    room = Room.objects.get(channel_name=ROOM)
    assert room.counts() == (1, 0, 1)


def test_apply_batch_logs_a_bad_or_unknown_call_and_runs_the_others(caplog):
    at = time.time()
    tasks.apply_batch(
        [
            [ADD_PRESENCE, ["a b", SOCKET], {"at": at}],
            ["channels_presence.tasks.prune_rooms", [], {}],
            [ADD_PRESENCE, [ROOM, SOCKET], {"at": at}],
            [ADD_PRESENCE, [ROOM, OTHER_SOCKET], {"subscribe": "diff"}],
        ]
    )

    assert list(Presence.objects.values_list("channel_name", flat=True)) == [SOCKET]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("bad; skipped" in message and "'a b'" in message for message in errors)
    assert any("cannot be batched" in message for message in errors)
    assert any("subscribe" in message for message in errors)
