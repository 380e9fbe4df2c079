"""PgBouncer in transaction mode between the workers and PostgreSQL.

A deployment with many workers puts PgBouncer in front of PostgreSQL, and in
transaction mode a client holds a server connection only for the length of a
transaction: anything a client leaves on the session (a session advisory lock,
a prepared statement, a cursor held open) would reach another client. The
operations lock each socket with *transaction* advisory locks, which live and
die with the transaction, so they hold through it: these tests show it with
Debian's ``pgbouncer`` started on a port of its own in front of the run's
PostgreSQL, and a real worker, three processes on two server connections.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext

from channels_presence import outbox
from channels_presence.models import Presence, Room
from tests.helpers import celery_mode, group_members, wait_until
from tests.servers import ThrowawayPgBouncer, throwaway_pgbouncer
from tests.workers import celery_worker

pytestmark = pytest.mark.django_db(transaction=True)

#: Server connections the bouncer opens, for more clients than that.
POOL_SIZE = 2
#: Worker processes (prefork children), each a client of the bouncer.
CONCURRENCY = 3
#: Seconds a worker may take to apply what it was sent.
WORKER_TIMEOUT = 60

ADD_PRESENCE = "channels_presence.tasks.add_presence"
REMOVE_PRESENCE = "channels_presence.tasks.remove_presence"
LEAVE_ALL = "channels_presence.tasks.leave_all"


@pytest.fixture
def bouncer() -> Iterator[ThrowawayPgBouncer]:
    """PgBouncer in transaction mode in front of the test database's server."""
    if connection.vendor != "postgresql":
        pytest.skip("PgBouncer is for PostgreSQL: runs in the PostgreSQL pass")
    if shutil.which("pgbouncer") is None:
        pytest.skip(
            "Debian's pgbouncer is not installed (python3 dev.py test installs it "
            "under CI=true)"
        )
    server = connection.settings_dict
    with throwaway_pgbouncer(
        server["HOST"] or "127.0.0.1",
        int(server["PORT"] or 5432),
        server["USER"],
        password=server["PASSWORD"] or "",
        pool_size=POOL_SIZE,
    ) as running:
        yield running


def _behind(bouncer: ThrowawayPgBouncer) -> dict[str, Any]:
    """The environment of a worker that reaches the test database through it."""
    name = str(connection.settings_dict["NAME"])
    return {
        "DATABASE_URL": bouncer.url(name),
        "CHANNELS_PRESENCE_TEST_DATABASE": name,
        "CHANNELS_PRESENCE_TEST_PGBOUNCER": "1",
    }


def _direct() -> psycopg.Connection[Any]:
    """A connection to the test database on the server itself, not through it."""
    server = connection.settings_dict
    return psycopg.connect(
        host=server["HOST"] or "127.0.0.1",
        port=int(server["PORT"] or 5432),
        user=server["USER"],
        password=server["PASSWORD"] or None,
        dbname=server["NAME"],
        autocommit=True,
    )


def _advisory_locks(*, granted: bool) -> int:
    with _direct() as direct:
        # pg_locks is the whole server's: other databases' tests take
        # advisory locks too.
        row = direct.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND granted = %s AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())",
            [granted],
        ).fetchone()
    return int(row[0]) if row else 0


async def _a_lock_is_awaited() -> bool:
    return await asyncio.to_thread(_advisory_locks, granted=False) >= 1


def _locks_of_a_join(room: str, channel_name: str) -> list[str]:
    """The advisory-lock statements that a join of the socket runs, as run."""
    try:
        with CaptureQueriesContext(connection) as queries:
            Room.objects.add(room, channel_name)
        return [q["sql"] for q in queries if "pg_advisory" in q["sql"]]
    finally:
        connection.close()


def _sockets(room: str | None = None) -> set[str]:
    presences = Presence.objects.all()
    if room is not None:
        presences = presences.filter(room__channel_name=room)
    try:
        return set(presences.values_list("channel_name", flat=True))
    finally:
        connection.close()


