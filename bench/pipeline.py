# mypy: disallow-subclassing-any=False
"""The Celery pipeline, measured against DESIGN.md's performance budget.

Run it from the repository root with the project's virtualenv::

    .venv/bin/python bench/pipeline.py                # full run, about 2 minutes
    .venv/bin/python bench/pipeline.py --smoke        # tiny sizes, a few seconds
    .venv/bin/python bench/pipeline.py --sockets 1000 --seconds 30 \\
        --presences 10000,100000

It needs PostgreSQL and Redis. ``DATABASE_URL`` (default
``postgres://root@127.0.0.1:5432/test``) names the server: the script creates
its own database there (``channels_presence_bench_<run>``), migrates it and
drops it at the end; the database in the URL is only connected to for that.
``DATABASE_URL=sqlite`` uses a throwaway SQLite file instead. ``REDIS_URL``
(default ``redis://127.0.0.1:6379/0``) is the channel layer and the broker; every
key the run writes starts with ``cp-bench-<run>``, its Celery queue is its own,
and all of them are deleted at the end. The ``celery -A tasks worker`` it starts
is stopped at the end too. Settings: ``bench/settings.py``.

It prints one table: each figure, its budget, what was measured, and whether the
budget holds. Latencies are per call, median and p99, in µs; "holds?" judges the
median (the p99 shows the tail: the garbage collector and the outbox's sender
thread taking the GIL). Nothing here asserts: benchmarks print figures.

What is measured:

1. socket side, a heartbeat: a decorated consumer's ``receive`` called directly
   with the heartbeat frame, in Celery mode; inside the touch interval
   (coalesced: no I/O) and due (TOUCH_INTERVAL=0: an append to the outbox),
   async and sync, beside the undecorated handler and the inline mode;
2. socket side, a join (``dispatch.ajoin``) and a leave (``dispatch.aleave_all``)
   on the real Redis channel layer, in Celery mode and inline on the database;
3. broker load: simulated sockets heartbeating once a second, the tasks counted
   at the broker (the length of the queue, which no worker consumes meanwhile);
4. the worker: ``touch_presences`` on N presences, its body in this process and
   end to end through a real ``celery -A tasks worker``.

Each section is one function returning table rows, so more (1.0.0 side by side,
prune) can be added beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import django
import psycopg
import redis
from asgiref.sync import sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer, WebsocketConsumer
from channels.layers import BaseChannelLayer, get_channel_layer
from django.conf import settings
from django.core.management import call_command
from django.db import connection, connections

from channels_presence import dispatch, outbox, validation
from channels_presence.conf import conf
from channels_presence.decorators import touch_presence
from channels_presence.tasks import touch_presences

ROOT = Path(__file__).resolve().parent.parent

# Budgets, from DESIGN.md's "Performance budget".
HEARTBEAT_BUDGET_US = 5.0
JOIN_BUDGET_US = 500.0
TOUCH_TASKS_PER_FLUSH = 1
WORKER_BUDGET_PER_S = 50_000

ROOM = "bench-room"
WORKER_TIMEOUT = 120.0


@dataclass
class Sizes:
    """How much each section does."""

    calls: int  # socket-side calls per heartbeat variant
    joins: int  # joins (and leaves) in Celery mode
    inline: int  # joins, leaves and touches in inline mode (each one hits the DB)
    sockets: int
    seconds: float
    presences: list[int]
    worker_joins: int  # joins per apply_batch task sent to the worker
    batches: int  # apply_batch tasks of joins and leaves, in rooms of 1,000
    prune: int  # presences for the prune, half of them stale
    prune_rooms: int


@dataclass
class Row:
    """One line of the table; a row with a ``key`` is also in the JSON output.

    ``value`` is the figure bench/run.py compares with 1.0.0's row of the same
    key (a median for a latency), in ``unit``; ``p99`` and ``n`` go with it.
    """

    figure: str
    budget: str = ""
    measured: str = ""
    holds: bool | None = None
    key: str = ""
    value: float | None = None
    unit: str = ""
    p99: float | None = None
    n: int | None = None

    def keyed(self, key: str, latency: Latency) -> Row:
        """This row, carrying ``latency`` (µs) under ``key``."""
        self.key, self.value, self.unit = key, latency.median_us, "µs"
        self.p99, self.n = latency.p99_us, latency.count
        return self

    def figure_of(self, key: str, value: float, unit: str) -> Row:
        """This row, carrying ``value`` in ``unit`` under ``key``."""
        self.key, self.value, self.unit = key, value, unit
        return self

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "value": self.value,
            "p99": self.p99,
            "unit": self.unit,
            "n": self.n,
            "detail": f"{self.figure.strip()}: {self.measured}",
        }


def main() -> None:
    """Parse the arguments, run every section, print the table, clean up."""
    args = _arguments()
    # ``python bench/pipeline.py`` puts bench/ on the path, not the root where the
    # settings (bench.settings) and the deployment's Celery app (tasks) live.
    sys.path.insert(0, str(ROOT))
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    sizes = (
        Sizes(2_000, 50, 20, min(args.sockets, 100), 2, [1_000], 100, 2, 2_000, 20)
        if args.smoke
        else Sizes(
            100_000,
            2_000,
            300,
            args.sockets,
            args.seconds,
            args.presences,
            500,
            args.batches,
            args.prune_presences,
            1_000,
        )
    )
    sections = args.sections.split(",")
    database = Database.create()
    try:
        django.setup()
        # Never migrate, fill or drop any database but the run's own.
        if connection.settings_dict["NAME"] != database.name:
            raise RuntimeError(f"not the bench database: {connection.settings_dict}")
        call_command("migrate", verbosity=0)
        # The deployment's app, configured from bench.settings, becomes Celery's
        # current app: the one the outbox publishes with.
        import tasks  # noqa: F401

        print(_environment(database), flush=True)
        rows: list[Row] = []
        if "socket" in sections:
            rows += heartbeat_rows(sizes)
            rows += asyncio.run(join_rows(sizes))
            rows += asyncio.run(sync_join_rows(sizes))
        if "broker" in sections:
            rows += asyncio.run(broker_rows(sizes))
        if "worker" in sections:
            rows += worker_rows(sizes, database)
        if "prune" in sections:
            from bench.prune import prune_rows

            rows += prune_rows(sizes.prune, sizes.prune_rooms)
        print_table(rows)
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "rows": [row.as_json() for row in rows if row.key],
                        "database": database.describe(),
                    }
                )
            )
    finally:
        cleanup(database)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--presences",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[10_000, 100_000],
        help="comma-separated presence counts for the worker (default %(default)s)",
    )
    parser.add_argument("--prune-presences", type=int, default=100_000)
    parser.add_argument(
        "--batches",
        type=int,
        default=20,
        help="apply_batch tasks of joins and leaves in rooms of 1,000",
    )
    parser.add_argument(
        "--sections",
        default="socket,broker,worker,prune",
        help="comma-separated sections to run (default %(default)s)",
    )
    parser.add_argument("--json", help="also write the keyed figures to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    return parser.parse_args()


# 1. Socket side: a heartbeat.


class AsyncConsumer(AsyncWebsocketConsumer):
    """A decorated async consumer; a heartbeat never reaches its handler."""

    @touch_presence
    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None
    ) -> None:
        await self.send(text_data=text_data)


class PlainAsyncConsumer(AsyncWebsocketConsumer):
    """The baseline: what a handler costs with no presence at all."""

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None
    ) -> None:
        if text_data == dispatch.HEARTBEAT_FRAME:
            return


class SyncConsumer(WebsocketConsumer):
    """A decorated sync consumer."""

    @touch_presence
    def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None
    ) -> None:
        self.send(text_data=text_data)


def consumers(cls: type[Any], count: int, layer: Any = None) -> list[Any]:
    """``count`` consumers built by hand, as Channels would, without a server."""
    built = []
    for i in range(count):
        consumer = cls()
        consumer.scope = {"type": "websocket", "user": None}
        consumer.channel_layer = layer
        consumer.channel_name = f"specific.bench-{i}!socket"
        built.append(consumer)
    return built


def heartbeat_rows(sizes: Sizes) -> list[Row]:
    """A heartbeat at the socket: coalesced, due, sync, and inline for contrast."""
    frame = dispatch.HEARTBEAT_FRAME
    rows = [Row("socket side: heartbeat (Celery mode, per call)")]

    async def run_async(cls: type[Any], calls: int, warm: bool) -> Latency:
        pool = consumers(cls, 1000)
        if warm:  # each socket touched once: the timed calls are coalesced
            for consumer in pool:
                await consumer.receive(text_data=frame)
        return await time_async(
            lambda i: pool[i % len(pool)].receive(text_data=frame), calls
        )

    def run_sync(warm: bool) -> Latency:
        pool = consumers(SyncConsumer, 1000)
        if warm:
            for consumer in pool:
                consumer.receive(text_data=frame)
        return time_sync(
            lambda i: pool[i % len(pool)].receive(text_data=frame), sizes.calls
        )

    baseline = asyncio.run(run_async(PlainAsyncConsumer, sizes.calls, False))
    rows.append(Row("  undecorated async receive (baseline)", "", baseline.text()))
    coalesced = asyncio.run(run_async(AsyncConsumer, sizes.calls, True))
    rows.append(
        heartbeat_row("  async, inside the touch interval", coalesced).keyed(
            "socket.heartbeat.async", coalesced
        )
    )
    coalesced_sync = run_sync(True)
    rows.append(
        heartbeat_row("  sync, inside the touch interval", coalesced_sync).keyed(
            "socket.heartbeat.sync", coalesced_sync
        )
    )
    # The default TOUCH_INTERVAL is derived from two unset settings, and an unset
    # setting is an AttributeError raised and caught in LazySettings each lookup.
    with setting("CHANNELS_PRESENCE_TOUCH_INTERVAL", 15):
        explicit = asyncio.run(run_async(AsyncConsumer, sizes.calls, True))
    rows.append(heartbeat_row("  async, inside, TOUCH_INTERVAL = 15 set", explicit))
    with setting("CHANNELS_PRESENCE_TOUCH_INTERVAL", 0):
        due = asyncio.run(run_async(AsyncConsumer, sizes.calls, False))
        rows.append(
            heartbeat_row("  async, due (TOUCH_INTERVAL=0): append", due).keyed(
                "socket.heartbeat.async.due", due
            )
        )
        due_sync = run_sync(False)
        rows.append(
            heartbeat_row("  sync, due (TOUCH_INTERVAL=0): append", due_sync).keyed(
                "socket.heartbeat.sync.due", due_sync
            )
        )
        outbox.default.flush()
        with setting("CHANNELS_PRESENCE_USE_CELERY", False):
            # One UPDATE per heartbeat, awaited: what 1.0.0 did, for contrast.
            inline = asyncio.run(run_async(AsyncConsumer, sizes.inline, False))
            rows.append(
                Row(
                    "  inline (no Celery), due: one UPDATE awaited", "", inline.text()
                ).keyed("socket.heartbeat.inline", inline)
            )
    return rows


def heartbeat_row(figure: str, latency: Latency) -> Row:
    return Row(
        figure,
        f"≤ {HEARTBEAT_BUDGET_US:g} µs",
        latency.text(),
        latency.median_us <= HEARTBEAT_BUDGET_US,
    )


# 2. Socket side: a join and a leave.


async def join_rows(sizes: Sizes) -> list[Row]:
    """``dispatch.ajoin`` and ``dispatch.aleave_all`` on the real channel layer."""
    layer = get_channel_layer()
    rows = [Row("socket side: join / leave (real Redis channel layer)")]
    try:
        # For scale: what the join is made of. channels_redis's group_add is a
        # ZADD then an EXPIRE, two round trips, not pipelined.
        redis_client = layer.connection(0)
        names = [f"specific.bench-{i}!scale" for i in range(sizes.joins)]
        ping = await time_async(lambda i: redis_client.ping(), sizes.joins)
        rows.append(Row("  for scale: one Redis round trip (PING)", "", ping.text()))
        add = await time_async(lambda i: layer.group_add(ROOM, names[i]), sizes.joins)
        rows.append(Row("  for scale: layer.group_add alone", "", add.text()))
        for name in names:
            await layer.group_discard(ROOM, name)
        for subscribe in (False, True):
            joins, leaves = await _join_leave(layer, sizes.joins, subscribe)
            what = "subscribe=True, 2 groups" if subscribe else "subscribe=False"
            suffix = ".subscribe" if subscribe else ""
            rows.append(
                join_row(f"  Celery mode, join ({what})", joins).keyed(
                    f"socket.join.async{suffix}", joins
                )
            )
            rows.append(
                join_row(f"  Celery mode, leave_all ({what})", leaves).keyed(
                    f"socket.leave.async{suffix}", leaves
                )
            )
        outbox.default.flush()
        with setting("CHANNELS_PRESENCE_USE_CELERY", False):
            joins, leaves = await _join_leave(layer, sizes.inline, False)
        rows.append(
            Row("  inline on the database, join", "", joins.text()).keyed(
                "socket.join.inline", joins
            )
        )
        rows.append(
            Row("  inline on the database, leave_all", "", leaves.text()).keyed(
                "socket.leave.inline", leaves
            )
        )
    finally:
        await layer.close_pools()
    return rows


async def _join_leave(
    layer: BaseChannelLayer, count: int, subscribe: bool
) -> tuple[Latency, Latency]:
    """Each socket joins the room, then leaves it: the time of each, per call."""
    pool = consumers(AsyncConsumer, count, layer)
    await dispatch.ajoin(pool[0], ROOM, None, subscribe=subscribe)  # connect
    await dispatch.aleave_all(pool[0])
    clock = time.perf_counter_ns
    joins, leaves = [0] * count, [0] * count
    gc.collect()
    for i, consumer in enumerate(pool):
        start = clock()
        await dispatch.ajoin(consumer, ROOM, None, subscribe=subscribe)
        joins[i] = clock() - start
        start = clock()
        await dispatch.aleave_all(consumer)
        leaves[i] = clock() - start
    return Latency(joins), Latency(leaves)


async def sync_join_rows(sizes: Sizes) -> list[Row]:
    """The sync consumer's join and leave (``dispatch.join``, ``leave_all``).

    Called as Channels calls a sync consumer's handlers, in a thread through
    ``sync_to_async`` from the event loop (the hop is in the figure, as it is
    for 1.0.0's sync ``Room.objects.add`` and decorated disconnect).
    """
    layer = get_channel_layer()
    pool = consumers(SyncConsumer, sizes.joins, layer)
    clock = time.perf_counter_ns
    joins, leaves = [0] * len(pool), [0] * len(pool)

    def join(consumer: Any) -> None:
        dispatch.join(consumer, ROOM, None, subscribe=False)

    await sync_to_async(join)(pool[0])  # connect
    await sync_to_async(dispatch.leave_all)(pool[0])
    gc.collect()
    try:
        for i, consumer in enumerate(pool):
            start = clock()
            await sync_to_async(join)(consumer)
            joins[i] = clock() - start
            start = clock()
            await sync_to_async(dispatch.leave_all)(consumer)
            leaves[i] = clock() - start
    finally:
        await layer.close_pools()
    outbox.default.flush()
    joined, left = Latency(joins), Latency(leaves)
    return [
        join_row("  Celery mode, sync consumer, join", joined).keyed(
            "socket.join.sync", joined
        ),
        join_row("  Celery mode, sync consumer, leave_all", left).keyed(
            "socket.leave.sync", left
        ),
    ]


def join_row(figure: str, latency: Latency) -> Row:
    return Row(
        figure,
        f"≤ {JOIN_BUDGET_US:g} µs",
        latency.text(),
        latency.median_us <= JOIN_BUDGET_US,
    )


# 3. Broker load.


async def broker_rows(sizes: Sizes) -> list[Row]:
    """Sockets heartbeating once a second; the tasks counted at the broker."""
    rows = [
        Row(
            f"broker: {sizes.sockets} sockets x 1 heartbeat/s for {sizes.seconds:g} s, "
            f"FLUSH_INTERVAL {conf.FLUSH_INTERVAL:g} s"
        )
    ]
    broker = Broker()
    try:
        for interval, label, key in (
            (None, "default: MAX_AGE/4 = 15 s", "broker.default"),
            (0, "0", "broker.interval0"),
        ):
            with setting("CHANNELS_PRESENCE_TOUCH_INTERVAL", interval):
                rows.extend(await _heartbeats(sizes, broker, label, key))
    finally:
        broker.close()
    return rows


async def _heartbeats(sizes: Sizes, broker: Broker, label: str, key: str) -> list[Row]:
    pool = consumers(AsyncConsumer, sizes.sockets)
    outbox.default.flush()
    broker.purge()
    sent_before = outbox.default.sent
    # Each second is cut in ten slices; each slice, a tenth of the sockets beat.
    slices = 10
    busy = 0
    start = time.monotonic()
    ticks = int(sizes.seconds * slices)
    for tick in range(ticks):
        began = time.perf_counter_ns()
        for consumer in pool[tick % slices :: slices]:
            await consumer.receive(text_data=dispatch.HEARTBEAT_FRAME)
        busy += time.perf_counter_ns() - began
        await asyncio.sleep(max(start + (tick + 1) / slices - time.monotonic(), 0))
    elapsed = time.monotonic() - start
    messages = broker.messages()
    sent = outbox.default.sent - sent_before
    touches = [m for m in messages if m.task == outbox.TOUCH_TASK]
    names = sum(m.names for m in touches)
    per_flush = len(touches) / (elapsed / conf.FLUSH_INTERVAL)
    volume = sum(m.size for m in messages)
    return [
        Row(
            f"  TOUCH_INTERVAL {label}: touch tasks at the broker",
            f"≤ {TOUCH_TASKS_PER_FLUSH} per flush interval",
            f"{len(touches)} in {elapsed:.1f} s = {len(touches) / elapsed:.2f}/s "
            f"({per_flush:.2f} per flush interval)",
            per_flush <= TOUCH_TASKS_PER_FLUSH,
        ).figure_of(f"{key}.touch_tasks_per_flush", per_flush, "tasks/flush"),
        Row(
            "    messages, bytes, socket touches carried",
            "",
            f"{len(messages) / elapsed:.2f} msg/s (outbox sent {sent}), "
            f"{volume / elapsed / 1024:.1f} KiB/s, {names} names "
            f"({names / max(len(touches), 1):.0f}/task)",
        ).figure_of(f"{key}.messages_per_s", len(messages) / elapsed, "msg/s"),
        Row(
            "    socket-side CPU for the heartbeats",
            "",
            f"{busy / 1e9 / elapsed * 100:.2f} % of one core "
            f"({busy / 1e3 / max(ticks * len(pool) / slices, 1):.2f} µs/heartbeat)",
        ),
    ]


@dataclass
class Message:
    """A task message as it sits in the broker's queue."""

    task: str
    names: int  # how many sockets a touch_presences carries
    size: int  # bytes


class Broker:
    """The run's Celery queue on the Redis broker, read directly.

    kombu's Redis transport LPUSHes each message, as JSON, to a list named like
    the queue (with the global key prefix): with no worker consuming, the list
    holds everything published.
    """

    def __init__(self) -> None:
        self.client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
        prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"]
        self.queue = f"{prefix}{settings.CELERY_TASK_DEFAULT_QUEUE}"

    def purge(self) -> None:
        self.client.delete(self.queue)

    def messages(self) -> list[Message]:
        found = []
        raws = cast(list[bytes], self.client.lrange(self.queue, 0, -1))
        for raw in raws:
            envelope = json.loads(raw)
            body = json.loads(base64.b64decode(envelope["body"]))
            args = body[0]
            names = len(args[0]) if args and isinstance(args[0], list) else 0
            found.append(Message(envelope["headers"]["task"], names, len(raw)))
        return found

    def close(self) -> None:
        self.client.close()


# 4. The worker.


def worker_rows(sizes: Sizes, database: Database) -> list[Row]:
    """touch_presences on N presences: in this process, then through a worker."""
    from channels_presence.models import Presence

    rows = [Row(f"worker: touch_presences on {database.vendor}")]
    outbox.default.flush()
    Broker().purge()
    with celery_worker() as worker:
        for count in sizes.presences:
            names = make_presences(count)
            checked = time.perf_counter()
            validation.channel_names(names)
            checked = time.perf_counter() - checked
            # As an outbox sends them: the rooms each socket believes it is
            # in (a mixin's one room), each socket once per MAX_AGE, so a
            # quarter of them at the default TOUCH_INTERVAL; and the sockets
            # due a group refresh (each once per quarter of group_expiry,
            # six hours: none here).
            touch = {"rooms": _believed(names[::4]), "refresh": []}
            times = []
            for _ in range(3):
                began = time.perf_counter()
                updated = touch_presences(names, time.time(), **touch)
                times.append(time.perf_counter() - began)
                if updated != count:
                    raise RuntimeError(f"touched {updated} presences, not {count}")
            body = sorted(times)[1]
            rows.append(
                worker_row(
                    f"  {count:,} presences: task body in-process (median of 3)",
                    count,
                    body,
                    f"; of which checking the names {checked * 1e3:.0f} ms",
                )
            )
            began = time.perf_counter()
            touch_presences(names, time.time(), rooms=_believed(names))
            seconds = time.perf_counter() - began
            rows.append(
                Row(
                    f"  {count:,} presences, every one due its rooms' check and "
                    "its group refresh",
                    "(the worst case)",
                    f"{count / seconds:,.0f}/s ({seconds * 1e3:.0f} ms)",
                )
            )
            at = time.time()
            began = time.perf_counter()
            result = worker.app.send_task(
                outbox.TOUCH_TASK, args=(names,), kwargs={"at": at, **touch}
            )
            published = time.perf_counter() - began
            seen, runtime, updated = worker.wait_for(result.id)
            total = seen - began
            applied = Presence.objects.filter(last_seen__gte=_moment(at)).count()
            if updated != count or applied != count:
                raise RuntimeError(
                    f"the worker touched {updated} ({applied}) of {count}"
                )
            rows.append(
                worker_row(
                    f"  {count:,} presences: end to end via celery worker",
                    count,
                    total,
                    f"; publish {published * 1e3:.0f} ms, worker's task "
                    f"{runtime * 1e3:.0f} ms = {count / runtime:,.0f}/s",
                ).figure_of(f"worker.touch.{count}", count / runtime, "/s")
            )
            rows.append(_worker_joins(worker, count, sizes.worker_joins))
        rows += worker_batch_rows(worker, sizes.batches)
    return rows


def _worker_joins(worker: Worker, present: int, count: int) -> Row:
    """``count`` joins in one ``apply_batch`` task, as an outbox sends them.

    Applied as one change set per room (of the 100), into rooms of
    ``present / 100`` presences: one transaction, one group add pipeline,
    each room's state read once for its joiners, one diff per room.
    """
    from channels_presence.models import Presence

    at = time.time()
    calls = [
        [
            "channels_presence.tasks.add_presence",
            [f"bench-room-{i % 100}", f"specific.bench-{i}!join", None, at, True],
            {},
        ]
        for i in range(count)
    ]
    result = worker.app.send_task(outbox.BATCH_TASK, args=(calls,), kwargs={})
    _, runtime, _ = worker.wait_for(result.id)
    joined = Presence.objects.filter(channel_name__endswith="!join").count()
    if joined != count:
        raise RuntimeError(f"the worker applied {joined} of {count} joins")
    Presence.objects.filter(channel_name__endswith="!join").delete()
    rate = count / runtime
    return Row(
        f"  {count:,} joins into rooms of {present // 100:,}: via celery worker",
        "",
        f"{rate:,.0f}/s (worker's task {runtime * 1e3:.0f} ms; one change set "
        "per room: transaction, group adds, states, diffs)",
    ).figure_of(f"worker.joins.{present}", rate, "/s")


#: Rooms, and presences in each, for the joins and leaves applied in batches.
BATCH_ROOMS = 10
BATCH_ROOM_SIZE = 1_000
#: Calls in one apply_batch task: the outbox's most.
BATCH_CALLS = outbox.BATCH_SIZE


def worker_batch_rows(worker: Worker, batches: int) -> list[Row]:
    """Joins and leaves applied per second, in batches, in rooms of 1,000.

    ``batches`` apply_batch tasks of BATCH_CALLS calls each, half joins of new
    sockets and half leaves of present ones, over BATCH_ROOMS rooms of
    BATCH_ROOM_SIZE subscribed presences (so each batch reads each room's
    state once for its joiners, and sends each room one diff). The rate is
    per worker process: calls over the sum of the tasks' run times.
    """
    from channels_presence import operations
    from channels_presence.models import Presence

    rooms = [f"bench-big-{n}" for n in range(BATCH_ROOMS)]
    present: deque[str] = deque()
    for start in range(0, BATCH_ROOMS * BATCH_ROOM_SIZE, 1_000):
        joins = []
        for n in range(start, start + 1_000):
            socket = f"specific.bench-big!{n}"
            joins.append(
                operations.checked_join(
                    rooms[n % BATCH_ROOMS], socket, None, None, True, "", None
                )
            )
            present.append(socket)
        operations.apply(joins)
    # The first socket is in the first room.
    rows = room_cost_rows(rooms[0], present.popleft())
    at = time.time()
    sent: list[str] = []
    began = time.perf_counter()
    for batch in range(batches):
        calls: list[list[Any]] = []
        for n in range(BATCH_CALLS // 2):
            socket = f"specific.bench-new!{batch}-{n}"
            room = rooms[(batch + n) % BATCH_ROOMS]
            calls.append(
                [
                    "channels_presence.tasks.add_presence",
                    [room, socket, None],
                    {"at": at + batch, "subscribe": True},
                ]
            )
            # The oldest socket leaves as the new one joins: rooms stay at
            # their size, however many batches.
            calls.append(
                [
                    "channels_presence.tasks.leave_all",
                    [present.popleft()],
                    {"at": at + batch},
                ]
            )
            present.append(socket)
        result = worker.app.send_task(outbox.BATCH_TASK, args=(calls,), kwargs={})
        sent.append(result.id)
    done = [worker.wait_for(task_id) for task_id in sent]
    wall = max(seen for seen, _, _ in done) - began
    busy = sum(runtime for _, runtime, _ in done)
    count = batches * BATCH_CALLS
    kept = Presence.objects.filter(room__channel_name__in=rooms).count()
    if kept != BATCH_ROOMS * BATCH_ROOM_SIZE:
        raise RuntimeError(f"{kept} presences in the rooms after the batches")
    rate = count / busy
    return [
        *rows,
        Row(
            f"  joins and leaves in batches of {BATCH_CALLS}, rooms of "
            f"{BATCH_ROOM_SIZE:,}: via celery worker",
            f"≥ {BATCH_BUDGET_PER_S:,}/s",
            f"{rate:,.0f}/s ({count:,} calls in {batches} tasks: "
            f"{busy * 1e3:,.0f} ms of task time, {wall * 1e3:,.0f} ms wall)",
            rate >= BATCH_BUDGET_PER_S,
        ).figure_of(f"worker.batch.{BATCH_ROOM_SIZE}", rate, "/s"),
    ]


def room_cost_rows(room: str, leaving: str) -> list[Row]:
    """What one join, and one leave, cost a room of BATCH_ROOM_SIZE sockets.

    Applied in this process; a channel in the room's events group stands for
    its sockets (those of one server process share one Redis message). The
    joiner gets the state; every socket of the room gets the diff.
    """
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from channels_presence import broadcast, operations
    from channels_presence.groups import events_group
    from channels_presence.testing import channel_messages

    layer: Any = get_channel_layer()
    watcher = async_to_sync(layer.new_channel)()
    joiner = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(events_group(room), watcher)

    def received(channel: str) -> list[dict[str, Any]]:
        # Diffs held by the throttle (the setup's joins were just sent) go now.
        broadcast.throttle.flush()
        return channel_messages(channel, layer)

    # A quiet interval first: the throttle would merge the leave with the
    # setup's last change sets, sent within its interval.
    received(watcher)
    time.sleep(conf.EVENT_INTERVAL * 2)
    received(watcher)
    # Leave first, so that the join brings the room back to its size.
    operations.leave(room, leaving)
    (leave,) = received(watcher)
    operations.join(room, joiner, subscribe=True)
    (diff,) = received(watcher)
    # The joiner gets the state, which holds its join, instead of the diff.
    (state,) = received(joiner)
    async_to_sync(layer.group_discard)(events_group(room), watcher)
    diff_bytes = len(json.dumps(diff))
    leave_bytes = len(json.dumps(leave))
    state_bytes = len(json.dumps(state))
    sockets = state["counts"]["sockets"]
    return [
        Row(
            f"  a join in a room of {sockets:,}: frames and bytes",
            "",
            f"1 diff of {diff_bytes:,} B to each of the {sockets - 1:,} other "
            f"sockets ({diff_bytes * (sockets - 1) / 1e3:,.0f} kB in all, one "
            "Redis message per server process) + 1 state of "
            f"{state_bytes / 1e3:,.0f} kB to the joiner, instead of the diff",
        ).figure_of("room1000.join.diff_bytes", diff_bytes, "B"),
        Row(
            f"  a leave in a room of {sockets:,}: frames and bytes",
            "",
            f"1 diff of {leave_bytes:,} B to each of the {sockets - 1:,} sockets "
            f"({leave_bytes * (sockets - 1) / 1e3:,.0f} kB in all)",
        ).figure_of("room1000.leave.diff_bytes", leave_bytes, "B"),
    ]


#: DESIGN's budget: joins and leaves applied per second per worker process.
BATCH_BUDGET_PER_S = 5_000


def worker_row(figure: str, count: int, seconds: float, detail: str) -> Row:
    rate = count / seconds
    return Row(
        figure,
        f"≥ {WORKER_BUDGET_PER_S:,}/s",
        f"{rate:,.0f}/s ({seconds * 1e3:.0f} ms{detail})",
        rate >= WORKER_BUDGET_PER_S,
    )


def make_presences(count: int) -> list[str]:
    """Exactly ``count`` presences, seen a minute ago, in 100 rooms; their names."""
    from channels_presence.models import Presence, Room

    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {Presence._meta.db_table}")
    Room.objects.bulk_create(
        [Room(channel_name=f"bench-room-{i}") for i in range(100)],
        ignore_conflicts=True,
    )
    rooms = list(Room.objects.filter(channel_name__startswith="bench-room-"))
    seen = _moment(time.time() - 60)
    names = [f"specific.bench-{i}!touch" for i in range(count)]
    Presence.objects.bulk_create(
        [
            Presence(room=rooms[i % len(rooms)], channel_name=name, last_seen=seen)
            for i, name in enumerate(names)
        ],
        batch_size=5_000,
    )
    if connection.vendor == "postgresql":
        # As autovacuum would have by now on a table that lives this long.
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {Presence._meta.db_table}")
    return names


def _believed(names: list[str]) -> dict[str, list[str]]:
    """The room each socket of ``names`` is in, as it believes (rightly)."""
    from channels_presence.models import Presence

    wanted = set(names)
    rows = Presence.objects.values_list("channel_name", "room__channel_name")
    return {name: [room] for name, room in rows if name in wanted}


def _moment(at: float) -> Any:
    from channels_presence import clock

    return clock.from_timestamp(at)


class Worker:
    """A ``celery -A tasks worker`` subprocess, and the tasks its log says it ran."""

    DONE = re.compile(
        r"\[(?P<id>[0-9a-f-]+)\] succeeded in (?P<seconds>[0-9.e-]+)s: "
        r"(?P<result>\d+|None)"
    )

    FAILED = re.compile(r"\] (raised unexpected|retry: )")

    def __init__(self) -> None:
        from celery import current_app

        self.app = current_app
        self.lines: list[str] = []
        self.done: dict[str, tuple[float, float, int]] = {}
        self.failed = False
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tasks",
                "worker",
                "-l",
                "info",
                "-P",
                "solo",
                "-n",
                f"bench-{settings.RUN}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._wait(lambda: any(" ready." in line for line in self.lines), "start")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            seen = time.perf_counter()
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                done = self.DONE.search(line)
                if done:
                    self.done[done["id"]] = (
                        seen,
                        float(done["seconds"]),
                        int(done["result"]) if done["result"] != "None" else 0,
                    )
                elif self.FAILED.search(line):
                    self.failed = True
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        with self._changed:
            if (
                not self._changed.wait_for(
                    lambda: ready() or self.failed or self.process.poll() is not None,
                    WORKER_TIMEOUT,
                )
                or not ready()
            ):
                raise RuntimeError(
                    f"celery worker did not {what}:\n" + "\n".join(self.lines)
                )

    def wait_for(self, task_id: str) -> tuple[float, float, int]:
        """When the log said the task succeeded, its runtime, and its result."""
        self._wait(lambda: task_id in self.done, f"run task {task_id}")
        return self.done[task_id]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self._reader.join(5)


@contextmanager
def celery_worker() -> Iterator[Worker]:
    """A started worker on the run's queue and database; stopped afterwards."""
    worker = Worker()
    try:
        # Its first task connects to the database: not part of any figure.
        warm = worker.app.send_task(outbox.TOUCH_TASK, args=([],), kwargs={})
        worker.wait_for(warm.id)
        yield worker
    finally:
        worker.stop()


# Measuring, and the table.


class Latency:
    """Per-call times, in nanoseconds."""

    def __init__(self, samples: list[int]) -> None:
        ordered = sorted(samples)
        self.count = len(ordered)
        self.median_us = ordered[len(ordered) // 2] / 1e3
        self.p99_us = ordered[min(int(len(ordered) * 0.99), len(ordered) - 1)] / 1e3

    def text(self) -> str:
        return (
            f"median {_us(self.median_us)}, p99 {_us(self.p99_us)} (n={self.count:,})"
        )


def _us(value: float) -> str:
    return f"{value:.2f} µs" if value < 100 else f"{value:,.0f} µs"


async def time_async(call: Callable[[int], Awaitable[object]], count: int) -> Latency:
    """Await ``call(i)`` for each i, timing each call."""
    clock = time.perf_counter_ns
    samples = [0] * count
    gc.collect()
    for i in range(count):
        start = clock()
        await call(i)
        samples[i] = clock() - start
    return Latency(samples)


def time_sync(call: Callable[[int], object], count: int) -> Latency:
    """Call ``call(i)`` for each i, timing each call."""
    clock = time.perf_counter_ns
    samples = [0] * count
    gc.collect()
    for i in range(count):
        start = clock()
        call(i)
        samples[i] = clock() - start
    return Latency(samples)


@contextmanager
def setting(name: str, value: object) -> Iterator[None]:
    """Set a Django setting for the block (None: unset), as a deployment would.

    Not ``override_settings``: its settings holder makes every lookup slower,
    and lookups are a good part of what a coalesced heartbeat costs.
    """
    missing = object()
    before = getattr(settings, name, missing)
    if value is None:
        if hasattr(settings, name):
            delattr(settings, name)
    else:
        setattr(settings, name, value)
    try:
        yield
    finally:
        if before is missing:
            if hasattr(settings, name):
                delattr(settings, name)
        else:
            setattr(settings, name, before)


def print_table(rows: list[Row]) -> None:
    """The figures, aligned; a heading row has no budget and no measurement."""
    header = Row("figure", "budget", "measured")
    widths = [
        max(len(row.figure) for row in [header, *rows]),
        max(len(row.budget) for row in [header, *rows]),
        max(len(row.measured) for row in [header, *rows]),
    ]

    def line(row: Row, holds: str) -> str:
        cells = (row.figure, row.budget, row.measured)
        text = "  ".join(
            cell.ljust(width) for cell, width in zip(cells, widths, strict=True)
        )
        return f"{text}  {holds}".rstrip()

    print()
    print(line(header, "holds?"))
    print("-" * (sum(widths) + 14))
    for row in rows:
        holds = "" if row.holds is None else ("yes" if row.holds else "NO")
        print(line(row, holds))


def _environment(database: Database) -> str:
    packages = ["Django", "celery", "kombu", "channels", "channels_redis", "redis"]
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        redis_version = cast(dict[str, Any], client.info("server"))["redis_version"]
    finally:
        client.close()
    return (
        f"Python {platform.python_version()}, "
        + ", ".join(f"{name} {version(name)}" for name in packages)
        + f", psycopg {version('psycopg')}"
        + f"; {os.cpu_count()} CPUs ({platform.machine()})"
        + f"\nRedis {redis_version}; database: {database.describe()}"
        + f"; run {settings.RUN}"
    )


# Setting up and cleaning up.


@dataclass
class Database:
    """The run's own database: created before Django starts, dropped at the end."""

    vendor: str
    name: str
    url: str

    @classmethod
    def create(cls) -> Database:
        from bench import settings as bench

        name = str(bench.DATABASES["default"]["NAME"])
        if bench.DATABASE_URL == "sqlite":
            return cls("sqlite", name, "sqlite")
        with cls._server(bench.DATABASE_URL) as server:
            server.execute(f'CREATE DATABASE "{bench.DATABASE_NAME}"')
        return cls("postgresql", name, bench.DATABASE_URL)

    @staticmethod
    def _server(url: str) -> psycopg.Connection[Any]:
        from bench import settings as bench

        server = bench.database(url, None)
        return psycopg.connect(
            dbname=str(server["NAME"]),
            user=str(server["USER"]),
            password=str(server["PASSWORD"]),
            host=str(server["HOST"]),
            port=str(server["PORT"]) or None,
            autocommit=True,
        )

    def describe(self) -> str:
        if self.vendor == "sqlite":
            return f"SQLite {self.name}"
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            (server_version,) = cursor.fetchone() or ("?",)
        return f"PostgreSQL {server_version}, database {self.name}"

    def drop(self) -> None:
        connections.close_all()
        if self.vendor == "sqlite":
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(self.name + suffix).unlink(missing_ok=True)
            return
        with self._server(self.url) as server:
            server.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def cleanup(database: Database) -> None:
    """Send what the outbox holds, delete the run's Redis keys, drop the database."""
    from bench import settings as bench
    from bench.e2e import delete_keys

    outbox.default.close()
    delete_keys(bench.KEY_PREFIX)
    database.drop()


if __name__ == "__main__":
    main()
