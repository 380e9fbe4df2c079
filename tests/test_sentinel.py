# mypy: disallow-subclassing-any=False
"""Redis Sentinel: the layer, the broker and the leases through it; a failover.

The first tests read the two ways of naming a Sentinel deployment. The last
starts a real one (a master, a replica, three Sentinels: ``tests/servers.py``),
puts a real daphne, a worker and beat on it, and mixin consumers (sync and
async) in this process, kills the master under load, and checks that no handler raised,
that presence converges on the promoted replica, and that no server was taken
for dead although the failover lost every lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from celery import Celery
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.checks import run_checks
from django.test import override_settings
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from channels_presence import leases, outages, outbox, sentinel
from channels_presence.groups import events_group
from channels_presence.models import Presence
from channels_presence.outbox import Outbox
from tests.consumers import channel_of
from tests.helpers import sqlite_pass_only, wait_until
from tests.servers import MASTER_NAME, Daphne, ThrowawaySentinel, throwaway_sentinel
from tests.test_restarts import MIXINS, PRUNE, PRUNE_AGE, Load, loaded
from tests.workers import CeleryProcess, celery_beat, celery_worker

# Naming a Sentinel deployment.


@sqlite_pass_only
def test_a_sentinel_url_names_the_sentinels_the_master_and_its_database() -> None:
    url = "redis+sentinel://user:p%40ss@s1:26380,s2,10.0.0.3:26381/mymaster/2"
    assert sentinel.parse_url(url) == {
        "sentinels": [("s1", 26380), ("s2", 26379), ("10.0.0.3", 26381)],
        "master_name": "mymaster",
        "db": 2,
        "username": "user",
        "password": "p@ss",
    }


@sqlite_pass_only
def test_a_sentinel_urls_options_go_to_the_master_or_with_a_prefix_the_sentinels() -> (
    None
):
    url = (
        "rediss+sentinel://:secret@s1/cache?socket_timeout=2.5"
        "&sentinel_password=watch&sentinel_socket_timeout=1"
    )
    assert sentinel.parse_url(url) == {
        "sentinels": [("s1", 26379)],
        "master_name": "cache",
        "password": "secret",
        "ssl": True,
        "socket_timeout": 2.5,
        "sentinel_kwargs": {"password": "watch", "socket_timeout": 1.0},
    }


@sqlite_pass_only
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://s1:26379/0", "not a Sentinel URL"),
        ("redis+sentinel://s1:26379", "names no master"),
        ("redis+sentinel://s1:26379/mymaster/zero", "names no master"),
        ("redis+sentinel://s1:port/mymaster", "host[:port]"),
        ("redis+sentinel://s1,,s2/mymaster", "host[:port]"),
    ],
)
def test_a_sentinel_url_that_cannot_be_read_says_how_to_write_it(
    url: str, says: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(url))) as error:
        sentinel.parse_url(url)
    assert says in str(error.value)


@sqlite_pass_only
@pytest.mark.parametrize(
    "config",
    [
        {"master_name": "m"},
        {"master_name": "", "sentinels": [("s", 1)]},
        {"master_name": "m", "sentinels": []},
        {"master_name": "m", "sentinels": ["s:1"]},
    ],
)
def test_a_sentinel_dict_must_name_the_master_and_its_sentinels(
    config: dict[str, Any],
) -> None:
    with pytest.raises(ValueError, match="is not a Sentinel host"):
        sentinel.host_config(config)


SENTINEL_HOST = {"sentinels": [("s1", 26379)], "master_name": "mymaster", "db": 1}


@sqlite_pass_only
def test_the_leases_follow_a_channel_layer_behind_sentinel() -> None:
    layers = {"default": {"BACKEND": "x", "CONFIG": {"hosts": [SENTINEL_HOST]}}}
    with override_settings(CHANNEL_LAYERS=layers):
        assert leases.redis_config() == SENTINEL_HOST
        url = "redis+sentinel://s2/other"
        with override_settings(CHANNELS_PRESENCE_REDIS_URL=url):
            assert leases.redis_config() == url


def _e006(**overrides: Any) -> list[str]:
    with override_settings(**overrides):
        return [m.id for m in run_checks() if m.id == "channels_presence.E006"]


@sqlite_pass_only
@pytest.mark.parametrize(
    "value", ["redis+sentinel://s1:26379,s2:26379/mymaster/0", SENTINEL_HOST]
)
def test_a_sentinel_url_or_dict_is_a_lease_redis(value: Any) -> None:
    assert _e006(CHANNELS_PRESENCE_REDIS_URL=value) == []


@sqlite_pass_only
@pytest.mark.parametrize(
    "value", ["redis+sentinel://s1:26379", {"master_name": "m", "sentinels": []}]
)
def test_a_sentinel_url_or_dict_that_names_no_master_is_e006(value: Any) -> None:
    assert _e006(CHANNELS_PRESENCE_REDIS_URL=value) == ["channels_presence.E006"]


@sqlite_pass_only
def test_a_layer_behind_sentinel_that_names_no_sentinel_is_e006() -> None:
    broken = {"master_name": "mymaster", "sentinels": "s1:26379"}
    layers = {"default": {"BACKEND": "x", "CONFIG": {"hosts": [broken]}}}
    assert _e006(CHANNEL_LAYERS=layers) == ["channels_presence.E006"]


# A failover under load.

#: Seconds without an answer after which the Sentinels take the master for down.
DOWN_AFTER = 3.0
#: The lease time, shorter than DOWN_AFTER: the leases that the replica holds
#: have all expired by the time it is promoted, and the failover loses them.
#: A live server sets its lease again within a second of the promotion (it
#: retries every third of LEASE, at most every second), and is dead only once
#: its lease is missing at two checks LEASE / 2 apart. (A mutation that takes
#: a server for dead at its first missing lease fails this test.)
LEASE = 2.9
#: Websocket clients of the real daphne, in a room of their own.
REMOTE = 8
#: Seconds, from the kill, within which presence must have converged.
CONVERGENCE = 45

needs_sentinel = pytest.mark.skipif(
    shutil.which("redis-sentinel") is None,
    reason="Debian's redis-sentinel is not installed (python3 dev.py test installs "
    "it under CI=true): no Sentinel to fail over",
)


def _environment(topology: ThrowawaySentinel) -> dict[str, Any]:
    """The environment of the daphne, worker and beat on the Sentinel deployment."""
    return {
        "CHANNELS_PRESENCE_TEST_SENTINELS": ",".join(
            f"{host}:{port}" for host, port in topology.addresses
        ),
        "CHANNELS_PRESENCE_TEST_SERVER_LEASE": str(LEASE),
        "CHANNELS_PRESENCE_TEST_TOUCH_INTERVAL": "0.5",
    }


@contextmanager
def on_sentinel(topology: ThrowawaySentinel) -> Iterator[leases.Lease]:
    """This process's channel layer, outbox and lease on the Sentinel deployment."""
    host = {"sentinels": topology.addresses, "master_name": MASTER_NAME}
    app = Celery("sentinel", set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.conf.update(
        broker_url=";".join(f"sentinel://{h}:{p}" for h, p in topology.addresses),
        broker_transport_options={
            **settings.CELERY_BROKER_TRANSPORT_OPTIONS,
            "master_name": MASTER_NAME,
        },
    )
    box = Outbox(app, retry_interval=0.1, exit_timeout=1.0)
    default: dict[str, Any] = settings.CHANNEL_LAYERS["default"]
    layers = {"default": {**default, "CONFIG": {**default["CONFIG"], "hosts": [host]}}}
    saved_outbox, saved_lease = outbox.default, leases.default
    lease = leases.Lease()
    outbox.default, leases.default = box, lease
    try:
        with override_settings(
            CHANNEL_LAYERS=layers,
            CHANNELS_PRESENCE_USE_CELERY=True,
            CHANNELS_PRESENCE_TOUCH_INTERVAL=0.5,
            CHANNELS_PRESENCE_FLUSH_INTERVAL=0.2,
            CHANNELS_PRESENCE_SERVER_LEASE=LEASE,
        ):
            yield lease
            lease.release()
    finally:
        box.close()
        outbox.default, leases.default = saved_outbox, saved_lease
        outages.outage.failing.clear()


def _members(group: str) -> set[str]:
    """The channel names in ``group``, on the master the Sentinels name now."""
    layer: Any = get_channel_layer()
    with leases.client(timeout=2) as master:
        return {name.decode() for name in master.zrange(layer._group_key(group), 0, -1)}


def _rows(room: str) -> dict[str, str]:
    """The presences of ``room``: socket -> server."""
    return dict(
        Presence.objects.filter(room__channel_name=room).values_list(
            "channel_name", "server"
        )
    )


class Remote:
    """Websocket clients of the daphne that heartbeat, and connect again if dropped."""

    def __init__(self, daphne: Daphne) -> None:
        self.daphne = daphne
        self.open: set[int] = set()
        self.reconnects = 0
        self.tasks = [asyncio.create_task(self._client(n)) for n in range(REMOTE)]

    async def _client(self, number: int) -> None:
        first = True
        while True:
            try:
                async with connect(self.daphne.url("remote"), open_timeout=5) as ws:
                    self.open.add(number)
                    self.reconnects += not first
                    first = False
                    while True:
                        await ws.send('"heartbeat"')
                        await asyncio.sleep(0.3)
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed):
                pass
            self.open.discard(number)
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _lease_ttls(topology: ThrowawaySentinel, servers: set[str]) -> list[int]:
    """Milliseconds each server's lease has left on the replica (-2: none)."""
    with topology.replica.client() as replica:
        return [int(replica.pttl(leases.lease_key(server))) for server in servers]


