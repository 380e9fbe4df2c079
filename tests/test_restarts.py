# mypy: disallow-subclassing-any=False
"""Redis, and PostgreSQL, restarted while sockets come and go.

Each test starts a server of its own (``tests/servers.py``), puts load on it
with consumers in this process, in Celery mode, and a real worker, kills the
server with SIGKILL for a few seconds while the load goes on, starts it again
on the same port, and checks that no socket handler raised or hung, that the
outage was logged, and that the rows match the sockets again within a stated
time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psycopg
import pytest
import redis
from celery import Celery
from channels.generic.websocket import AsyncWebsocketConsumer, WebsocketConsumer
from channels_redis.core import RedisChannelLayer
from django.conf import settings
from django.db import connection
from django.test import override_settings
from websockets.exceptions import InvalidStatus

from channels_presence import outages, outbox
from channels_presence.consumers import (
    TRY_AGAIN_LATER,
    LayerOutageMixin,
    PresenceConsumerMixin,
)
from channels_presence.decorators import add_presence, remove_presence, touch_presence
from channels_presence.dispatch import HEARTBEAT_FRAME as HEARTBEAT
from channels_presence.groups import events_group
from channels_presence.outbox import Outbox
from tests.consumers import (
    AsyncJsonEchoConsumer,
    Client,
    Closed,
    JsonEchoConsumer,
    channel_of,
    note_channel,
)
from tests.helpers import (
    TIMEOUT,
    celery_mode,
    group_members,
    layer_outages,
    wait_until,
)
from tests.servers import (
    Daphne,
    ThrowawayPostgres,
    ThrowawayRedis,
    postgres_bin,
    throwaway_postgres,
    throwaway_redis,
)
from tests.test_pipeline import rows, rows_are
from tests.workers import celery_worker, environment

pytestmark = pytest.mark.django_db(transaction=True)

#: Seconds the server stays down.
OUTAGE = 3
#: Seconds, after the server is back, within which the rows match the sockets.
CONVERGENCE = 20
#: Seconds any one handler call (a connect, a frame, a disconnect) may take.
HANDLER_BOUND = 1.0


# Consumers of every kind: the mixin (async and sync) and the decorators (sync,
# and async with LayerOutageMixin). Each notes its channel name, and echoes
# every frame. When the channel layer goes away, the mixins and the async
# decorated consumer close their sockets (4503); the sync decorated one dies
# of it, as Channels has a consumer do.


class MixinConsumer(PresenceConsumerMixin, AsyncJsonEchoConsumer):
    presence_rooms = ["lobby"]

    async def connect(self):
        note_channel(self)
        await super().connect()


class SyncMixinConsumer(PresenceConsumerMixin, JsonEchoConsumer):
    presence_rooms = ["lobby"]

    def connect(self):
        note_channel(self)
        super().connect()


class DecoratedConsumer(WebsocketConsumer):
    @add_presence("lobby")
    def connect(self):
        note_channel(self)
        self.accept()

    @touch_presence
    def receive(self, text_data=None, bytes_data=None):
        self.send(text_data=json.dumps({"type": "echo", "text": text_data}))

    @remove_presence
    def disconnect(self, code):
        pass


class AsyncDecoratedConsumer(LayerOutageMixin, AsyncWebsocketConsumer):
    @add_presence("lobby")
    async def connect(self):
        note_channel(self)
        await self.accept()

    @touch_presence
    async def receive(self, text_data=None, bytes_data=None):
        await self.send(text_data=json.dumps({"type": "echo", "text": text_data}))

    @remove_presence
    async def disconnect(self, code):
        pass


KINDS = [MixinConsumer, SyncMixinConsumer, DecoratedConsumer, AsyncDecoratedConsumer]


# The load.


def killed_by_the_channel_layer(error: BaseException) -> bool:
    """Whether ``error`` came out of Channels' receive from the channel layer.

    Channels runs a consumer's channel-layer receive beside its websocket
    receive; when Redis goes away it raises, and a consumer without
    LayerOutageMixin dies (the server closes the socket, code 1011, and the
    browser connects again). That is Channels' own behaviour, not a presence
    handler failing.
    """
    frames = traceback.extract_tb(error.__traceback__)
    return (
        isinstance(error, redis.RedisError | OSError)
        and any(frame.name == "await_many_dispatch" for frame in frames)
        # Not raised by a presence handler, which Channels awaits there too.
        and not any(
            "/channels_presence/" in frame.filename and frame.name != "__call__"
            for frame in frames
        )
    )


@dataclass
class Load:
    """Sockets connecting, sending and leaving in a loop, each call timed.

    A socket whose consumer died connects again, as a browser would.
    """

    clients: list[Client] = field(default_factory=list)
    slowest: float = 0.0
    calls: int = 0
    connects: int = 0
    disconnects: int = 0
    #: Sockets closed (4503), or whose consumer was killed, by the channel
    #: layer's outage.
    dropped: dict[str, type] = field(default_factory=dict)
    #: Handler calls that raised, or took longer than HANDLER_BOUND.
    failures: list[str] = field(default_factory=list)
    #: The kinds of consumer connected, one socket of each at a time.
    kinds: list[type] = field(default_factory=lambda: list(KINDS))

    async def timed(self, client: Client, what: str, call: Callable[[], Any]) -> Any:
        started = time.monotonic()
        try:
            async with asyncio.timeout(TIMEOUT):
                return await call()
        finally:
            took = time.monotonic() - started
            self.calls += 1
            # A consumer that died meanwhile is waited for until the timeout:
            # the communicator only looks at the application when it does.
            if not client.future.done():
                self.slowest = max(self.slowest, took)
                if took > HANDLER_BOUND:
                    self.failures.append(f"{what} took {took:.2f} s")

    async def connect(self, kind: Any) -> None:
        client = Client(kind.as_asgi())
        client.scope["kind"] = kind
        try:
            accepted, _ = await self.timed(
                client, f"connect {kind.__name__}", client.connect
            )
        except Exception as error:
            await self._died(client, error)
            return
        assert accepted
        if "channel" not in {call[0] for call in client.calls}:
            # Accepted by LayerOutageMixin, only to be closed (4503): the
            # channel layer failed before connect() could run.
            try:
                await client.receive_text()
            except Closed as error:
                await self._died(client, error)
                return
            raise AssertionError(f"{kind.__name__}: accepted, but connect() never ran")
        self.clients.append(client)
        self.connects += 1

    async def step(self, n: int) -> None:
        """Every client sends a heartbeat and a frame; one socket leaves, one comes."""
        for client in list(self.clients):
            try:
                await self.timed(
                    client, "heartbeat", partial(client.send_to, HEARTBEAT)
                )
                await self.timed(
                    client, "frame", partial(client.answer, f'"frame {n}"')
                )
            except Exception as error:
                self.clients.remove(client)
                await self._died(client, error)
                await self.connect(client.scope["kind"])
        if n % 2 == 0 and self.clients:
            leaving = self.clients.pop(0)
            try:
                await self.timed(leaving, "disconnect", leaving.disconnect)
            except Exception as error:
                await self._died(leaving, error)
            else:
                self.disconnects += 1
        while len(self.clients) < len(self.kinds):
            await self.connect(self.kinds[n % len(self.kinds)])
            n += 1

    async def _died(self, client: Client, error: BaseException) -> None:
        client.closed = True
        if isinstance(error, Closed) and error.code == TRY_AGAIN_LATER:
            # Closed for the outage: the client's close, as a browser's,
            # runs the consumer's disconnect.
            self._dropped(client)
            try:
                await client.disconnect(error.code)
            except Exception as failure:
                self._failed(client, failure)
            return
        future = client.future
        if future.done() and not future.cancelled() and future.exception():
            # What the application died of, rather than how the test noticed.
            error = future.exception() or error
        if killed_by_the_channel_layer(error):
            self._dropped(client)
        else:
            self._failed(client, error)

    def _dropped(self, client: Client) -> None:
        for call in client.calls:
            if call[0] == "channel":
                self.dropped[call[1]] = client.scope["kind"]

    def _failed(self, client: Client, error: BaseException) -> None:
        frames = traceback.format_exception(error)
        self.failures.append(
            f"{client.scope['kind'].__name__}: {error!r}\n{''.join(frames)}"
        )

    def sockets(self, *kinds: type) -> set[str]:
        """The sockets connected now (of ``kinds``, else all)."""
        return {
            channel_of(client)
            for client in self.clients
            if not kinds or client.scope["kind"] in kinds
        }

    async def close(self) -> None:
        for client in self.clients:
            if not client.closed:
                with contextlib.suppress(Exception):
                    await client.disconnect()


async def loaded(load: Load, seconds: float, pause: float = 0.05) -> None:
    """Run the load for ``seconds``."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        await load.step(n)
        await asyncio.sleep(pause)


