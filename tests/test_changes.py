"""Batch-native apply: one change set per room, constant queries, exact versions.

``changes.apply`` takes any number of joins and leaves (what ``apply_batch``
gets from an outbox) and applies them as one change set per room: rooms made
and locked in one statement each, presences upserted in one, departures in
one, one version bump per room. Here: the query counts at 10 and 1,000 calls,
the versions and counts against the rows, the user-level signals, two
transactions racing for one room (PostgreSQL), and a room crossing
CHANNELS_PRESENCE_MAX_LISTED_MEMBERS.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import QuerySet
from django.db.models.signals import post_init
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from channels_presence import changes, operations, protocol, sql, tasks
from channels_presence.changes import Call, Join, Leave, LeaveAll
from channels_presence.groups import events_group
from channels_presence.models import Departure, Presence, Room
from channels_presence.signals import user_joined_room, user_left_room
from channels_presence.testing import RoomView, channel_messages, members_now
from tests.helpers import group_members, in_background

pytestmark = pytest.mark.django_db(transaction=True)

postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="SQLite lets one transaction write at a time (BEGIN IMMEDIATE): "
    "the racing transactions cannot interleave",
)


def join(room: str, socket: str, user: Any = None, at: float | None = None) -> Join:
    return operations.checked_join(
        room,
        socket,
        user.pk if user is not None else None,
        None if at is None else _moment(at),
        True,
        "",
        None,
    )


def _moment(at: float) -> Any:
    from channels_presence import clock

    return clock.from_timestamp(at)


def counted(calls: list[Call]) -> int:
    """Apply ``calls`` as one batch; return the queries it took."""
    with CaptureQueriesContext(connection) as queries:
        operations.apply(calls)
    return len(queries.captured_queries)


def rows_counts() -> dict[str, tuple[int, int, int]]:
    """Each room's (users, visitors, sockets), counted from the rows."""
    found: dict[str, tuple[int, int, int]] = {}
    for room in Room.objects.all():
        keys = Counter(room.presence_set.values_list("key", flat=True))
        users = sum(1 for key in keys if key.startswith("u:"))
        found[room.channel_name] = (users, len(keys) - users, sum(keys.values()))
    return found


def kept_counts() -> dict[str, tuple[int, int, int]]:
    return {
        name: (users, visitors, sockets)
        for name, users, visitors, sockets in Room.objects.values_list(
            "channel_name", "users", "visitors", "sockets"
        )
    }


# Constant queries.


def _batch(size: int, rooms: int, tag: str) -> list[Call]:
    """``size`` calls over ``rooms`` rooms: joins, a fifth of them leaving again."""
    now = time.time()
    calls: list[Call] = [
        join(f"{tag}-{n % rooms}", f"specific.{tag}!{n}", at=now + n * 1e-6)
        for n in range(size)
    ]
    calls += [
        Leave(f"{tag}-{n % rooms}", f"specific.{tag}!{n}", _moment(now + 1))
        for n in range(0, size, 5)
    ]
    calls += [
        LeaveAll(f"specific.{tag}!{n}", _moment(now + 1)) for n in range(1, size, 5)
    ]
    return calls


def test_a_batch_costs_the_same_queries_at_10_and_1000_calls(capsys):
    small = counted(_batch(10, 10, "small"))
    large = counted(_batch(1_000, 100, "large"))
    with capsys.disabled():
        print(
            f"\n[changes] queries per batch ({connection.vendor}): "
            f"10 calls = {small}, 1,000 calls = {large}"
        )
    assert small == large
    assert rows_counts() == kept_counts()