def _checks_across_the_failover(
    topology: ThrowawaySentinel, servers: set[str]
) -> list[tuple[set[str], list[str]]]:
    """Check the servers' leases as prune_servers does, from the promotion on.

    Every 50 ms for 3 lease times, from the moment a Sentinel names the
    replica: the servers whose lease is missing, and those taken for dead.
    """
    checks: list[tuple[set[str], list[str]]] = []
    promoted = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if promoted is None:
            if topology.replica.port in topology.master_ports():
                promoted = time.monotonic()
            else:
                time.sleep(0.02)
                continue
        elif time.monotonic() - promoted > 3 * LEASE:
            break
        try:
            with leases.client(timeout=1) as master:
                missing = {s for s in servers if not master.exists(leases.lease_key(s))}
            checks.append((missing, leases.dead_servers(servers)))
        except redis.RedisError:
            pass
        time.sleep(0.05)
    return checks


async def _pruned(worker: CeleryProcess, age: float) -> None:
    """Send prune_presences(age) to the worker, and wait until it has run it."""
    app = outbox.default.app
    assert app is not None
    sent = await asyncio.to_thread(app.send_task, PRUNE, kwargs={"age": age})
    done = f"{PRUNE}[{sent.id}] succeeded"
    await wait_until(lambda: done in worker.output(), seconds=CONVERGENCE)