async def restarted_under_load(
    load: Load,
    server: ThrowawayRedis | ThrowawayPostgres,
    converged: Callable[[], Awaitable[Any]],
) -> float:
    """Load, until ``converged()``; kill ``server`` for OUTAGE s under load; start it.

    Returns when the server answers again, the ``time.monotonic()`` of then.
    """
    await loaded(load, 2)
    await converged()
    server.stop()
    await loaded(load, OUTAGE)
    server.start()
    return time.monotonic()


def layer_members(server: ThrowawayRedis, group: str) -> set[str]:
    """The channel names in ``group`` on the throwaway server's channel layer."""
    from channels.layers import get_channel_layer

    layer: Any = get_channel_layer()
    client = redis.Redis(port=server.port, decode_responses=True)
    try:
        return set(client.zrange(layer._group_key(group), 0, -1))  # type: ignore[arg-type]
    finally:
        client.close()


@contextmanager
def on_redis(server: ThrowawayRedis) -> Iterator[None]:
    """This process's channel layer and outbox on ``server``, in Celery mode."""
    app = Celery("restarts", set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.conf.update(broker_url=server.url)
    box = Outbox(app, retry_interval=0.1, exit_timeout=1.0)
    default: dict[str, Any] = settings.CHANNEL_LAYERS["default"]
    layers = {
        "default": {
            **default,
            "CONFIG": {
                **default["CONFIG"],
                "hosts": [server.url],
            },
        }
    }
    saved = outbox.default
    outbox.default = box
    try:
        with override_settings(
            CHANNEL_LAYERS=layers,
            CHANNELS_PRESENCE_USE_CELERY=True,
            CHANNELS_PRESENCE_TOUCH_INTERVAL=0.5,
            CHANNELS_PRESENCE_FLUSH_INTERVAL=0.2,
        ):
            yield
    finally:
        box.close()
        outbox.default = saved
        outages.outage.failing.clear()


async def test_redis_restarted_under_load_handlers_keep_working_and_presence_converges(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="channels_presence")
    with (
        throwaway_redis() as server,
        on_redis(server),
        celery_worker(
            "restarts",
            REDIS_URL=server.url,
            CHANNELS_PRESENCE_TEST_BROKER_URL=server.url,
        ),
    ):
        load = Load()
        try:
            back = await restarted_under_load(
                load, server, lambda: _converged(load, server)
            )
            # Without a prune: each live socket has its row and its groups.
            # Rows may remain of sockets gone: sync decorated ones that died
            # (Channels ran no disconnect handler), and those whose
            # leave was in the broker when it died.
            ghosts = await _converged(load, server, ghosts=True)
            converged = time.monotonic() - back
            # The prune removes those: beat's, stood in for here by one
            # with an age shorter than MAX_AGE but longer than any live
            # socket's silence (it touches every TOUCH_INTERVAL).
            await asyncio.sleep(max(0.0, PRUNE_AGE - (time.monotonic() - back)))
            outbox.default.send(PRUNE, age=PRUNE_AGE)
            await _converged(load, server)
            pruned = time.monotonic() - back
            assert load.failures == []
        finally:
            await load.close()
    print(
        f"Redis restart: converged {converged:.1f} s after the restart but for "
        f"{len(ghosts)} ghosts, {pruned:.1f} s with the "
        f"prune; {load.calls} handler calls, slowest {load.slowest:.3f} s; "
        f"{len(load.dropped)} sockets dropped for the outage, {load.connects} connects"
    )
    assert load.dropped, "the outage dropped no socket: was the server down?"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("the channel layer is unavailable" in m for m in errors), errors
    assert any("presence outbox: the broker at " in m for m in errors)


PRUNE = "channels_presence.tasks.prune_presences"
#: The age of the prune that stands in for beat's.
PRUNE_AGE = 3.0
MIXINS = (MixinConsumer, SyncMixinConsumer)


async def _converged(
    load: Load, server: ThrowawayRedis, *, ghosts: bool = False
) -> set[str]:
    """Go on until the rows and the groups match the sockets; return the ghosts.

    With ``ghosts``, rows of sockets that are gone (ghosts) may remain.
    """
    live: set[str] = set()
    found: set[str] = set()

    async def matches() -> bool:
        nonlocal live, found
        live = load.sockets()
        found = {name for room, name in await rows()}
        return (
            (live <= found if ghosts else live == found)
            and layer_members(server, "lobby") == live
            and layer_members(server, events_group("lobby")) == load.sockets(*MIXINS)
        )

    await _under_load_until(load, matches, CONVERGENCE)
    return found - live


async def _under_load_until(
    load: Load,
    matches: Callable[[], Awaitable[bool]],
    seconds: float,
    found: Callable[[], Awaitable[object]] = rows,
) -> None:
    """Go on with the load until ``matches()``; fail after ``seconds``.

    Heartbeats and frames go on; sockets only come back, none leaves.
    ``found()`` gives the rows to show if it fails.
    """
    deadline = time.monotonic() + seconds
    while not await matches():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"presence did not converge in {seconds} s: rows {await found()}, "
                f"sockets {load.sockets()}; failures: {load.failures}"
            )
        await load.step(1)
        await asyncio.sleep(0.1)