def test_a_batch_in_round_trips_ends_as_one_statement_by_statement(monkeypatch):
    if not sql.can_combine(connection):
        pytest.skip("statements go together only through psycopg's client cursor")

    def outcome(tag: str) -> tuple[Any, ...]:
        user = get_user_model().objects.create_user(f"{tag}-user")
        arrived: list[str] = []
        left: list[str] = []

        def on_join(room: Room, key: str, **kwargs: Any) -> None:
            arrived.append(room.channel_name.replace(tag, "") + " " + key[:2])

        def on_leave(room: Room, key: str, **kwargs: Any) -> None:
            left.append(room.channel_name.replace(tag, "") + " " + key[:2])

        user_joined_room.connect(on_join, weak=False)
        user_left_room.connect(on_leave, weak=False)
        try:
            # Two tabs of one user among them; one tab leaves.
            operations.apply(
                _batch(50, 5, tag)
                + [join(f"{tag}-0", f"specific.{tag}!tab{n}", user) for n in (1, 2)]
            )
            created = dict(Room.objects.values_list("channel_name", "version"))
            # Sockets that left every room join again, and others leave theirs.
            now = time.time() + 2
            operations.apply(
                [join(f"{tag}-{n % 5}", f"specific.{tag}!{n}", at=now) for n in (1, 6)]
                + [LeaveAll(f"specific.{tag}!{n}", _moment(now)) for n in (2, 3, 4)]
                + [LeaveAll(f"specific.{tag}!tab1", _moment(now))]
            )
        finally:
            user_joined_room.disconnect(on_join)
            user_left_room.disconnect(on_leave)
        departures = sorted(
            (socket.replace(tag, ""), room.replace(tag, ""))
            for socket, room in Departure.objects.filter(
                channel_name__contains=tag
            ).values_list("channel_name", "room_channel_name")
        )
        presences = sorted(
            (room.replace(tag, ""), socket.replace(tag, ""))
            for room, socket in Presence.objects.filter(
                room__channel_name__startswith=tag
            ).values_list("room__channel_name", "channel_name")
        )
        rooms = {
            name.replace(tag, ""): (version - created[name], counts)
            for name, version, *counts in Room.objects.filter(
                channel_name__startswith=tag
            ).values_list("channel_name", "version", "users", "visitors", "sockets")
        }
        return presences, rooms, departures, sorted(arrived), sorted(left)

    with CaptureQueriesContext(connection) as together:
        combined = outcome("together")
    monkeypatch.setattr(sql, "can_combine", lambda connection: False)
    with CaptureQueriesContext(connection) as apart:
        stepwise = outcome("apart")

    assert combined == stepwise
    presences, rooms, departures, arrived, left = combined
    assert presences
    assert rooms
    assert departures
    assert arrived.count("-0 u:") == 1  # the user arrived once, and stayed
    assert "-0 u:" not in left
    assert len(together.captured_queries) < len(apart.captured_queries)
    assert rows_counts() == kept_counts()


def test_a_leaves_departure_goes_with_its_writes():
    operations.join("lobby", "specific.a!1")
    operations.join("lobby", "specific.a!2")
    at = _moment(time.time() + 1)

    with CaptureQueriesContext(connection) as queries:
        operations.apply([LeaveAll("specific.a!1", at)])

    table = Departure._meta.db_table
    insert = f'INSERT INTO "{table}"'
    (remembering,) = [q["sql"] for q in queries.captured_queries if insert in q["sql"]]
    if sql.can_combine(connection):
        # The same round trip as the presence's delete, the room's update
        # and COMMIT (the member keys' sockets were counted with the locks).
        assert 'DELETE FROM "channels_presence_presence"' in remembering
        assert 'INSERT INTO "channels_presence_room"' in remembering
        assert remembering.endswith("COMMIT")
    assert Departure.objects.get().left_at == at
    assert not Presence.objects.filter(channel_name="specific.a!1").exists()


def test_statements_together_return_each_ones_rows_in_order():
    statements: list[sql.Statement] = [
        ("SELECT %s, %s", [1, "one"]),
        ("SELECT 2 WHERE %s", [False]),
        (f"DELETE FROM {Room._meta.db_table} WHERE channel_name = %s", ["none"]),
        ("SELECT %s UNION ALL SELECT %s", [3, 4]),
    ]

    assert sql.together(connection, statements) == [
        [(1, "one")],
        [],
        [],
        [(3,), (4,)],
    ]
    assert sql.together(connection, []) == []