async def test_a_sockets_lock_held_through_pgbouncer_holds_off_the_worker(
    bouncer: ThrowawayPgBouncer,
) -> None:
    socket = "test.pgbouncer!held"
    with (
        celery_mode(),
        celery_worker("pgbouncer", concurrency=CONCURRENCY, **_behind(bouncer)),
    ):
        # Whatever locks a join of the socket takes, its leave must wait for.
        locks = await asyncio.to_thread(_locks_of_a_join, "lobby", socket)
        assert locks, "a join took no advisory lock"
        name = str(connection.settings_dict["NAME"])
        holder = await psycopg.AsyncConnection.connect(bouncer.dsn(name))
        try:
            async with holder.transaction():
                for statement in locks:
                    await holder.execute(statement)
                outbox.default.send(LEAVE_ALL, socket, at=time.time())
                # The worker's transaction, on the bouncer's other server
                # connection, waits on the lock, and writes nothing meanwhile.
                await wait_until(_a_lock_is_awaited, seconds=WORKER_TIMEOUT)
                await asyncio.sleep(0.5)
                assert await asyncio.to_thread(_sockets) == {socket}
        finally:
            await holder.close()
        # The holder's transaction is over: its locks went with it.

        async def left() -> bool:
            gone = await asyncio.to_thread(_sockets) == set()
            return gone and group_members("lobby") == set()

        await wait_until(left, seconds=WORKER_TIMEOUT)
    assert await asyncio.to_thread(_advisory_locks, granted=True) == 0


#: Sockets, and the rooms they are spread over.
SOCKETS = 200
ROOMS = [f"room{i}" for i in range(10)]


async def test_batches_applied_through_pgbouncer_lose_nothing(
    bouncer: ThrowawayPgBouncer,
) -> None:
    # Each socket joins, leaves and, one in two, joins again; the tasks are
    # sent shuffled, in many small batches that three processes apply at
    # once: the end must be what the sockets did, in their order.
    start = time.time()
    calls: list[tuple[str, str, str, float]] = []
    expected: dict[str, set[str]] = {room: set() for room in ROOMS}
    for number in range(SOCKETS):
        room, socket = ROOMS[number % len(ROOMS)], f"test.pgbouncer!{number}"
        at = start + number * 1e-3
        calls += [
            (ADD_PRESENCE, room, socket, at),
            (REMOVE_PRESENCE, room, socket, at + 1),
        ]
        if number % 2 == 0:
            calls.append((ADD_PRESENCE, room, socket, at + 2))
            expected[room].add(socket)
    random.Random(15).shuffle(calls)

    most_held = 0
    done = threading.Event()

    def watch_locks() -> None:
        nonlocal most_held
        while not done.is_set():
            most_held = max(most_held, _advisory_locks(granted=True))
            time.sleep(0.01)

    with (
        celery_mode(),
        celery_worker("pgbouncer", concurrency=CONCURRENCY, **_behind(bouncer)),
    ):
        watcher = threading.Thread(target=watch_locks, daemon=True)
        watcher.start()
        began = time.monotonic()
        try:
            for first in range(0, len(calls), 20):
                for name, room, socket, at in calls[first : first + 20]:
                    if name == ADD_PRESENCE:
                        outbox.default.send(name, room, socket, None, at=at)
                    else:
                        outbox.default.send(name, room, socket, at=at)
                await asyncio.sleep(0.005)

            async def applied() -> bool:
                for room in ROOMS:
                    if await sync_to_async(_sockets)(room) != expected[room]:
                        return False
                return True

            await wait_until(applied, seconds=WORKER_TIMEOUT)
            took = time.monotonic() - began
            for room in ROOMS:
                assert group_members(room) == expected[room]
        finally:
            done.set()
            watcher.join()
        stats = await asyncio.to_thread(bouncer.admin, "SHOW STATS")
        pools = await asyncio.to_thread(bouncer.admin, "SHOW POOLS")
    name = str(connection.settings_dict["NAME"])
    (ours,) = [row for row in stats if row["database"] == name]
    (pool,) = [row for row in pools if row["database"] == name]
    # Used, and left nothing held on a server connection once done.
    assert most_held >= 1
    assert await asyncio.to_thread(_advisory_locks, granted=True) == 0
    print(
        f"PgBouncer (transaction mode, {POOL_SIZE} server connections, "
        f"{CONCURRENCY} worker processes): {len(calls)} joins and leaves of "
        f"{SOCKETS} sockets applied in {took:.1f} s, {ours['total_xact_count']} "
        f"transactions; up to {most_held} advisory locks held at once, 0 after; "
        f"{pool['sv_idle'] + pool['sv_used'] + pool['sv_active']} server connections"
    )
