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

Called by ``bench/pipeline.py`` (section ``prune``) on the run's own database;
``bench/baseline/run.py`` does the same to 1.0.0, on the same data.
"""

from __future__ import annotations

import time
from datetime import timedelta

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from bench.pipeline import Row
from channels_presence import groups, operations, protocol

PRUNE_BUDGET_S = 2.0


#: Server processes the bench's sockets are spread over (channel-name prefixes).
SERVERS = 8


def prune_rows(count: int, rooms: int) -> list[Row]:
    """Fill ``count`` presences in ``rooms`` rooms, half stale; time one prune."""
    from channels_presence.models import Presence, Room

    layer = get_channel_layer()
    with connection.cursor() as cursor:
        # The run's own database: only this section's presences, from here on.
        cursor.execute(f"DELETE FROM {Presence._meta.db_table}")
    per_room = count // rooms
    # With the counts their joins would have left (one visitor per socket).
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
    with CaptureQueriesContext(connection) as queries:
        began = time.perf_counter()
        removed = operations.prune_stale()
        seconds = time.perf_counter() - began
    left = Presence.objects.count()
    if left != count - count // 2 or removed != count // 2:
        raise RuntimeError(f"the prune left {left} of {count} presences")
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
            f"{len(queries)} for {rooms:,} rooms",
            len(queries) < rooms,
        ).figure_of("prune.queries", len(queries), "queries"),
    ]