def _prune_servers_every_second() -> None:
    every, _ = IntervalSchedule.objects.get_or_create(
        every=1, period=IntervalSchedule.SECONDS
    )
    PeriodicTask.objects.filter(task="channels_presence.tasks.prune_servers").update(
        interval=every, expire_seconds=None
    )


@sqlite_pass_only
@needs_sentinel
@pytest.mark.django_db(transaction=True)
async def test_a_master_killed_under_load_fails_over_and_presence_converges(
    capsys: pytest.CaptureFixture[str],
) -> None:
    await asyncio.to_thread(_prune_servers_every_second)
    with throwaway_sentinel(down_after=DOWN_AFTER) as topology:
        env = _environment(topology)
        with (
            on_sentinel(topology) as lease,
            celery_worker("sentinel", **env) as worker,
            celery_beat(**env),
        ):
            daphne = Daphne(**env)
            # Mixins, which join again at their next message when a join
            # failed: a decorated consumer whose group add fails while no
            # master is named never joins (dispatch does not retry it).
            load = Load(kinds=[*MIXINS, *MIXINS])
            remote = Remote(daphne)
            try:
                await _converges(load, remote, seconds=30)
                theirs = set((await asyncio.to_thread(_rows, "remote")).values())
                assert len(theirs) == 1, theirs
                servers = {lease.server(), *theirs}

                killed = time.monotonic()
                topology.kill_master()
                # What the replica holds of the leases now is all it will ever
                # hold (no master takes writes until it is promoted): each
                # expires within LEASE, before DOWN_AFTER can promote it.
                ttls = await asyncio.to_thread(_lease_ttls, topology, servers)
                assert all(ttl <= LEASE * 1000 for ttl in ttls), ttls
                watch = asyncio.create_task(
                    asyncio.to_thread(_checks_across_the_failover, topology, servers)
                )
                failover = asyncio.create_task(
                    asyncio.to_thread(topology.wait_for_failover, 30)
                )
                while not failover.done():
                    await loaded(load, 0.2)
                switched = await failover
                # Every lease the replica held expired before it was promoted.
                assert switched - killed > LEASE
                checks = await watch
                # Checks as prune_servers makes them, from the promotion on,
                # while the servers set their leases again: none found dead.
                missing = [check for check in checks if check[0]]
                assert checks
                assert [dead for _, dead in checks if dead] == []

                ghosts = await _converges(load, remote, ghosts=True)
                converged = time.monotonic() - killed
                # Rows whose leave the failover lost (a task the replica had
                # not received) go with a prune, as beat's would. The touches
                # the outbox holds go first: it sends tasks before touches.
                await asyncio.sleep(max(0.0, PRUNE_AGE - (time.monotonic() - switched)))
                await loaded(load, 0.5)
                await asyncio.to_thread(outbox.default.flush, 10)
                await _pruned(worker, PRUNE_AGE)
                await _converges(load, remote)
                pruned = time.monotonic() - killed
                assert load.failures == []
                # No live server was taken for dead, though the leases were lost.
                assert "lost their lease" not in worker.output()
                found = {
                    *(await asyncio.to_thread(_rows, "remote")).values(),
                    *(await asyncio.to_thread(_rows, "lobby")).values(),
                }
                assert found == servers
            except BaseException:
                print(f"--- daphne output ---\n{daphne.output()}")
                raise
            finally:
                await remote.close()
                await load.close()
                daphne.close()
    assert load.dropped, "the failover dropped no socket: was the master down?"
    with capsys.disabled():
        print(
            f"\n[sentinel] master killed: the Sentinels named the replica after "
            f"{switched - killed:.1f} s (down-after {DOWN_AFTER:g} s); rows, "
            f"sockets and groups converged {converged:.1f} s after the kill but "
            f"for {len(ghosts)} ghosts, {pruned:.1f} s with the prune; "
            f"{load.calls} handler calls, none raised, slowest {load.slowest:.3f} s; "
            f"{len(load.dropped)} in-process and {remote.reconnects} daphne sockets "
            "dropped by Channels and connected again; leases missing at "
            f"{len(missing)} of {len(checks)} checks after the promotion, 0 servers "
            "taken for dead"
        )