def test_a_compiled_statement_is_the_querysets_own_for_any_values():
    builds: list[tuple[Any, ...]] = []

    def build(room_ids: Any, sockets: Any) -> list[QuerySet[Any]]:
        builds.append((room_ids, sockets))
        presences = Presence.objects.using("default").order_by()
        return [
            part.values_list("channel_name", flat=True)
            for in_rooms in sql.any_of(presences, "room_id", room_ids)
            for part in sql.any_of(in_rooms, "channel_name", sockets)
        ]

    lobby = operations.join("lobby", "specific.a!1")
    operations.join("lobby", "specific.a!2")
    hall = operations.join("hall", "specific.a!1")
    assert lobby is not None
    assert hall is not None
    name = f"test.{uuid.uuid4().hex}"
    for room_ids, sockets in [
        ([lobby.pk], ["specific.a!1"]),
        ([lobby.pk, hall.pk], ["specific.a!1", "specific.a!2", "specific.a!3"]),
        ([-1], ["specific.a!1"]),
    ]:
        statements = sql.compiled(name, "default", build, room_ids, sockets)
        # What the querysets would run, and the rows they would read.
        expected = [sql.statement(query) for query in build(room_ids, sockets)]
        assert [(text, list(params)) for text, params in statements] == [
            (text, list(params)) for text, params in expected
        ]
        found = sql.together(connection, statements)
        assert sorted(row[0] for rows in found for row in rows) == sorted(
            Presence.objects.filter(
                room_id__in=room_ids, channel_name__in=sockets
            ).values_list("channel_name", flat=True)
        )
    compiles = len(builds) - 3  # the expected statements built three
    assert compiles == (1 if connection.vendor == "postgresql" else 3)


def test_a_users_join_reads_the_user_once_and_announces_them(alice, bob):
    operations.join("lobby", "specific.b!1", bob)
    layer: Any = get_channel_layer()
    watcher = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(events_group("lobby"), watcher)
    table = get_user_model()._meta.db_table

    with CaptureQueriesContext(connection) as queries:
        operations.apply([join("lobby", "specific.a!1", alice)])

    sqls = [query["sql"] for query in queries.captured_queries]
    reads = [sql for sql in sqls if f'FROM "{table}"' in sql]
    assert len(reads) == 1, reads
    (diff,) = channel_messages(watcher)
    ((key, member),) = diff["joins"].items()
    assert key == f"u:{alice.pk}"
    assert member["user"]["username"] == "alice"


def test_a_batch_of_leaves_costs_the_same_queries_for_1_and_100_rooms():
    for n in range(100):
        operations.join(f"room-{n}", f"specific.many!{n}")
        operations.join(f"room-{n}", f"specific.many!x{n}")
    # Batches, both: a change set of at most COUNT_FIRST_CALLS calls counts
    # its member keys with its locks (a lone leave is a round trip shorter).
    size = changes.COUNT_FIRST_CALLS + 1
    for n in range(size):
        operations.join("room-0", f"specific.few!{n}")

    few = counted([LeaveAll(f"specific.few!{n}") for n in range(size)])
    many = counted([LeaveAll(f"specific.many!{n}") for n in range(100)])
    assert few == many
    assert counted([LeaveAll("specific.many!x0")]) <= many


# One change set per room.


def test_a_batch_is_one_version_per_room_and_one_diff(alice):
    layer: Any = get_channel_layer()
    before = operations.join("lobby", "specific.a!0").version
    watcher = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(events_group("lobby"), watcher)

    operations.apply(
        [
            join("lobby", f"specific.a!{n}", alice if n == 1 else None)
            for n in range(1, 6)
        ]
        + [join("kitchen", "specific.a!1")]
    )

    assert Room.objects.get(channel_name="lobby").version == before + 1
    frames = _received(layer, watcher)
    assert [(f["from"], f["version"]) for f in frames] == [(before, before + 1)]
    (diff,) = frames
    assert len(diff["joins"]) == 5
    assert diff["counts"] == {"users": 1, "visitors": 5, "sockets": 6}


def _received(layer: Any, channel: str) -> list[dict[str, Any]]:
    return channel_messages(channel, layer)


def test_a_change_set_that_changes_nothing_moves_no_version():
    room = operations.join("lobby", "specific.a!1", at=_moment(time.time() - 5))
    assert room is not None
    again = operations.apply([join("lobby", "specific.a!1", at=time.time() - 10)])
    assert again.rooms["lobby"].version == room.version
    operations.touch(["specific.a!1"])
    assert Room.objects.get(channel_name="lobby").version == room.version


