"""Helpers that look at presences in the database and into the Redis channel layer.

They wait on what they look for, never longer than :data:`TIMEOUT` unless told;
they can take the database down for real for a while, as an outage would, and put
a test in Celery mode with the run's queue empty. Below them, the heartbeat frames
the consumer tests send.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest
import redis
from asgiref.sync import sync_to_async
from channels.layers import channel_layers, get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import OperationalError, connection, connections
from django.test import override_settings
from django.utils import timezone

from channels_presence.models import Presence, Room
from tests.workers import purge_queue

T = TypeVar("T")

#: For a test whose outcome no database can change: it runs in the SQLite pass
#: of ``dev.py test`` only, which keeps the whole run short.
sqlite_pass_only = pytest.mark.skipif(
    bool(os.environ.get("DATABASE_URL")),
    reason="independent of the database: runs in the SQLite pass",
)

#: Seconds a test waits for a frame, a message or a change before it fails.
TIMEOUT = 3

#: Text frames that are a heartbeat: JSON for the string "heartbeat", 64 long at most.
HEARTBEATS = [
    '"heartbeat"',
    ' "heartbeat" ',
    '"\\u0068eartbeat"',
    '"heartbeat"'.ljust(64),
]
#: Decodes to "heartbeat", but is too long to be decoded to look for a heartbeat.
LONG_HEARTBEAT = '"heartbeat"'.ljust(65)


# The channel layer.


def new_channel_layer() -> None:
    """Make ``get_channel_layer()`` build a new layer instance from now on.

    For code that runs consumers on an event loop of its own, as each async
    test does and each example of a hypothesis test run through
    ``async_to_sync``. channels_redis keeps per-loop state on the layer
    instance: a consumer cancelled while it waits on one of the layer's receive
    locks (channels_redis's ``ChannelLock`` counts the waiter and never uncounts
    it) leaves that lock held for good, bound to a loop that is gone, and the
    next consumer on another loop that shares the instance fails with "is bound
    to a different event loop" (django/channels#876, same remedy).
    """
    channel_layers.backends.clear()


def group_members(group: str, layer: Any = None) -> set[str]:
    """The channel names in ``group`` of ``layer`` (the default one), from Redis."""
    layer = layer or get_channel_layer()
    client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    try:
        members: list[str] = client.zrange(layer._group_key(group), 0, -1)  # type: ignore[assignment]
    finally:
        client.close()
    return {str(member) for member in members}


# Presences.


def ago(seconds: float) -> datetime:
    """The moment ``seconds`` ago: a ``last_seen`` or an ``at`` for the past."""
    return timezone.now() - timedelta(seconds=seconds)


async def sockets() -> set[str]:
    """The channel names of every socket that has a presence."""
    names = Presence.objects.values_list("channel_name", flat=True)
    return {name async for name in names}


async def rooms_of(channel_name: str) -> set[str]:
    """The rooms the socket has a presence in."""
    presences = Presence.objects.filter(channel_name=channel_name)
    names = presences.values_list("room__channel_name", flat=True)
    return {name async for name in names}


async def set_last_seen_back(channel_name: str | None = None) -> datetime:
    """Move last_seen an hour back (of one socket, else of all); return it."""
    moment = timezone.now() - timedelta(hours=1)
    presences = Presence.objects.all()
    if channel_name is not None:
        presences = presences.filter(channel_name=channel_name)
    assert await presences.aupdate(last_seen=moment) > 0
    return moment


async def last_seen(channel_name: str | None = None) -> list[datetime]:
    """last_seen of every presence (of one socket, else of all)."""
    presences = Presence.objects.all()
    if channel_name is not None:
        presences = presences.filter(channel_name=channel_name)
    return [seen async for seen in presences.values_list("last_seen", flat=True)]


async def touched_since(moment: datetime, channel_name: str | None = None) -> bool:
    """Whether every presence (of one socket, else all) was touched after ``moment``."""
    seen = await last_seen(channel_name)
    return bool(seen) and min(seen) > moment


async def wait_until(
    condition: Callable[[], Awaitable[bool] | bool], *, seconds: float = TIMEOUT
) -> None:
    """Wait until ``condition()`` holds; fail after ``seconds`` (:data:`TIMEOUT`)."""
    async with asyncio.timeout(seconds):
        while True:
            outcome = condition()
            if not isinstance(outcome, bool):
                outcome = await outcome
            if outcome:
                return
            await asyncio.sleep(0.01)


async def wait_until_touched(moment: datetime) -> None:
    """Wait until every presence was touched after ``moment``."""
    await wait_until(lambda: touched_since(moment))


async def make_user(username: str, **fields: Any) -> Any:
    """A saved user."""
    return await sync_to_async(get_user_model().objects.create_user)(username, **fields)


# A real database outage.


def closed_port() -> int:
    """A local TCP port that nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _break_database() -> dict[str, Any]:
    # The settings dict is shared by every thread's connection, so a connection
    # opened afterwards, in any thread, fails to connect; this thread's own is
    # closed so that it has to reconnect.
    settings_dict = connections.settings["default"]
    saved = dict(settings_dict)
    connection.close()
    if connection.vendor == "postgresql":
        settings_dict["HOST"] = "127.0.0.1"
        settings_dict["PORT"] = str(closed_port())
    else:
        settings_dict["NAME"] = "/nonexistent-channels-presence/dir/test.sqlite3"
    return saved