async def test_a_mixin_socket_whose_channel_layer_goes_away_is_closed_and_leaves(
    caplog: pytest.LogCaptureFixture, no_outage_yet: None
) -> None:
    # Inline, so that the leave is applied when the client's close comes.
    with (
        throwaway_redis() as server,
        on_redis(server),
        override_settings(CHANNELS_PRESENCE_USE_CELERY=False),
    ):
        client = Client(MixinConsumer.as_asgi())
        assert (await client.connect(TIMEOUT))[0]
        name = channel_of(client)
        await wait_until(lambda: rows_are({("lobby", name)}))
        server.stop()
        assert await client.until_closed() == TRY_AGAIN_LATER
        # The client's close runs the leave, then the consumer's disconnect().
        await client.disconnect(TRY_AGAIN_LATER)
        server.start()
    assert await rows() == set()
    assert client.calls[-1] == ("disconnect", TRY_AGAIN_LATER, 0)
    # Logged once; the leave's group discards, which wait for the layer, too.
    assert layer_outages(caplog) == [
        "presence receive failed: the channel layer is unavailable; sockets are "
        "closed with code 4503 (try again later) until it answers"
    ]


# The channel layer down while sockets connect to a real daphne.

#: Sockets of each route that connect in each round while Redis is down.
OUTAGE_SOCKETS = 4
#: The mixin's route and the decorated consumer's (tests/asgi.py).
ROUTES = ("rooms", "decorated")
#: The one line a daphne logs when its channel layer goes away, and when it is back.
LAYER_DOWN = "the channel layer is unavailable"
LAYER_BACK = "presence works again: the channel layer answers"


