"""A worker killed with SIGKILL in the middle of a batch: nothing lost, nothing doubled.

Joins and leaves are acknowledged late, so the broker still holds the message of
a batch whose worker died mid-way; kombu's Redis transport gives it to another
worker once it has been unacknowledged for ``visibility_timeout`` (shortened
here, see tests/settings.py). A batch is applied in one transaction, so the
dead worker applied none of it, and the second worker applies it all, once:
each socket's join is announced once, in the rooms' diffs, which a listener in
every room's events group reduces.

To kill the first worker inside the batch, and not before or after it, the test
holds what the batch's transaction waits for (PostgreSQL: the advisory lock
every socket's lock is held under; SQLite: a write transaction), sends the
batch, and kills the worker once it has taken it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
import pytest
import redis
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection

from channels_presence import locks, protocol
from channels_presence.groups import events_group
from channels_presence.outbox import BATCH_TASK
from channels_presence.tasks import BATCHABLE
from tasks import app as celery_app
from tests.helpers import celery_mode, group_members, wait_until
from tests.test_pipeline import drained, rows, rows_are
from tests.workers import celery_worker

pytestmark = pytest.mark.django_db(transaction=True)

ADD = "channels_presence.tasks.add_presence"
LEAVE_ALL = "channels_presence.tasks.leave_all"
ROOMS = [f"crash-{n}" for n in range(5)]
#: Sockets that join, and of them those that leave again, in one batch.
JOINING = 300
LEAVING = 50
#: Seconds the second worker waits before it takes a dead worker's batch.
VISIBILITY_TIMEOUT = 2
#: Seconds within which presence converges once the second worker starts.
CONVERGENCE = 30


def socket(n: int) -> str:
    return f"specific.crash!{n}"


def batch(start: float) -> tuple[list[list[Any]], set[tuple[str, str]]]:
    """The batch's calls, as the outbox sends them, and the rows it leaves."""
    calls: list[list[Any]] = [
        [
            ADD,
            [ROOMS[n % len(ROOMS)], socket(n), None],
            {"at": start + n * 1e-3, "subscribe": True},
        ]
        for n in range(JOINING)
    ]
    calls += [
        [LEAVE_ALL, [socket(n)], {"at": start + 1 + n * 1e-3}] for n in range(LEAVING)
    ]
    assert {name for name, _, _ in calls} <= set(BATCHABLE)
    expected = {(ROOMS[n % len(ROOMS)], socket(n)) for n in range(LEAVING, JOINING)}
    return calls, expected


def unacknowledged() -> int:
    """How many messages of this run the broker holds for a worker, unacknowledged."""
    prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"]
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    try:
        return int(client.hlen(f"{prefix}unacked"))  # type: ignore[arg-type]
    finally:
        client.close()


@contextmanager
def writers_blocked() -> Iterator[None]:
    """Hold what a worker's next join must wait for, until the block ends."""
    if connection.vendor == "postgresql":
        params = connection.get_connection_params()
        with psycopg.connect(
            dbname=params["dbname"],
            user=params.get("user") or None,
            host=params.get("host") or None,
            port=params.get("port") or None,
            autocommit=True,
        ) as blocker:
            blocker.execute("SELECT pg_advisory_lock(%s)", [locks.EVERY_SOCKET])
            yield
        return
    writer = sqlite3.connect(connection.settings_dict["NAME"], timeout=20)
    try:
        writer.execute("BEGIN IMMEDIATE")
        yield
        writer.rollback()
    finally:
        writer.close()


@asynccontextmanager
async def listening(rooms: list[str]) -> AsyncIterator[list[dict[str, Any]]]:
    """Every presence event of ``rooms``, as a socket subscribed to them gets them."""
    layer: Any = get_channel_layer()
    channel = await layer.new_channel()
    for room in rooms:
        await layer.group_add(events_group(room), channel)
    events: list[dict[str, Any]] = []

    async def receive() -> None:
        while True:
            events.append(await layer.receive(channel))

    # Drained as they come: a channel holds at most `capacity` messages.
    receiver = asyncio.create_task(receive())
    try:
        yield events
    finally:
        receiver.cancel()
        for room in rooms:
            await layer.group_discard(events_group(room), channel)


def changes(events: list[dict[str, Any]], kind: str) -> Counter[str]:
    """How many diffs announced each socket in ``kind`` ("joins" or "leaves")."""
    sockets = {
        protocol.presence_ref(
            room, socket(n), protocol.visitor_key(room, socket(n))
        ): socket(n)
        for n in range(JOINING)
        for room in ROOMS
    }
    return Counter(
        sockets[meta["ref"]]
        for event in events
        if event["type"] == protocol.DIFF
        for member in event[kind].values()
        for meta in member["metas"]
    )


async def test_a_batch_whose_worker_is_killed_midway_is_applied_once_in_effect() -> (
    None
):
    calls, expected = batch(time.time())
    with celery_mode():
        async with listening(ROOMS) as events:
            with celery_worker("doomed") as doomed, writers_blocked():
                celery_app.send_task(BATCH_TASK, args=[calls])
                await wait_until(
                    lambda: f"{BATCH_TASK}[" in doomed.output(),
                    seconds=CONVERGENCE,
                )
                # Long enough for it to be waiting inside the batch.
                await asyncio.sleep(1)
                doomed.kill()
                killed_at = time.monotonic()
            assert await rows() == set(), "the killed worker's batch was committed"
            assert unacknowledged() == 1, "the batch was not kept for redelivery"

            with celery_worker(
                "heir",
                CHANNELS_PRESENCE_TEST_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT),
            ) as heir:
                try:
                    await wait_until(lambda: rows_are(expected), seconds=CONVERGENCE)
                except TimeoutError:
                    raise AssertionError(
                        f"{len(await rows())} presences, {len(expected)} expected"
                    ) from None
                converged = time.monotonic() - killed_at
                await drained()
                # The diffs of the batch are on their way.
                await wait_until(
                    lambda: sum(changes(events, "joins").values()) >= len(expected),
                    seconds=10,
                )
                await asyncio.sleep(0.5)
                assert f"{BATCH_TASK}[" in heir.output()
        print(f"converged {converged:.1f} s after the kill")

        assert await rows() == expected
        # Each socket that stayed was announced once; those that joined and
        # left within the batch never were (the room never had them).
        assert changes(events, "joins") == Counter(
            socket(n) for n in range(LEAVING, JOINING)
        )
        assert changes(events, "leaves") == Counter()
        # Every row's socket is in its room's groups, and nothing else is.
        for room in ROOMS:
            present = {name for where, name in expected if where == room}
            assert group_members(room) == present
            assert group_members(events_group(room)) == present
        assert unacknowledged() == 0
