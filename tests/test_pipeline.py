# mypy: disallow-subclassing-any=False
"""Celery mode end to end: consumers in this process, real workers beside it.

The consumers send their tasks through the process's outbox to the run's queue
on the real Redis broker; ``celery -A tasks worker`` subprocesses apply them to
the test database and broadcast through the real Redis channel layer. Nothing
here runs an operation in this process, except where a 1.0.0-style consumer
calls ``Room.objects.add`` itself, which always runs inline.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager
from typing import Any, cast

import pytest
import redis
from channels.consumer import SyncConsumer
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from django.conf import settings
from django.db import connection
from django.test import override_settings
from django.urls import path

from channels_presence import outbox
from channels_presence.consumers import PresenceConsumerMixin
from channels_presence.groups import events_group
from channels_presence.models import Presence
from tasks import app as celery_app
from tests.consumers import (
    ECHO_CONSUMERS,
    ROOMS,
    AsyncDecoratedConsumer,
    AsyncJsonEchoConsumer,
    AsyncJsonJoiningConsumer,
    AsyncJsonUrlJoiningConsumer,
    Client,
    DecoratedConsumer,
    JsonEchoConsumer,
    JsonJoiningConsumer,
    channel_of,
    connected,
    note_channel,
    url_room,
)
from tests.helpers import (
    celery_mode,
    group_members,
    make_user,
    set_last_seen_back,
    sockets,
    touched_since,
    wait_until,
)
from tests.workers import CeleryProcess, celery_worker

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("in_celery_mode"),
]

#: Seconds a test waits for a worker to have done something: a worker process
#: is slower to get to a task than an inline call, and shares two cores.
WORKER_TIMEOUT = 15

PRUNE_PRESENCES = "channels_presence.tasks.prune_presences"


@pytest.fixture
def in_celery_mode() -> Iterator[None]:
    with celery_mode():
        yield


@pytest.fixture
def worker() -> Iterator[CeleryProcess]:
    with celery_worker() as process:
        yield process


# Waiting on the workers.


async def eventually(
    condition: Callable[[], Awaitable[bool] | bool],
    seconds: float = WORKER_TIMEOUT,
) -> None:
    """Wait until ``condition()`` holds; fail after ``seconds``."""
    await wait_until(condition, seconds=seconds)


def queued() -> int:
    """Tasks of this run in the broker: waiting, or taken and not yet acknowledged.

    The presence tasks that matter (joins and leaves) are acknowledged late, so
    they count until a worker is done with them.
    """
    prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"]
    queue = prefix + settings.CELERY_TASK_DEFAULT_QUEUE
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    try:
        # kombu keeps a queue's priorities other than 0 under suffixed names.
        keys = list(client.scan_iter(f"{queue}*"))
        waiting = sum(cast(int, client.llen(key)) for key in keys)
        return waiting + cast(int, client.hlen(f"{prefix}unacked"))
    finally:
        client.close()


async def drained() -> None:
    """Wait until every task sent so far has reached a worker and been done."""
    await asyncio.to_thread(outbox.default.flush, 10)
    # A worker pops a message off the queue a moment before it records it as
    # unacknowledged: an empty broker is believed once it is seen empty again
    # after a pause longer than that moment.
    await eventually(lambda: queued() == 0)
    await asyncio.sleep(0.2)
    await eventually(lambda: queued() == 0)


async def rows() -> set[tuple[str, str]]:
    """Every presence as (room, socket)."""
    values = Presence.objects.values_list("room__channel_name", "channel_name")
    return {row async for row in values}


async def count(expected: int) -> bool:
    return len(await sockets()) == expected


# What the clients are told.


Seen = tuple[list[str], int]


def seen(*users: Any, visitors: int = 0) -> Seen:
    """What a client sees of a room where these users and visitors are."""
    return sorted(user.username for user in users), visitors


async def until_told(client: Client, expected: dict[str, Seen]) -> None:
    """Read the client's frames until it sees each room as ``expected``."""
    while {room: client.sees(room) for room in expected} != expected:
        await client.receive_text()


# Consumers. Those a test follows by socket note their channel name when they
# accept (tests.consumers.note_channel), so that it knows its sockets without
# asking the database the workers write to.