async def _converges(
    load: Load, remote: Remote, *, ghosts: bool = False, seconds: float = CONVERGENCE
) -> set[str]:
    """Go on with the load until rows = sockets = groups; return the ghosts.

    The daphne's sockets are known by number only: its room's rows must be as
    many as its open clients, and be its groups' members. With ``ghosts``, rows
    of in-process sockets that are gone may remain, and their group members.
    """
    deadline = time.monotonic() + seconds
    found: set[str] = set()
    while True:
        live = load.sockets()
        try:
            found = set(await asyncio.to_thread(_rows, "lobby"))
            theirs = set(await asyncio.to_thread(_rows, "remote"))
            lobby = await asyncio.to_thread(_members, "lobby")
            lobby_events = await asyncio.to_thread(_members, events_group("lobby"))
            remote_members = await asyncio.to_thread(_members, "remote")
            remote_events = await asyncio.to_thread(_members, events_group("remote"))
        except (OSError, redis.RedisError):
            # The master is not named yet, or not answering yet.
            lobby = set()
        else:
            mixins = load.sockets(*MIXINS)
            if (
                # Ghosts stay in their groups until pruned, as rows do.
                (live <= found == lobby if ghosts else live == found == lobby)
                and (
                    mixins <= lobby_events <= found
                    if ghosts
                    else mixins == lobby_events
                )
                and len(theirs) == len(remote.open) == REMOTE
                and theirs == remote_members == remote_events
            ):
                return found - live
        if time.monotonic() > deadline:
            kinds = {
                channel_of(c): c.scope["kind"].__name__
                for c in load.clients
                if channel_of(c) not in found
            }
            raise AssertionError(
                f"presence did not converge in {seconds} s: rows {found}, sockets "
                f"{live}, groups {lobby}; live without a row: {kinds}; daphne "
                f"clients open {len(remote.open)}, failures {load.failures}"
            )
        await load.step(1)
        await asyncio.sleep(0.1)