def test_random_batches_keep_counts_and_versions_exact(django_user_model):
    users = [django_user_model.objects.create_user(f"user{n}") for n in range(5)]
    rng = random.Random(20261202)
    rooms = ["lobby", "kitchen", "garden"]
    sockets = [f"specific.r!{n}" for n in range(30)]
    now = time.time()
    bumps: Counter[str] = Counter()
    versions = {}
    for batch in range(40):
        calls: list[Call] = []
        for _ in range(rng.randint(1, 12)):
            socket = rng.choice(sockets)
            at = now + batch + rng.random() / 2
            kind = rng.random()
            if kind < 0.6:
                user = rng.choice([*users, None, None])
                calls.append(join(rng.choice(rooms), socket, user, at))
            elif kind < 0.85:
                calls.append(Leave(rng.choice(rooms), socket, _moment(at)))
            else:
                calls.append(LeaveAll(socket, _moment(at)))
        before = dict(Room.objects.values_list("channel_name", "version"))
        operations.apply(calls)
        after = dict(Room.objects.values_list("channel_name", "version"))
        for room, version in after.items():
            if room in before:
                assert version - before[room] in (0, 1), "one bump per change set"
                bumps[room] += version - before[room]
            else:
                versions[room] = version - 1
        assert rows_counts() == kept_counts(), f"after batch {batch}"
    for room, first in versions.items():
        assert Room.objects.get(channel_name=room).version == first + bumps[room] + 1


# User-level signals.


@pytest.fixture
def transitions() -> Iterator[list[tuple[str, str, str | None, str | None]]]:
    """(joined or left, room, key, reason) of each user-level signal."""
    seen: list[tuple[str, str, str | None, str | None]] = []

    def joined(sender: Any, room: Room, user: Any, key: str, **kwargs: Any) -> None:
        seen.append(("joined", room.channel_name, key, None))

    def left(sender: Any, room: Room, user: Any, key: str, reason: str, **kw: Any):
        seen.append(("left", room.channel_name, key, reason))

    user_joined_room.connect(joined, dispatch_uid="tests.joined")
    user_left_room.connect(left, dispatch_uid="tests.left")
    yield seen
    user_joined_room.disconnect(dispatch_uid="tests.joined")
    user_left_room.disconnect(dispatch_uid="tests.left")


def test_a_user_arrives_with_the_first_tab_and_leaves_with_the_last(alice, transitions):
    key = f"u:{alice.pk}"
    operations.join("lobby", "specific.t!1", alice)
    operations.join("lobby", "specific.t!2", alice)
    operations.leave("lobby", "specific.t!1")
    assert transitions == [("joined", "lobby", key, None)]

    operations.leave("lobby", "specific.t!2")

    assert transitions == [
        ("joined", "lobby", key, None),
        ("left", "lobby", key, "left"),
    ]


def test_a_user_whose_last_tab_is_pruned_left_because_it_expired(alice, transitions):
    operations.join("lobby", "specific.t!1", alice, at=_moment(time.time() - 120))
    operations.prune_presences(60)
    assert transitions[-1] == ("left", "lobby", f"u:{alice.pk}", "expired")


def test_tabs_that_come_and_go_within_one_batch_tell_nothing(alice, transitions):
    now = time.time()
    operations.apply(
        [
            join("lobby", "specific.t!1", alice, now),
            join("lobby", "specific.t!2", alice, now),
            LeaveAll("specific.t!1", _moment(now + 1)),
            LeaveAll("specific.t!2", _moment(now + 1)),
        ]
    )
    assert transitions == []


def test_visitors_of_one_session_are_one_member(transitions):
    key = protocol.visitor_key("lobby", "specific.v!1", "session-1")
    for tab in ("specific.v!1", "specific.v!2"):
        operations.join("lobby", tab, key=key)
    state = operations.read_state("lobby")
    assert list(state["members"]) == [key]
    assert state["counts"] == {"users": 0, "visitors": 1, "sockets": 2}
    assert transitions == [("joined", "lobby", key, None)]