async def _close_code(socket: Any) -> int | None:
    """The code the server closed ``socket`` with; None if open after TIMEOUT."""
    async with socket:
        try:
            await asyncio.wait_for(socket.wait_closed(), TIMEOUT)
        except TimeoutError:
            return None
        code: int | None = socket.close_code
        return code


async def _connect_close_code(daphne: Daphne, route: str) -> int | str | None:
    """Connect to ``route``: the code the server then closed the socket with.

    "HTTP <status>" if it refused the handshake.
    """
    try:
        socket = await daphne.connect("lobby", route)
    except InvalidStatus as error:
        return f"HTTP {error.response.status_code}"
    return await _close_code(socket)


async def _chat(socket: Any) -> dict[str, Any]:
    """The next chat frame the socket receives."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            frame = json.loads(await socket.recv())
            if frame.get("type") == "chat":
                return dict(frame)


def _lines(output: str, text: str) -> int:
    return sum(text in line for line in output.splitlines())


async def test_sockets_opened_while_the_layer_is_down_close_with_4503() -> None:
    with throwaway_redis() as server:
        # Everything of daphne's on the throwaway server: channel layer,
        # broker and leases.
        daphne = Daphne(
            REDIS_URL=server.url, CHANNELS_PRESENCE_TEST_BROKER_URL=server.url
        )
        layer = RedisChannelLayer(
            hosts=[server.url],
            prefix=settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"],
        )
        try:
            # A socket of each kind is in the room when Redis goes away.
            joined = [await daphne.connect("lobby", route) for route in ROUTES]
            await wait_until(lambda: len(layer_members(server, "lobby")) == 2)
            server.stop()
            codes: list[int | str | None] = list(
                await asyncio.gather(*map(_close_code, joined))
            )
            # Clients connect, and come back as presence.js would: twice.
            for _ in range(2):
                codes += await asyncio.gather(
                    *(
                        _connect_close_code(daphne, route)
                        for route in ROUTES
                        for _ in range(OUTAGE_SOCKETS)
                    )
                )
            assert codes == [TRY_AGAIN_LATER] * len(codes)

            # Redis is back: a socket of each kind connects and joins.
            server.start()
            mixin = await daphne.connect("lobby")
            decorated = await daphne.connect("lobby", "decorated")
            async with mixin, decorated:
                await wait_until(lambda: len(layer_members(server, "lobby")) == 2)
                chat = {"type": "chat.message", "message": "hi", "author": None}
                await layer.group_send("lobby", {**chat, "text": "hi"})
                assert (await _chat(mixin))["message"] == "hi"
                assert (await _chat(decorated))["text"] == "hi"
            await layer.flush()
            output = daphne.output()
        except BaseException:
            print(f"--- daphne output ---\n{daphne.output()}")
            raise
        finally:
            daphne.close()
    assert "Exception inside application" not in output
    # Eighteen sockets closed: one line, and one when the outage ends.
    assert _lines(output, LAYER_DOWN) == 1, output
    assert _lines(output, LAYER_BACK) == 1, output


# PostgreSQL.


@pytest.fixture
def postgres() -> Iterator[ThrowawayPostgres]:
    """A throwaway PostgreSQL cluster with a migrated database, ``presence``."""
    if connection.vendor != "postgresql":
        pytest.skip(
            "runs in the PostgreSQL pass only: it starts a PostgreSQL of its own "
            "whatever the suite's database, and once is enough"
        )
    if postgres_bin() is None:
        pytest.skip("PostgreSQL's initdb is not installed: no server to restart")
    with throwaway_postgres() as server:
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE presence")
        migrate = subprocess.run(
            [sys.executable, "-m", "django", "migrate", "-v", "0"],
            env=environment(**on_postgres(server)),
            capture_output=True,
            text=True,
        )
        assert migrate.returncode == 0, migrate.stderr
        yield server


def on_postgres(server: ThrowawayPostgres) -> dict[str, str]:
    """The environment of a worker on the throwaway server's database."""
    return {
        "DATABASE_URL": server.url("presence"),
        "CHANNELS_PRESENCE_TEST_DATABASE": "presence",
    }