class LobbyConsumer(PresenceConsumerMixin, AsyncJsonEchoConsumer):
    presence_rooms = ["lobby"]


class SyncLobbyConsumer(PresenceConsumerMixin, JsonEchoConsumer):
    presence_rooms = ["lobby"]


class DecoratedLobbyConsumer(JsonJoiningConsumer):
    """Joins the lobby with ``add_presence``, and sends its client each presence
    frame, as the mixin does (without holding diffs back for the state)."""

    def presence_state(self, event):
        self.send_json(event)

    def presence_diff(self, event):
        self.send_json(event)

    def presence_expired(self, event):
        self.send_json(event)


class AsyncDecoratedLobbyConsumer(AsyncJsonJoiningConsumer):
    """:class:`DecoratedLobbyConsumer`, async."""

    async def presence_state(self, event):
        await self.send_json(event)

    async def presence_diff(self, event):
        await self.send_json(event)

    async def presence_expired(self, event):
        await self.send_json(event)


#: add_presence, with presence handlers: sync and async.
WITH_HANDLERS = [DecoratedLobbyConsumer, AsyncDecoratedLobbyConsumer]


class RoomFromUrlConsumer(PresenceConsumerMixin, AsyncJsonEchoConsumer):
    """The mixin, in the room the URL names."""

    async def connect(self):
        note_channel(self)
        await self.accept()

    def get_presence_rooms(self):
        return [url_room(self)]


def with_presence(base: type, **body: Any) -> Any:
    """``class C(PresenceConsumerMixin, base)``, noting its channel on connect."""
    if issubclass(base, SyncConsumer):

        def connect(self):
            note_channel(self)
            self.accept()

    else:

        async def connect(self):
            note_channel(self)
            await self.accept()

    return type(
        f"Presence{base.__name__}",
        (PresenceConsumerMixin, base),
        {"connect": connect, **body},
    )


# A join reaches the room from the worker (issue 3, item 9).


@pytest.mark.parametrize("consumer", [LobbyConsumer, SyncLobbyConsumer])
async def test_a_join_reaches_the_other_clients_from_the_worker(
    worker: CeleryProcess, alice, bob, consumer
) -> None:
    async with connected(consumer.as_asgi(), user=alice) as a:
        await a.until_sees("alice")
        async with connected(consumer.as_asgi(), user=bob):
            await a.until_sees("alice", "bob")
            assert len(await sockets()) == 2
            assert len(group_members("lobby")) == 2
        await a.until_sees("alice")
    await eventually(lambda: count(0))
    assert group_members("lobby") == set()


@asynccontextmanager
async def alice_then_bob(
    consumer: Any, alice: Any, bob: Any
) -> AsyncIterator[tuple[Client, Client]]:
    """alice's client, then bob's, in the lobby; each told who is there as it joins."""
    application = consumer.as_asgi()
    async with connected(application, user=alice) as a:
        await a.until_sees("alice")
        async with connected(application, user=bob) as b:
            await b.until_sees("alice", "bob")
            yield a, b


@pytest.mark.parametrize("consumer", WITH_HANDLERS)
async def test_add_presence_with_presence_handlers_hears_the_worker(
    worker: CeleryProcess, alice, bob, consumer
) -> None:
    async with alice_then_bob(consumer, alice, bob) as (a, b):
        await a.until_sees("alice", "bob")
        assert await sockets() == {channel_of(a), channel_of(b)}
        assert group_members("lobby") == {channel_of(a), channel_of(b)}
        assert group_members(events_group("lobby")) == group_members("lobby")
        await b.answer('"ping"')
        await b.disconnect()

        await a.until_sees("alice")
        assert await sockets() == {channel_of(a)}
        assert group_members(events_group("lobby")) == {channel_of(a)}
    await eventually(lambda: count(0))
    assert group_members("lobby") == set()
    assert group_members(events_group("lobby")) == set()


# Every websocket base works in Celery mode (issue 3, item 5).