def _mend_database(saved: dict[str, Any]) -> None:
    connection.close()
    settings_dict = connections.settings["default"]
    settings_dict.clear()
    settings_dict.update(saved)


@contextmanager
def database_down() -> Iterator[None]:
    """The default database cannot be reached until the block ends."""
    saved = _break_database()
    try:
        with pytest.raises(OperationalError):
            Room.objects.count()
        yield
    finally:
        _mend_database(saved)


@asynccontextmanager
async def adatabase_down() -> AsyncIterator[None]:
    """The same, for async code.

    Consumers and the async ORM use the database from asgiref's thread: it is
    that thread's connection which is closed, and has to reconnect.
    """
    saved = await sync_to_async(_break_database)()
    try:
        with pytest.raises(OperationalError):
            await Room.objects.acount()
        yield
    finally:
        await sync_to_async(_mend_database)(saved)


@contextmanager
def presence_writes_refused() -> Iterator[None]:
    """The database refuses to insert presences (a trigger), until the block ends.

    A real failure of a join's write, after its group add, on either database.
    """
    table = Presence._meta.db_table
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "CREATE FUNCTION refuse_presence_writes() RETURNS trigger "
                "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'write refused'; "
                "END $$"
            )
            cursor.execute(
                f"CREATE TRIGGER refuse_presence_writes BEFORE INSERT ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION refuse_presence_writes()"
            )
        else:
            cursor.execute(
                f"CREATE TRIGGER refuse_presence_writes BEFORE INSERT ON {table} "
                "BEGIN SELECT RAISE(ABORT, 'write refused'); END"
            )
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute(f"DROP TRIGGER refuse_presence_writes ON {table}")
                cursor.execute("DROP FUNCTION refuse_presence_writes()")
            else:
                cursor.execute("DROP TRIGGER refuse_presence_writes")


@contextmanager
def layer_down() -> Iterator[Any]:
    """The default channel layer, pointed at a Redis that is not there."""
    dead = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [f"redis://127.0.0.1:{closed_port()}"]},
        }
    }
    with override_settings(CHANNEL_LAYERS=dead):
        yield get_channel_layer()


def layer_outages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ERROR lines of channels_presence that say the channel layer is down.

    An outage is logged once, until a call that needs the layer succeeds.
    """
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "channels_presence"
        and record.levelno >= logging.ERROR
        and "the channel layer is unavailable" in record.getMessage()
    ]


# Celery mode.


@contextmanager
def celery_mode() -> Iterator[None]:
    """Celery mode, with the run's queue empty at the start and at the end."""
    purge_queue()
    with override_settings(CHANNELS_PRESENCE_USE_CELERY=True):
        yield
    purge_queue()


def in_background(call: Callable[[], T]) -> Future[T]:
    """Start ``call`` in another thread, so on another database connection."""

    def run() -> T:
        try:
            return call()
        finally:
            connections.close_all()

    executor = ThreadPoolExecutor(max_workers=1)
    try:
        return executor.submit(run)
    finally:
        executor.shutdown(wait=False)