# Two transactions at once, on one room (PostgreSQL).


@postgresql_only
def test_two_workers_applying_one_rooms_batches_at_once_keep_it_exact(transitions):
    get_user_model().objects.bulk_create(
        get_user_model()(username=f"tab-user-{n}") for n in range(10)
    )
    users = list(get_user_model().objects.filter(username__startswith="tab-user-"))
    now = time.time()
    start = threading.Barrier(2)

    def worker(offset: int) -> None:
        start.wait()
        for batch in range(20):
            calls: list[Call] = []
            for n in range(10):
                user = users[(batch + n) % len(users)]
                socket = f"specific.w{offset}!{batch}-{n}"
                calls.append(join("lobby", socket, user, now + batch))
            if batch:
                calls += [
                    LeaveAll(
                        f"specific.w{offset}!{batch - 1}-{n}", _moment(now + batch)
                    )
                    for n in range(0, 10, 2)
                ]
            operations.apply(calls)

    racing = [in_background(partial(worker, offset)) for offset in (0, 1)]
    for future in racing:
        future.result(timeout=120)

    assert rows_counts() == kept_counts()
    # Each user's arrivals and departures alternate, whatever the interleaving.
    by_key: dict[str, list[str]] = {}
    for kind, _, key, _ in transitions:
        assert key is not None
        by_key.setdefault(key, []).append(kind)
    present = set(Presence.objects.values_list("key", flat=True))
    for key, kinds in by_key.items():
        assert all(a != b for a, b in itertools.pairwise(kinds)), key
        assert (kinds[-1] == "joined") == (key in present), key
    view = RoomView("lobby")
    view.receive(operations.read_state("lobby"))
    assert view.members == members_now("lobby")


@postgresql_only
def test_batches_sharing_sockets_in_opposite_orders_do_not_deadlock():
    sockets = [f"specific.d!{n}" for n in range(50)]
    rooms = [f"room-{n}" for n in range(10)]
    start = threading.Barrier(2)

    def worker(order: list[str], room_order: list[str]) -> None:
        start.wait()
        for _ in range(10):
            operations.apply(
                [
                    join(room, socket)
                    for socket in order
                    for room in room_order[: 1 + sockets.index(socket) % 3]
                ]
            )
            operations.apply([LeaveAll(socket) for socket in order])

    racing = [
        in_background(lambda: worker(sockets, rooms)),
        in_background(lambda: worker(sockets[::-1], rooms[::-1])),
    ]
    for future in racing:
        future.result(timeout=120)
    assert rows_counts() == kept_counts()


# A room too big to list.


@override_settings(CHANNELS_PRESENCE_MAX_LISTED_MEMBERS=4)
def test_a_room_crossing_max_listed_members_sends_counts_only_until_below_90_percent():
    layer: Any = get_channel_layer()
    operations.join("lobby", "specific.l!0")
    watcher = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(events_group("lobby"), watcher)
    view = RoomView("lobby")
    view.receive(operations.read_state("lobby"))
    for n in range(1, 5):
        operations.join("lobby", f"specific.l!{n}")
    frames = _received(layer, watcher)
    for frame in frames:
        view.receive(frame)

    # The fifth member unlisted it: counts only, and the client's members null.
    assert [f["joins"] is None for f in frames] == [False] * 3 + [True]
    assert frames[-1]["counts"] == {"users": 0, "visitors": 5, "sockets": 5}
    assert view.members is None
    state = operations.read_state("lobby")
    assert state["members"] is None
    assert state["counts"]["visitors"] == 5

    # Back to 4 is not below 90 % of 4: still unlisted; at 3 it lists again.
    operations.leave("lobby", "specific.l!4")
    operations.leave("lobby", "specific.l!3")
    frames = _received(layer, watcher)
    assert [f["joins"] is None for f in frames] == [True, False]
    for frame in frames:
        view.receive(frame)
    # The client that had null members asks for the state, and has it all.
    assert view.listed_while_null
    view.receive(operations.read_state("lobby"))
    assert view.members == members_now("lobby")
    assert len(view.members or {}) == 3