@pytest.mark.parametrize("base", ECHO_CONSUMERS)
@override_settings(
    CHANNELS_PRESENCE_TOUCH_INTERVAL=0, CHANNELS_PRESENCE_FLUSH_INTERVAL=0.1
)
async def test_each_consumer_base_joins_touches_and_leaves_through_the_worker(
    worker: CeleryProcess, base
) -> None:
    application = with_presence(base, presence_rooms=ROOMS).as_asgi()
    async with connected(application) as client:
        # Handled at once: the handler waits on no database and no worker.
        await client.answer('"ping"')
        socket = channel_of(client)
        await eventually(lambda: rows_are({(room, socket) for room in ROOMS}))
        for room in ROOMS:
            assert group_members(room) == {socket}
            assert group_members(events_group(room)) == {socket}

        before = await set_last_seen_back()
        await client.answer('"ping"')
        await eventually(lambda: touched_since(before))

    await eventually(lambda: count(0))
    for room in ROOMS:
        assert group_members(room) == set()
        assert group_members(events_group(room)) == set()


async def rows_are(expected: set[tuple[str, str]]) -> bool:
    return await rows() == expected


@pytest.mark.parametrize("consumer", [LobbyConsumer, DecoratedLobbyConsumer])
@override_settings(
    CHANNELS_PRESENCE_TOUCH_INTERVAL=0, CHANNELS_PRESENCE_FLUSH_INTERVAL=0.1
)
async def test_heartbeats_alone_reach_the_database_within_the_flush_interval(
    worker: CeleryProcess, consumer
) -> None:
    async with connected(consumer.as_asgi()) as client:
        await client.receive_type("presence.state")
        # The join is sent: the outbox's sender is idle from here on.
        await drained()
        before = await set_last_seen_back()

        await client.send_to(text_data='"heartbeat"')

        # Well within the interval and a worker's latency; never flushed.
        await eventually(lambda: touched_since(before), seconds=5)


# prune_presences run by a worker (issue 3, item 10).


async def receive_changes(layer: Any, channel: str, changes: int) -> list[Any]:
    """What ``channel`` receives, up to and including its ``changes``-th diff."""
    received: list[dict[str, Any]] = []
    async with asyncio.timeout(WORKER_TIMEOUT):
        while sum(m["type"] == "presence.diff" for m in received) < changes:
            received.append(await layer.receive(channel))
    return received


@pytest.mark.parametrize("base", [AsyncJsonEchoConsumer, JsonEchoConsumer])
async def test_a_stale_mixin_socket_is_told_once_per_room_and_joins_again(
    worker: CeleryProcess, alice, bob, base
) -> None:
    layer: Any = get_channel_layer()
    application = with_presence(base, presence_rooms=ROOMS).as_asgi()
    carol = await make_user("carol")

    async with (
        connected(application, user=alice) as a,
        connected(application, user=bob) as b,
        connected(application, user=carol) as c,
    ):
        stale = {channel_of(a), channel_of(c)}
        b_socket = channel_of(b)
        everyone = stale | {b_socket}
        await eventually(lambda: rows_are({(r, s) for r in ROOMS for s in everyone}))
        await drained()
        for socket in stale:
            await set_last_seen_back(socket)
        # A bare channel in both events groups sees each message the rooms get
        # from now on.
        watcher = await layer.new_channel()
        for room in ROOMS:
            await layer.group_add(events_group(room), watcher)

        celery_app.send_task(PRUNE_PRESENCES)

        for client in (a, c):
            told = [await client.receive_type("presence.expired") for _ in ROOMS]
            assert sorted(told, key=lambda m: m["room"]) == [
                {"type": "presence.expired", "room": room} for room in sorted(ROOMS)
            ]
        # Per room, one diff, whose leaves say why; the notices went to the
        # stale sockets alone.
        messages = await receive_changes(layer, watcher, len(ROOMS))
        assert [m["type"] for m in messages] == ["presence.diff"] * len(ROOMS)
        assert sorted(m["room"] for m in messages) == sorted(ROOMS), messages
        for diff in messages:
            assert sorted(diff["leaves"]) == sorted([f"u:{alice.pk}", f"u:{carol.pk}"])
            reasons = {m["reason"] for v in diff["leaves"].values() for m in v["metas"]}
            assert reasons == {"expired"}
        assert await rows() == {(room, b_socket) for room in ROOMS}
        for room in ROOMS:
            assert group_members(room) == {b_socket}
            assert group_members(events_group(room)) == {b_socket, watcher}
        await until_told(b, {room: seen(bob) for room in ROOMS})

        # a is alive: its next frame, a heartbeat even, joins it again; c is not.
        await a.send_to(text_data='"heartbeat"')

        back = stale - {channel_of(c)}
        expected = {(r, s) for r in ROOMS for s in back | {b_socket}}
        await eventually(lambda: rows_are(expected))
        for room in ROOMS:
            assert group_members(room) == back | {b_socket}
            assert group_members(events_group(room)) == back | {b_socket, watcher}
        await until_told(b, {room: seen(alice, bob) for room in ROOMS})
        assert all(m["type"] != "presence.expired" for m in b.received_since(0))
        await c.answer('"still connected"')


