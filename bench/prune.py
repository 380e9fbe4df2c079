"""Prune, measured: the prune beat's task runs, on many presences.

That is ``operations.prune_stale()``: ``Room.objects.prune_presences()``
without building model instances of the presences it removes, which the
task only counts (1.0.0's task called ``Room.objects.prune_presences()``).

DESIGN.md's budget: 100,000 presences, half of them stale, across 1,000 rooms,
pruned in at most 2 s including the group discards and the ``presence.expired``
notices, in a number of queries that does not grow with the rooms. Every socket
is in its room's group and events group in the real Redis channel layer, as a
mixin's join (``subscribe=True``) leaves it, so the discards, the notices to the
stale sockets and the events to those that stay all do real work.

Then the same prune again, on the same data, while JOINERS processes apply joins
into its rooms as a worker does, one change set each: a join's latency during
the prune must not exceed its quiet value by more than the prune's database
time (until its commit), for no lock is held while the channel layer works.

Called by ``bench/pipeline.py`` (section ``prune``) on the run's own database;
``bench/baseline/run.py`` does the same to 1.0.0, on the same data.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from bench.pipeline import Row
from channels_presence import broadcast, groups, operations, protocol
from channels_presence.changes import Join

PRUNE_BUDGET_S = 2.0


#: Server processes the bench's sockets are spread over (channel-name prefixes).
SERVERS = 8
#: Processes applying joins, one change set each, beside the second prune.
JOINERS = 4
#: Quiet joins timed per joiner before it.
QUIET_JOINS = 100


def prune_rows(count: int, rooms: int) -> list[Row]:
    """Fill ``count`` presences in ``rooms`` rooms, half stale; time one prune.

    Then fill them again, and time joins, alone and beside a second prune.
    """
    seconds, queries = _prune(count, rooms)
    rows = _prune_figures(count, rooms, seconds, queries)
    quiet, during, database_time, _ = _joins_beside_a_prune(count, rooms)
    rows += _join_figures(quiet, during, database_time)
    return rows


def _fill(count: int, rooms: int) -> None:
    """``count`` presences in ``rooms`` rooms, half stale, in their groups."""
    from channels_presence.models import Presence, Room

    layer = get_channel_layer()
    with connection.cursor() as cursor:
        # The run's own database: only this section's presences, from here on.
        cursor.execute(f"DELETE FROM {Presence._meta.db_table}")
    per_room = count // rooms
    # With the counts their joins would have left (one visitor per socket).
    Room.objects.filter(channel_name__startswith="bench-prune-").delete()
    Room.objects.bulk_create(
        [
            Room(channel_name=f"bench-prune-{i}", visitors=per_room, sockets=per_room)
            for i in range(rooms)
        ]
    )
    room_objects = list(Room.objects.filter(channel_name__startswith="bench-prune-"))
    now = timezone.now()
    stale = now - timedelta(seconds=120)
    # As daphne names them: each server process has one prefix for all its
    # sockets, and a group message is stored once per process, not per socket.
    names = [f"specific.server{i % SERVERS}!socket{i}" for i in range(count)]
    presences = []
    for i, name in enumerate(names):
        room = room_objects[i % rooms]
        key = protocol.member_key(room.channel_name, name)
        presences.append(
            Presence(
                room=room,
                channel_name=name,
                # Fresh ones an hour ahead: none goes stale during a slow run.
                last_seen=stale if i % 2 else now + timedelta(hours=1),
                joined_at=stale,
                # As a mixin's join writes them: every presence event handled.
                key=key,
                ref=protocol.presence_ref(room.channel_name, name, key),
                events=protocol.ALL_EVENTS,
            )
        )
    Presence.objects.bulk_create(presences, batch_size=5_000)
    # What count joins with subscribe=True leave in the layer, pipelined.
    joins = [
        (room_objects[i % rooms].channel_name, name, protocol.ALL_EVENTS)
        for i, name in enumerate(names)
    ]
    async_to_sync(groups.add)(layer, joins)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {Presence._meta.db_table}")


def _prune(count: int, rooms: int) -> tuple[float, int]:
    """Fill, then time one prune: its seconds and queries."""

    _fill(count, rooms)
    with CaptureQueriesContext(connection) as queries:
        began = time.perf_counter()
        removed = operations.prune_stale()
        seconds = time.perf_counter() - began
    _check(count, removed)
    return seconds, len(queries)


def _check(count: int, removed: int) -> None:
    from channels_presence.models import Presence

    left = Presence.objects.filter(channel_name__startswith="specific.server").count()
    if left != count - count // 2 or removed != count // 2:
        raise RuntimeError(f"the prune left {left} of {count} presences")


def _prune_figures(count: int, rooms: int, seconds: float, queries: int) -> list[Row]:
    what = f"{count:,} presences, half stale, {rooms:,} rooms"
    return [
        Row(f"prune: {what}, {connection.vendor}"),
        Row(
            "  wall time, group discards and notices included",
            f"≤ {PRUNE_BUDGET_S:g} s",
            f"{seconds:.2f} s",
            seconds <= PRUNE_BUDGET_S,
        ).figure_of("prune.seconds", seconds, "s"),
        Row(
            "  queries",
            "O(1), not O(rooms)",
            f"{queries} for {rooms:,} rooms",
            queries < rooms,
        ).figure_of("prune.queries", queries, "queries"),
    ]


def _joins_beside_a_prune(
    count: int, rooms: int
) -> tuple[list[float], list[float], float, float]:
    """Join latencies (s) alone, then beside a prune of the same data; the
    prune's database time (until its commit) and wall time.

    The joins run in processes of their own, as other workers' would: in
    this one they would wait for the prune's Python, not for its locks.
    """
    _fill(count, rooms)
    quiet = _joining(rooms, "quiet", lambda number: number >= QUIET_JOINS)
    context = multiprocessing.get_context("fork")
    pruned, started = context.Event(), context.Barrier(JOINERS + 1)
    results: multiprocessing.Queue[list[float]] = context.Queue()
    connections.close_all()
    joiners = [
        context.Process(target=_join_beside, args=(rooms, n, pruned, started, results))
        for n in range(JOINERS)
    ]
    for joiner in joiners:
        joiner.start()
    committed: list[float] = []
    deliver = broadcast.deliver

    def stamped(*args: Any, **kwargs: Any) -> None:
        # deliver() runs after the prune's commit: the end of its database time.
        if not committed:
            committed.append(time.perf_counter())
        deliver(*args, **kwargs)

    broadcast.deliver = stamped
    try:
        started.wait()
        # The joiners are under way.
        time.sleep(0.2)
        began = time.perf_counter()
        removed = operations.prune_stale()
        wall = time.perf_counter() - began
    finally:
        broadcast.deliver = deliver
        pruned.set()
    during = [seconds for _ in joiners for seconds in results.get(timeout=60)]
    for joiner in joiners:
        joiner.join()
    _check(count, removed)
    return quiet, during, committed[0] - began, wall


def _join_beside(
    rooms: int,
    number: int,
    pruned: Any,
    started: Any,
    results: multiprocessing.Queue[list[float]],
) -> None:
    """A joiner process: joins until the prune is done, then its latencies.

    Its first join, which connects to the database and Redis, is not timed.
    """
    _joining(rooms, f"warm{number}", lambda done: done >= 1)
    started.wait()
    results.put(_joining(rooms, f"during{number}", lambda _: pruned.is_set()))


def _joining(rooms: int, name: str, done: Callable[[int], bool]) -> list[float]:
    """Apply joins into the prune's rooms until ``done(number)``; their seconds.

    Those under way when the prune began and ended are timed too.
    """
    took = []
    number = 0
    try:
        while not done(number):
            join = Join(
                f"bench-prune-{number % rooms}",
                f"specific.joiner!{name}-{number}",
                events=protocol.ALL_EVENTS,
            )
            began = time.perf_counter()
            operations.apply([join])
            took.append(time.perf_counter() - began)
            number += 1
    finally:
        connections.close_all()
    return took


def _join_figures(
    quiet: list[float], during: list[float], database_time: float
) -> list[Row]:
    quiet_p99, during_p99 = _p99(quiet), _p99(during)
    allowed = quiet_p99 + database_time
    return [
        Row(f"worker join, alone and beside that prune ({JOINERS} processes)"),
        Row(
            "  join p50 / p99, alone",
            "",
            f"{_ms(_median(quiet))} / {_ms(quiet_p99)} ms ({len(quiet)} joins)",
        ),
        Row(
            "  join p50 / p99 / max, beside the prune",
            "p99 ≤ alone + prune's database time",
            f"{_ms(_median(during))} / {_ms(during_p99)} / {_ms(max(during))} ms "
            f"({len(during)} joins; database time {_ms(database_time)} ms)",
            during_p99 <= allowed,
        ).figure_of("prune.join_p99_during", during_p99 * 1000, "ms"),
    ]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"