def test_tasks_apply_a_batch_as_one_change_set(alice):
    now = time.time()
    tasks.apply_batch(
        [
            [
                "channels_presence.tasks.add_presence",
                ["lobby", f"specific.b!{n}"],
                {"at": now},
            ]
            for n in range(3)
        ]
    )
    room = Room.objects.get(channel_name="lobby")
    assert room.counts() == (0, 3, 3)
    assert group_members("lobby") == {f"specific.b!{n}" for n in range(3)}


@pytest.mark.parametrize(
    ("setting", "code"),
    [("MAX_LISTED_MEMBERS", "E009"), ("EVENT_SOCKETS", "E010")],
)
@pytest.mark.parametrize("value", [0, -1, 2.5, "1000", True])
def test_a_bad_room_size_setting_is_reported_at_startup(
    setting: str, code: str, value: Any
) -> None:
    from django.core.checks import run_checks

    with override_settings(**{f"CHANNELS_PRESENCE_{setting}": value}):
        found = [m for m in run_checks() if m.id == f"channels_presence.{code}"]
    assert len(found) == 1
    assert setting in found[0].msg


@pytest.mark.parametrize("value", [1, 300, None])
def test_a_good_event_sockets_passes_the_checks(value: Any) -> None:
    from django.core.checks import run_checks

    with override_settings(CHANNELS_PRESENCE_EVENT_SOCKETS=value):
        assert not [m for m in run_checks() if m.id == "channels_presence.E010"]


@pytest.mark.parametrize("value", [-0.1, "fast"])
def test_a_bad_event_interval_is_reported_at_startup(value: Any) -> None:
    from django.core.checks import run_checks

    with override_settings(CHANNELS_PRESENCE_EVENT_INTERVAL=value):
        found = [m for m in run_checks() if m.id == "channels_presence.E003"]
    assert [m.msg for m in found if "EVENT_INTERVAL" in m.msg]


# The members a worker process knows, instead of reading them again.


def _state_for(joiner: str) -> dict[str, Any]:
    (state,) = [m for m in channel_messages(joiner) if m["type"] == "presence.state"]
    return state


def test_states_built_from_what_the_process_knows_equal_the_rows(alice, bob):
    layer: Any = get_channel_layer()
    now = time.time()
    steps: list[list[Call]] = [
        [join("lobby", "specific.k!1", alice, now), join("lobby", "specific.k!2")],
        [join("lobby", "specific.k!3", alice, now + 1)],
        [
            Leave("lobby", "specific.k!1", _moment(now + 2)),
            join("lobby", "specific.k!4", bob, now + 2),
        ],
        # The socket joins again as another user: a new key and ref.
        [join("lobby", "specific.k!2", bob, now + 3)],
        [
            LeaveAll("specific.k!4", _moment(now + 4)),
            join("lobby", "specific.k!5", None, now + 4),
        ],
    ]
    for number, calls in enumerate(steps):
        joiner = async_to_sync(layer.new_channel)()
        operations.apply([*calls, join("lobby", joiner, None, now + number)])
        state = _state_for(joiner)
        assert state == operations.read_state("lobby"), f"after step {number}"


def test_a_change_set_this_process_did_not_see_makes_it_read_the_room_again(alice):
    layer: Any = get_channel_layer()
    operations.join("lobby", "specific.o!1", alice, subscribe=True)
    operations.join("lobby", "specific.o!2", subscribe=True)
    room = Room.objects.get(channel_name="lobby")
    assert changes.known.get(room.pk, room.version) is not None
    # Another worker's change set: this process does not see it.
    saved = dict(changes.known._rooms)
    operations.leave("lobby", "specific.o!2")
    changes.known._rooms.clear()
    changes.known._rooms.update(saved)

    joiner = async_to_sync(layer.new_channel)()
    with CaptureQueriesContext(connection) as queries:
        operations.join("lobby", joiner, subscribe=["state"])

    state = _state_for(joiner)
    assert state == operations.read_state("lobby")
    assert "specific.o!2" not in str(state)
    assert len(state["members"]) == 2
    assert any("joined_at" in q["sql"] for q in queries.captured_queries[-8:])