@pytest.mark.parametrize("consumer", WITH_HANDLERS)
async def test_a_stale_decorated_socket_with_handlers_is_told(
    worker: CeleryProcess, alice, bob, consumer
) -> None:
    async with alice_then_bob(consumer, alice, bob) as (a, b):
        await drained()
        await set_last_seen_back(channel_of(a))

        celery_app.send_task(PRUNE_PRESENCES)

        expired = {"type": "presence.expired", "room": "lobby"}
        assert await a.receive_type("presence.expired") == expired
        await b.until_sees("bob")
        assert await sockets() == {channel_of(b)}
        assert group_members("lobby") == {channel_of(b)}
        # b's handler was called too, and stayed quiet: it is not stale.
        assert all(m["type"] != "presence.expired" for m in b.received_since(0))
        await a.answer('"still connected"')


@pytest.mark.parametrize("legacy", [DecoratedConsumer, AsyncDecoratedConsumer])
async def test_a_stale_1_0_0_style_socket_loses_its_rows_and_nothing_else(
    worker: CeleryProcess, legacy
) -> None:
    layer: Any = get_channel_layer()
    watching = with_presence(AsyncJsonEchoConsumer, presence_rooms=ROOMS)
    async with connected(legacy.as_asgi()) as old:
        # Room.objects.add in connect: inline, whatever the mode.
        await old.answer('"ping"')
        (old_socket,) = await sockets()
        async with connected(watching.as_asgi()) as new:
            new_socket = channel_of(new)
            expected = {(r, s) for r in ROOMS for s in (old_socket, new_socket)}
            await eventually(lambda: rows_are(expected))
            await drained()
            await set_last_seen_back(old_socket)

            celery_app.send_task(PRUNE_PRESENCES)

            # The prune's change reaches the rooms after its group discards.
            await until_told(new, {r: seen(visitors=1) for r in ROOMS})
            assert await rows() == {(r, new_socket) for r in ROOMS}
            for room in ROOMS:
                assert group_members(room) == {new_socket}
            await old.assert_got_nothing_it_cannot_handle(layer, old_socket)
            # Its touches do not bring a pruned row back.
            await drained()
            assert await rows() == {(r, new_socket) for r in ROOMS}


# With no worker running (issue 3, item 8, the worker-down half).


@override_settings(CHANNELS_PRESENCE_TOUCH_INTERVAL=0)
async def test_sockets_work_without_a_worker_and_presence_follows_once_one_runs() -> (
    None
):
    application = with_presence(AsyncJsonEchoConsumer, presence_rooms=ROOMS)
    sync_application = with_presence(JsonEchoConsumer, presence_rooms=ROOMS)
    async with (
        connected(application.as_asgi()) as a,
        connected(sync_application.as_asgi()) as b,
    ):
        async with connected(application.as_asgi()) as gone:
            for client in (a, b, gone):
                await client.answer('"ping"')
                await client.send_to(text_data='"heartbeat"')
                await client.answer('"ping"')
        live = {channel_of(a), channel_of(b)}
        await asyncio.to_thread(outbox.default.flush, 10)

        # The joins, touches and leave wait in the broker; none reached the DB.
        assert queued() > 0
        assert await rows() == set()
        for room in ROOMS:
            # The groups did change at once: messages flow without a worker.
            assert group_members(room) == live

        with celery_worker():
            await eventually(lambda: rows_are({(r, s) for r in ROOMS for s in live}))
            await eventually(lambda: queued() == 0)
            assert await rows() == {(r, s) for r in ROOMS for s in live}
            for room in ROOMS:
                assert group_members(room) == live
                assert group_members(events_group(room)) == live
            # Each live client hears, last, that both are in each room.
            for client in (a, b):
                await until_told(client, {r: seen(visitors=2) for r in ROOMS})
            await a.answer('"ping"')


