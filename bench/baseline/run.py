"""django-channels-presence 1.0.0, measured the way bench/ measures ours.

Run by ``bench/run.py`` with the baseline virtualenv's Python, from this
directory (so that ``channels_presence`` is 1.0.0's)::

    bench/.baseline-venv/bin/python bench/baseline/run.py --json OUT [--smoke]

It creates its own database (a SQLite file, or a PostgreSQL database on the
server of ``DATABASE_URL``), migrates it, measures, drops it, deletes its Redis
keys, and writes its figures as JSON to OUT: ``{"rows": [...], "versions": ...}``,
each row ``{"key", "value", "p99", "unit", "n", "detail"}`` with the same keys
as ours for the same operation.

Everything is called directly on consumer instances and managers, as 1.0.0's
documentation has a consumer do: no server, no network but Redis and the
database.
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import uuid
from importlib.metadata import version

# The run's id: bench/run.py passes it, and deletes the Redis keys it prefixes.
RUN = os.environ.get("BASELINE_RUN") or uuid.uuid4().hex[:12]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sections", default="socket,prune")
    parser.add_argument("--prune-presences", type=int, default=100_000)
    args = parser.parse_args()
    url = os.environ.get("DATABASE_URL", "sqlite")
    name = (
        os.path.join(tempfile.gettempdir(), f"cp-baseline-{RUN}.sqlite3")
        if url == "sqlite"
        else f"cp_baseline_{RUN}"
    )
    os.environ["BASELINE_DATABASE"] = name
    os.environ.setdefault("BASELINE_PREFIX", f"cp-baseline-{RUN}")
    os.environ["DJANGO_SETTINGS_MODULE"] = "baseline_settings"
    if url != "sqlite":
        _server(url, f'CREATE DATABASE "{name}"')
    rows = []
    try:
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        sections = args.sections.split(",")
        if "socket" in sections:
            rows += socket_rows(*((100, 200) if args.smoke else (1_000, 2_000)))
        if "prune" in sections:
            count = 2_000 if args.smoke else args.prune_presences
            rows += prune_rows(count, 20 if args.smoke else 1_000)
    finally:
        from django.db import connections

        connections.close_all()
        _cleanup(url, name)
    versions = {
        package: version(package)
        for package in (
            "django-channels-presence",
            "Django",
            "channels",
            "channels-redis",
            "celery",
            "psycopg2-binary",
        )
    }
    versions["python"] = sys.version.split()[0]
    with open(args.json, "w") as out:
        json.dump({"rows": rows, "versions": versions}, out)


def row(key, samples_ns=None, value=None, unit="µs", detail="", p99=None, n=None):
    """A figure: from per-call samples (median, p99 in µs), or a value as it is."""
    if samples_ns is not None:
        ordered = sorted(samples_ns)
        value = ordered[len(ordered) // 2] / 1e3
        p99 = ordered[min(int(len(ordered) * 0.99), len(ordered) - 1)] / 1e3
        n = len(ordered)
    return {
        "key": key,
        "value": value,
        "p99": p99,
        "unit": unit,
        "n": n,
        "detail": detail,
    }


def timed(call, count):
    clock = time.perf_counter_ns
    samples = [0] * count
    gc.collect()
    for i in range(count):
        start = clock()
        call(i)
        samples[i] = clock() - start
    return samples


# Socket side.


def socket_rows(sockets, count):
    """A join and a leave of ``sockets`` sockets; ``count`` heartbeats among them."""
    from asgiref.sync import async_to_sync, sync_to_async
    from channels.db import database_sync_to_async
    from channels.generic.websocket import WebsocketConsumer

    from channels_presence.decorators import remove_presence, touch_presence
    from channels_presence.models import Presence, Room

    class Consumer(WebsocketConsumer):
        @touch_presence
        def receive(self, text_data=None, bytes_data=None):
            self.send(text_data=text_data)

        @remove_presence
        def disconnect(self, code):
            pass

    pool = []
    for i in range(sockets):
        consumer = Consumer()
        consumer.scope = {"type": "websocket", "user": None}
        consumer.channel_name = f"specific.baseline-{i}!socket"
        pool.append(consumer)
    rows = []

    # A join: what a 1.0.0 consumer's connect() calls (group_add included).
    # Sync handlers are called as Channels calls them: in a thread, through
    # sync_to_async from the event loop, which async_to_sync goes back to.
    async def in_thread(call, count):
        clock = time.perf_counter_ns
        samples = [0] * count
        gc.collect()
        for i in range(count):
            start = clock()
            await sync_to_async(call)(i)
            samples[i] = clock() - start
        return samples

    joins = async_to_sync(in_thread)(
        lambda i: Room.objects.add("bench-room", pool[i].channel_name), sockets
    )
    rows.append(row("socket.join.sync", joins))
    frame = '"heartbeat"'
    heartbeats = timed(lambda i: pool[i % sockets].receive(text_data=frame), count)
    rows.append(
        row(
            "socket.heartbeat.sync",
            heartbeats,
            detail=f"{Presence.objects.count()} presences",
        )
    )

    # 1.0.0's decorator cannot wrap an async consumer (defect 4): the nearest
    # an async consumer gets is the same touch through database_sync_to_async.
    touch = database_sync_to_async(Presence.objects.touch)

    async def async_heartbeats():
        clock = time.perf_counter_ns
        samples = [0] * count
        for i in range(count):
            start = clock()
            await touch(pool[i % sockets].channel_name)
            samples[i] = clock() - start
        return samples

    rows.append(
        row(
            "socket.heartbeat.async",
            async_to_sync(async_heartbeats)(),
            detail="Presence.objects.touch via database_sync_to_async",
        )
    )
    leaves = async_to_sync(in_thread)(lambda i: pool[i].disconnect(1000), sockets)
    rows.append(row("socket.leave.sync", leaves))
    return rows


# Prune.


def prune_rows(count, rooms):
    """Room.objects.prune_presences() on ``count`` presences, half stale."""
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from channels_presence.models import Presence, Room
    from channels_presence.signals import presence_changed

    layer = get_channel_layer()

    # The receiver 1.0.0's documentation gives, on channels 3: the room's
    # members to the room's group on a bulk change.
    def broadcast(sender, room, added, removed, bulk_change, **kwargs):
        if bulk_change:
            async_to_sync(layer.group_send)(
                room.channel_name,
                {
                    "type": "presence.changed",
                    "presence": [p.channel_name for p in room.presence_set.all()],
                },
            )

    presence_changed.connect(broadcast, weak=False)
    try:
        Room.objects.bulk_create(
            [Room(channel_name=f"bench-prune-{i}") for i in range(rooms)]
        )
        room_objects = list(
            Room.objects.filter(channel_name__startswith="bench-prune-")
        )
        now = timezone.now()
        stale = now - timezone.timedelta(seconds=120)
        # Sockets spread over 8 server processes, as in bench/prune.py.
        Presence.objects.bulk_create(
            [
                Presence(
                    room=room_objects[i % rooms],
                    channel_name=f"specific.server{i % 8}!socket{i}",
                    # Fresh ones an hour ahead: none goes stale during a slow run.
                    last_seen=stale if i % 2 else now + timezone.timedelta(hours=1),
                )
                for i in range(count)
            ],
            batch_size=5_000,
        )
        # The sockets in their rooms' groups, as 1.0.0's add_presence put them.
        async_to_sync(_fill_groups)(
            layer,
            [
                (
                    room_objects[i % rooms].channel_name,
                    f"specific.server{i % 8}!socket{i}",
                )
                for i in range(count)
            ],
        )
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE channels_presence_presence")
        with CaptureQueriesContext(connection) as queries:
            began = time.perf_counter()
            Room.objects.prune_presences()
            seconds = time.perf_counter() - began
        left = Presence.objects.count()
        if left != count - count // 2:
            raise RuntimeError(f"prune left {left} of {count} presences")
    finally:
        presence_changed.disconnect(broadcast)
    detail = (
        f"{count:,} presences, {rooms:,} rooms; no group discard, "
        "no notice (defects 7, 8)"
    )
    return [
        row("prune.seconds", value=seconds, unit="s", detail=detail),
        row("prune.queries", value=len(queries), unit="queries", detail=detail),
    ]


async def _fill_groups(layer, pairs):
    # ZADDs straight to channels_redis's group keys, pipelined: group_add
    # one at a time would take longer than the prune.
    by_shard = {}
    for group, channel in pairs:
        by_shard.setdefault(layer.consistent_hash(group), []).append((group, channel))
    now = time.time()
    for shard, calls in by_shard.items():
        async with layer.connection(shard) as connection:
            for start in range(0, len(calls), 1_000):
                transaction = connection.multi_exec()
                for group, channel in calls[start : start + 1_000]:
                    transaction.zadd(layer._group_key(group), now, channel)
                await transaction.execute()


def _server(url, statement):
    from urllib.parse import unquote, urlsplit

    import psycopg2

    parts = urlsplit(url)
    connection = psycopg2.connect(
        dbname=parts.path.lstrip("/") or "postgres",
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        host=parts.hostname or "",
        port=parts.port or 5432,
    )
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


def _cleanup(url, name):
    """Drop the run's database; its Redis keys are deleted by bench/run.py."""
    if url == "sqlite":
        for suffix in ("", "-wal", "-shm", "-journal"):
            if os.path.exists(name + suffix):
                os.unlink(name + suffix)
    else:
        _server(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