@override_settings(
    CHANNELS_PRESENCE_MEMBER_FIELDS={
        "id": "pk",
        "username": "username",
        "joined": "date_joined",
    }
)
def test_a_join_into_a_room_this_process_forgot_reads_its_members_with_the_locks(
    alice, bob
):
    layer: Any = get_channel_layer()
    operations.join("lobby", "specific.f!1", alice, subscribe=True)
    operations.join("lobby", "specific.f!2", bob, subscribe=True)
    operations.join("lobby", "specific.f!3", subscribe=True)
    operations.join("elsewhere", "specific.f!4", alice, subscribe=True)
    # As a worker that has not seen the room for a minute (MAX_AGE), or
    # ever, finds it.
    changes.known.clear()

    joiner = async_to_sync(layer.new_channel)()
    with CaptureQueriesContext(connection) as queries:
        operations.join("lobby", joiner, subscribe=["state"])

    state = _state_for(joiner)
    assert state == operations.read_state("lobby")
    assert sorted(state["members"]) == sorted(
        {f"u:{alice.pk}", f"u:{bob.pk}", *[k for k in state["members"] if "v:" in k]}
    )
    assert len(state["members"]) == 4
    assert "specific.f!4" not in str(state)
    if sql.can_combine(connection):
        # Read with the locks: the writes and the room's update go with
        # COMMIT, in the second round trip. After commit, with no lock, the
        # socket's groups are checked against its rows (broadcast.settle).
        first, last, check = [q["sql"] for q in queries.captured_queries]
        assert first.startswith("BEGIN; ")
        assert '"joined_at"' in first
        assert last.endswith("; COMMIT")
        assert check.startswith("SELECT ")
    # Known now: the next joiner's state is built without a read.
    other = async_to_sync(layer.new_channel)()
    with CaptureQueriesContext(connection) as queries:
        operations.join("lobby", other, subscribe=["state"])
    assert _state_for(other) == operations.read_state("lobby")
    assert not any("EPOCH" in q["sql"] for q in queries.captured_queries)


@override_settings(CHANNELS_PRESENCE_MAX_LISTED_MEMBERS=1)
def test_a_joiner_of_a_room_that_is_not_listed_is_sent_counts_only():
    operations.join("big", "specific.u!1", subscribe=True)
    operations.join("big", "specific.u!2", subscribe=True)
    assert not Room.objects.get(channel_name="big").listed
    changes.known.clear()
    layer: Any = get_channel_layer()
    joiner = async_to_sync(layer.new_channel)()

    operations.join("big", joiner, subscribe=["state"])

    state = _state_for(joiner)
    assert state["members"] is None
    assert state["counts"]["sockets"] == 3


def test_removed_presences_are_built_as_the_orm_builds_them(alice):
    operations.join("lobby", "specific.built!1", alice)
    operations.join("lobby", "specific.built!2")
    expected = {p.pk: p for p in Presence.objects.all()}
    names = [field.attname for field in Presence._meta.concrete_fields]
    rows = list(Presence.objects.values_list(*names))

    def same(built: list[Presence]) -> None:
        assert {p.pk for p in built} == set(expected)
        for presence in built:
            orm = expected[presence.pk]
            assert type(presence) is Presence
            assert {k: v for k, v in vars(presence).items() if k != "_state"} == {
                k: v for k, v in vars(orm).items() if k != "_state"
            }
            assert (presence._state.adding, presence._state.db) == (False, "default")
            assert presence.user_id == orm.user_id
            assert presence.room_id == orm.room_id

    same(sql.instances(Presence, "default", names, rows))
    # With a post_init receiver, as the ORM does: through __init__.
    seen: list[Any] = []

    def receiver(sender: Any, instance: Any, **kwargs: Any) -> None:
        seen.append(instance)

    post_init.connect(receiver, sender=Presence)
    try:
        same(sql.instances(Presence, "default", names, rows))
    finally:
        post_init.disconnect(receiver, sender=Presence)
    assert len(seen) == 2

    removed = Room.objects.get(channel_name="lobby").presence_set.all().remove()
    assert sorted(p.pk for p in removed) == sorted(expected)
    assert {p.room.channel_name for p in removed} == {"lobby"}
    assert {p.user for p in removed} == {alice, None}