def pg_rows(server: ThrowawayPostgres) -> set[tuple[str, str]] | None:
    """Every presence on the throwaway server, as (room, socket); None if it is down."""
    try:
        with psycopg.connect(server.dsn("presence"), connect_timeout=2) as reader:
            found = reader.execute(
                "SELECT r.channel_name, p.channel_name "
                "FROM channels_presence_presence p "
                "JOIN channels_presence_room r ON r.id = p.room_id"
            ).fetchall()
    except psycopg.OperationalError:
        return None
    return {(room, name) for room, name in found}


async def test_postgresql_restarted_under_load_the_workers_catch_up(
    postgres: ThrowawayPostgres,
) -> None:
    with (
        celery_mode(),
        override_settings(
            CHANNELS_PRESENCE_TOUCH_INTERVAL=0.5, CHANNELS_PRESENCE_FLUSH_INTERVAL=0.2
        ),
        celery_worker(
            "pg-restarts",
            DATABASE_URL=postgres.url("presence"),
            CHANNELS_PRESENCE_TEST_DATABASE="presence",
        ) as worker,
    ):
        load = Load()
        try:
            back = await restarted_under_load(
                load, postgres, lambda: _rows_follow(load, postgres)
            )
            await loaded(load, 1)
            await _rows_follow(load, postgres)
            converged = time.monotonic() - back
            assert load.failures == []
        finally:
            await load.close()
        await _rows_follow(load, postgres)
        # The worker's tasks failed while the server was down, and retried.
        assert "OperationalError" in worker.output()
        assert "Retry in" in worker.output()
    print(
        f"PostgreSQL restart: converged {converged:.1f} s after the restart; "
        f"{load.calls} handler calls, slowest {load.slowest:.3f} s, "
        f"{load.connects} connects, {load.disconnects} disconnects"
    )


#: A task that failed while the server was down waits for its retry: with
#: jitter, up to retry_backoff_max (60 s) after the restart, and then runs.
PG_CONVERGENCE = 60 + CONVERGENCE


async def _rows_follow(load: Load, server: ThrowawayPostgres) -> None:
    """Go on until the rows, and the groups, are the sockets'."""

    async def matches() -> bool:
        found = await asyncio.to_thread(pg_rows, server)
        expected = {("lobby", name) for name in load.sockets()}
        return found == expected and group_members("lobby") == load.sockets()

    await _under_load_until(
        load, matches, PG_CONVERGENCE, lambda: asyncio.to_thread(pg_rows, server)
    )