# Many sockets, two workers (issue 3, item 7).


class Size:
    """How big the random run is on this database."""

    def __init__(self) -> None:
        if connection.vendor == "postgresql":
            self.sockets, self.rooms, self.workers = 200, 20, 2
        else:
            # SQLite has one writer at a time: one worker, a smaller crowd.
            self.sockets, self.rooms, self.workers = 60, 6, 1


@override_settings(
    CHANNELS_PRESENCE_TOUCH_INTERVAL=0, CHANNELS_PRESENCE_FLUSH_INTERVAL=0.2
)
async def test_random_joins_touches_and_leaves_leave_no_ghost_and_no_gap() -> None:
    size = Size()
    if size.workers < 2:
        print("SQLite: one worker and 60 sockets; two workers run on PostgreSQL")
    rng = random.Random(20240607)
    rooms = [f"room-{n}" for n in range(size.rooms)]
    routes = {
        "mixin": URLRouter([path("ws/<room>/", RoomFromUrlConsumer.as_asgi())]),
        "decorated": URLRouter(
            [path("ws/<room>/", AsyncJsonUrlJoiningConsumer.as_asgi())]
        ),
    }
    live: dict[str, tuple[str, str]] = {}  # socket -> (room, kind)
    clients: list[Client] = []

    async def open_socket(plan: random.Random) -> Client:
        room, kind = plan.choice(rooms), plan.choice(sorted(routes))
        client = Client(routes[kind], f"/ws/{room}/")
        accepted, _ = await client.connect(WORKER_TIMEOUT)
        assert accepted
        clients.append(client)
        live[channel_of(client)] = (room, kind)
        return client

    async def life(plan: random.Random) -> None:
        client = await open_socket(plan)
        for _ in range(plan.randint(1, 4)):
            await asyncio.sleep(plan.uniform(0, 0.5))
            if plan.random() < 0.5:
                await client.send_to(text_data='"heartbeat"')
            else:
                await client.answer(json.dumps({"n": plan.random()}))
        if plan.random() < 0.5:
            await asyncio.sleep(plan.uniform(0, 0.3))
            del live[channel_of(client)]
            await client.disconnect()
            if plan.random() < 0.3:
                again = await open_socket(plan)
                await again.answer('"back"')

    with ExitStack() as stack:
        workers = [
            stack.enter_context(celery_worker(f"crowd{n}")) for n in range(size.workers)
        ]
        # A failed run leaves no consumer running into the next test.
        stack.callback(lambda: [client.future.cancel() for client in clients])
        plans = [random.Random(rng.random()) for _ in range(size.sockets)]
        async with asyncio.timeout(40):
            await asyncio.gather(*(life(plan) for plan in plans))
            await drained()

        expected = {(room, socket) for socket, (room, _) in live.items()}
        found = await rows()
        assert not found - expected, f"ghost presences: {sorted(found - expected)}"
        assert not expected - found, f"missing presences: {sorted(expected - found)}"
        for room in rooms:
            members = {s for s, (r, _) in live.items() if r == room}
            assert group_members(room) == members, room
            subscribed = {s for s in members if live[s][1] == "mixin"}
            assert group_members(events_group(room)) == subscribed, room

        for process in workers:
            assert "channels_presence.tasks.leave_all" in process.output(), (
                f"{process.name} did no presence work"
            )

        # Everyone leaves: nothing stays behind.
        async with asyncio.timeout(20):
            await asyncio.gather(*(c.disconnect() for c in clients if not c.closed))
            await drained()
        assert await rows() == set()
        for room in rooms:
            assert group_members(room) == set()
            assert group_members(events_group(room)) == set()
