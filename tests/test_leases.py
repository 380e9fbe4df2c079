# mypy: disallow-subclassing-any=False
"""Server leases: a crashed server's presences go within seconds, a live one's stay.

The first tests drive ``leases`` directly against the real Redis (under the
run's prefix) and a throwaway one; the last kills a real ``daphne`` holding 100
websockets, with a real worker and beat, and watches its presences go.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from asgiref.sync import async_to_sync
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from django.urls import path

from channels_presence import clock, leases
from channels_presence.groups import events_group
from channels_presence.models import Presence, Room
from channels_presence.tasks import add_presence
from example.consumers import RoomConsumer
from tests.helpers import group_members, wait_until
from tests.servers import Daphne, ThrowawayRedis
from tests.workers import celery_beat, celery_worker, purge_queue


@pytest.fixture(autouse=True)
def _no_lease_keys() -> Iterator[None]:
    """Each test starts and ends with none of the run's lease keys."""
    _delete_lease_keys()
    yield
    _delete_lease_keys()


def _delete_lease_keys(*, own_too: bool = False) -> None:
    # This process's own lease is kept: its refresh thread may be sleeping.
    own = leases.lease_key(leases.default.id).encode()
    with redis.Redis.from_url(settings.REDIS_URL) as client:
        keys = list(client.scan_iter(f"{leases.key_prefix()}:*"))
        keys = [key for key in keys if own_too or key != own]
        if keys:
            client.delete(*keys)


def _hold(server: str, seconds: float = 60) -> None:
    with redis.Redis.from_url(settings.REDIS_URL) as client:
        client.set(leases.lease_key(server), server, px=int(seconds * 1000))


# Where the leases live.


def test_leases_live_in_the_channel_layers_redis_under_its_prefix() -> None:
    assert leases.redis_config() == settings.REDIS_URL
    prefix = f"cp-test-{settings.RUN}"
    assert leases.lease_key("a") == f"channels-presence:{prefix}:lease:a"


@pytest.mark.parametrize(
    ("hosts", "url"),
    [
        (["redis://h:1/2"], "redis://h:1/2"),
        ([("h", 7)], "redis://h:7"),
        ([{"address": "redis://h:8"}], "redis://h:8"),
    ],
)
def test_the_lease_redis_is_read_from_each_form_of_channel_layer_host(
    hosts: list[Any], url: str
) -> None:
    layers = {"default": {"BACKEND": "x", "CONFIG": {"hosts": hosts}}}
    with override_settings(CHANNEL_LAYERS=layers):
        assert leases.redis_config() == url


def test_the_lease_redis_setting_wins() -> None:
    with override_settings(CHANNELS_PRESENCE_REDIS_URL="redis://elsewhere:1/0"):
        assert leases.redis_config() == "redis://elsewhere:1/0"


def test_a_host_it_cannot_read_says_to_set_the_lease_redis() -> None:
    layers = {"default": {"BACKEND": "x", "CONFIG": {"hosts": [42]}}}
    with (
        override_settings(CHANNEL_LAYERS=layers),
        pytest.raises(ImproperlyConfigured, match="CHANNELS_PRESENCE_REDIS_URL"),
    ):
        leases.redis_config()


# Which servers are dead.


def test_a_lease_missing_at_two_checks_far_enough_apart_is_a_dead_server() -> None:
    _hold("alive")
    with override_settings(CHANNELS_PRESENCE_SERVER_LEASE=0.4):
        # First sight of the missing lease: only marked.
        assert leases.dead_servers(["alive", "gone"]) == []
        # Too soon after the mark (under half the lease time).
        assert leases.dead_servers(["alive", "gone"]) == []
        time.sleep(0.25)
        assert leases.dead_servers(["alive", "gone"]) == ["gone"]


def test_a_lease_back_before_the_second_check_clears_the_mark() -> None:
    with override_settings(CHANNELS_PRESENCE_SERVER_LEASE=0.4):
        assert leases.dead_servers(["late"]) == []
        _hold("late")
        time.sleep(0.25)
        assert leases.dead_servers(["late"]) == []
        with redis.Redis.from_url(settings.REDIS_URL) as client:
            assert not client.exists(leases.mark_key("late"))


def test_a_live_server_survives_redis_losing_every_key() -> None:
    lease = leases.Lease()
    with override_settings(CHANNELS_PRESENCE_SERVER_LEASE=0.6):
        server = lease.server()
        try:
            async_to_sync(wait_until)(
                lambda: bool(
                    redis.Redis.from_url(settings.REDIS_URL).exists(
                        leases.lease_key(server)
                    )
                )
            )
            for _ in range(3):
                # What a FLUSHALL, or a restart without persistence, does.
                _delete_lease_keys(own_too=True)
                assert leases.dead_servers([server]) == []
                time.sleep(0.35)
                assert leases.dead_servers([server]) == []
        finally:
            lease.release()
    with redis.Redis.from_url(settings.REDIS_URL) as client:
        # Given up at exit: a server that stops cleanly leaves no lease.
        assert not client.exists(leases.lease_key(server))


def test_nothing_is_dead_while_the_lease_redis_has_just_started() -> None:
    server = ThrowawayRedis()
    server.start()
    try:
        with override_settings(
            CHANNELS_PRESENCE_REDIS_URL=server.url, CHANNELS_PRESENCE_SERVER_LEASE=2
        ):
            # Up for less than a lease time: a restart that lost the leases.
            assert leases.dead_servers(["gone"]) == []
            time.sleep(1.1)
            assert leases.dead_servers(["gone"]) == []
            with server.client() as client:
                while int(client.info("server")["uptime_in_seconds"]) < 2:
                    time.sleep(0.1)
            assert leases.dead_servers(["gone"]) == []
            time.sleep(1.05)
            assert leases.dead_servers(["gone"]) == ["gone"]
    finally:
        server.stop()


def test_leases_off_means_no_server_id_and_nothing_dead() -> None:
    with override_settings(CHANNELS_PRESENCE_SERVER_LEASE=None):
        assert leases.Lease().server() == ""
        assert leases.dead_servers(["gone"]) == []
        assert leases.prune_servers() == []


# This server's clock beside Redis's.


def _clock_lines(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    offsets: list[float],
) -> list[logging.LogRecord]:
    """Renew a lease once per offset, this server's clock that many seconds
    ahead of the real one at each renewal; the lines logged about its clock.

    Only the lease's own thread sees the offset: the process's default lease
    may be renewing at the same time.
    """
    lease = leases.Lease()
    reads = renewals = 0
    real_lease_key = leases.lease_key

    def seconds() -> float:
        nonlocal reads
        if threading.current_thread() is not lease._thread:
            return time.time()
        # Two reads a renewal: before its round trip to Redis, and after.
        offset = offsets[min(reads // 2, len(offsets) - 1)]
        reads += 1
        return time.time() + offset

    def lease_key(server: str) -> str:
        nonlocal renewals
        if threading.current_thread() is lease._thread:
            renewals += 1
        return real_lease_key(server)

    monkeypatch.setattr(clock, "seconds", seconds)
    monkeypatch.setattr(leases, "lease_key", lease_key)
    caplog.set_level(logging.INFO, logger="channels_presence")
    with override_settings(CHANNELS_PRESENCE_SERVER_LEASE=0.3):
        lease.server()
        try:
            # Once the renewal after the last offset's has begun, every
            # offset's renewal is over, and logged what it would.
            async_to_sync(wait_until)(lambda: renewals > len(offsets))
        finally:
            lease.release()
    return [
        record
        for record in caplog.records
        if lease.id in record.getMessage() and "clock" in record.getMessage()
    ]


def test_a_clock_far_from_redis_is_logged_once_saying_what_goes_wrong(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lines = _clock_lines(monkeypatch, caplog, [30.0] * 6)
    assert [line.levelno for line in lines] == [logging.WARNING]
    message = lines[0].getMessage()
    ahead = re.search(r"is ([\d.]+) s ahead of Redis's", message)
    assert ahead, message
    assert float(ahead[1]) == pytest.approx(30, abs=0.5)
    for consequence in ("leave", "join", "pruned", "NTP"):
        assert consequence in message


def test_a_clock_behind_redis_is_logged_too(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lines = _clock_lines(monkeypatch, caplog, [-30.0] * 4)
    assert [line.levelno for line in lines] == [logging.WARNING]
    assert "behind" in lines[0].getMessage()


@pytest.mark.parametrize("offset", [0.0, leases.MAX_CLOCK_SKEW - 1])
def test_a_clock_within_the_limit_of_redis_is_not_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, offset: float
) -> None:
    assert _clock_lines(monkeypatch, caplog, [offset] * 6) == []


def test_a_clock_that_comes_back_and_strays_again_is_logged_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lines = _clock_lines(monkeypatch, caplog, [30.0] * 3 + [0.0] * 3 + [30.0] * 3)
    assert [line.levelno for line in lines] == [
        logging.WARNING,
        logging.INFO,
        logging.WARNING,
    ]
    assert "back within" in lines[1].getMessage()


@pytest.mark.parametrize(
    ("sent", "received", "redis_time", "skew"),
    [
        (100.0, 100.0, 100.0, 0.0),
        # Redis read its clock somewhere in the round trip: within it, no skew.
        (100.0, 100.4, 100.0, 0.0),
        (100.0, 100.4, 100.4, 0.0),
        # Beyond it, only what the round trip cannot explain.
        (100.0, 100.4, 110.0, 9.6),
        (100.0, 100.4, 90.0, -10.0),
    ],
)
def test_the_skew_is_redis_time_less_ours_beyond_what_the_round_trip_explains(
    sent: float, received: float, redis_time: float, skew: float
) -> None:
    assert clock.skew(sent, received, redis_time) == pytest.approx(skew)


# Removing their presences.


@pytest.mark.django_db(transaction=True)
async def test_prune_servers_removes_only_a_dead_servers_presences(signals) -> None:
    await asyncio.to_thread(_hold, "alive")
    layer_messages: list[dict[str, Any]] = []
    watcher = WebsocketCommunicator(_room_app(), "/ws/rooms/lobby/")
    await watcher.connect()
    watcher_channel = await _channel_of(watcher)
    try:
        await asyncio.to_thread(_join, "lobby", "test.x!dead1", "gone")
        await asyncio.to_thread(_join, "lobby", "test.x!alive", "alive")
        await asyncio.to_thread(_join, "kitchen", "test.x!dead2", "gone")
        # 1.0.0-style, through the manager: no server, never removed by this.
        await asyncio.to_thread(Room.objects.add, "kitchen", "test.x!legacy")
        with override_settings(CHANNELS_PRESENCE_SERVER_LEASE=0.4):
            assert await asyncio.to_thread(leases.prune_servers) == []
            await asyncio.sleep(0.25)
            removed = await asyncio.to_thread(leases.prune_servers)
        assert sorted(p.channel_name for p in removed) == [
            "test.x!dead1",
            "test.x!dead2",
        ]
        left = Presence.objects.values_list("channel_name", flat=True)
        assert {name async for name in left} == {
            "test.x!alive",
            "test.x!legacy",
            watcher_channel,
        }
        assert await asyncio.to_thread(group_members, "lobby") == {
            "test.x!alive",
            watcher_channel,
        }
        assert await asyncio.to_thread(group_members, "kitchen") == {"test.x!legacy"}
        # The room heard of it, as of a prune: one bulk change per room.
        bulk = [s["room"].channel_name for s in signals if s["bulk_change"]]
        assert sorted(bulk) == ["kitchen", "lobby"]
        while True:
            frame = await watcher.receive_json_from(timeout=3)
            layer_messages.append(frame)
            if frame["type"] == "presence.diff" and frame["leaves"]:
                break
        assert frame["counts"]["sockets"] == 2
        # The diff says why they left, and names no socket.
        reasons = {
            meta["reason"]
            for member in frame["leaves"].values()
            for meta in member["metas"]
        }
        assert reasons == {"server_lost"}
        assert "test.x!dead1" not in json.dumps(layer_messages)
    finally:
        await watcher.disconnect()


def _join(room: str, channel_name: str, server: str) -> None:
    add_presence(room, channel_name, None, time.time(), server=server)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("server", "error"),
    [(42, TypeError), (None, TypeError), ("x" * 101, ValueError), ("a\nb", ValueError)],
)
def test_a_join_with_a_bad_server_writes_nothing(server: Any, error: type) -> None:
    with pytest.raises(error, match="server"):
        add_presence("lobby", "test.x!a", None, time.time(), server=server)
    assert not Presence.objects.exists()
    assert group_members("lobby") == set()


# A real daphne, killed.

#: Sockets on the daphne that is killed, and the rooms they are spread over.
SOCKETS = 100
ROOMS = [f"room{i}" for i in range(5)]
#: Seconds within which a killed server's presences must be gone.
PURGE_TIMEOUT = 30


@pytest.mark.django_db(transaction=True)
async def test_a_killed_daphnes_presences_go_and_the_other_servers_hear_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    await asyncio.to_thread(purge_queue)
    daphne = Daphne()
    clients: list[Any] = []
    others: list[WebsocketCommunicator] = []
    with (
        override_settings(CHANNELS_PRESENCE_USE_CELERY=True),
        celery_worker(),
        celery_beat(),
    ):
        try:
            # The other server: this process, one socket in each room.
            for room in ROOMS:
                other = WebsocketCommunicator(_room_app(), f"/ws/rooms/{room}/")
                assert (await other.connect())[0]
                others.append(other)
            for number in range(SOCKETS):
                clients.append(await _connect(daphne, ROOMS[number % len(ROOMS)]))
            await _until(lambda: _count() == SOCKETS + len(ROOMS))
            servers = await asyncio.to_thread(_servers)
            mine = leases.default.server()
            assert set(servers) == {mine, *set(servers) - {mine}}
            assert len(servers) == 2, servers
            assert servers[mine] == len(ROOMS)
            theirs = next(name for name in servers if name != mine)
            kept = await asyncio.to_thread(_rows, mine)
            # Read what the other server's room0 socket has been told so far.
            watcher = others[0]
            while not await watcher.receive_nothing(timeout=0.5):
                await watcher.receive_json_from()

            killed_at = time.monotonic()
            daphne.kill()
            await _until(lambda: _on_server(theirs) == 0)
            took = time.monotonic() - killed_at

            # The other server's presences are untouched, and still grouped;
            # the dead sockets leave the groups just after the commit.
            assert await asyncio.to_thread(_rows, mine) == kept
            expected = {
                (room, frozenset(c for r, c, _ in kept if r == room)) for room in ROOMS
            }
            await wait_until(lambda: _grouped() == expected, seconds=10)
            # And its socket in room0 was told they left.
            while True:
                frame = await watcher.receive_json_from(timeout=10)
                if frame["type"] == "presence.diff" and frame["counts"]["sockets"] == 1:
                    break
            with capsys.disabled():
                print(
                    f"\n[leases] {SOCKETS} presences of a SIGKILLed daphne removed "
                    f"{took:.1f} s after the kill (lease 10 s, prune_servers every 5 s)"
                )
        except BaseException:
            print(f"--- daphne output ---\n{daphne.output()}")
            raise
        finally:
            for ws in clients:
                ws.transport.abort()
            for other in others:
                await other.disconnect()
            daphne.close()
            await asyncio.to_thread(purge_queue)


async def _until(check: Any, seconds: float = PURGE_TIMEOUT) -> None:
    """Wait until ``check()``, a database query, holds; fail after ``seconds``."""
    async with asyncio.timeout(seconds):
        while True:
            if await asyncio.to_thread(check):
                return
            await asyncio.sleep(0.2)


async def _connect(daphne: Daphne, room: str) -> Any:
    return await daphne.connect(room)


def _grouped() -> set[tuple[str, frozenset[str]]]:
    """Each room with its group's members, which its events group must match."""
    found = set()
    for room in ROOMS:
        members = group_members(room)
        if group_members(events_group(room)) != members:
            return set()
        found.add((room, frozenset(members)))
    return found


def _count() -> int:
    return Presence.objects.count()


def _on_server(server: str) -> int:
    return Presence.objects.filter(server=server).count()


def _servers() -> dict[str, int]:
    found: dict[str, int] = {}
    for server in Presence.objects.values_list("server", flat=True):
        found[server] = found.get(server, 0) + 1
    return found


def _rows(server: str) -> set[tuple[str, str, Any]]:
    presences = Presence.objects.filter(server=server)
    return set(presences.values_list("room__channel_name", "channel_name", "pk"))


def _room_app() -> Any:
    return URLRouter([path("ws/rooms/<str:room>/", RoomConsumer.as_asgi())])


async def _channel_of(communicator: WebsocketCommunicator) -> str:
    # The mixin's socket joined its room: its channel is the one there.
    await wait_until(lambda: bool(group_members("lobby")))
    (channel,) = await asyncio.to_thread(group_members, "lobby")
    return channel


# Its beat entry, its settings.

PRUNE_SERVERS = "channels_presence.tasks.prune_servers"


@pytest.mark.django_db
def test_migrate_made_the_prune_servers_entry_every_5_seconds() -> None:
    from django_celery_beat.models import PeriodicTask

    made = PeriodicTask.objects.select_related("interval").get(task=PRUNE_SERVERS)
    assert made.name == "channels_presence: prune crashed servers"
    assert made.enabled
    assert made.interval is not None
    assert (made.interval.every, made.interval.period) == (5, "seconds")
    # A prune still queued at the next interval is dropped, as for the others.
    assert made.expire_seconds == 5


@pytest.mark.django_db
def test_the_prune_servers_interval_comes_from_its_setting() -> None:
    from django_celery_beat.models import PeriodicTask

    from channels_presence.schedule import ensure_schedule

    PeriodicTask.objects.filter(task=PRUNE_SERVERS).delete()
    with override_settings(CHANNELS_PRESENCE_SERVER_PRUNE_INTERVAL=12.5):
        assert ensure_schedule() == ["channels_presence: prune crashed servers"]
    made = PeriodicTask.objects.select_related("interval").get(task=PRUNE_SERVERS)
    assert made.interval is not None
    assert made.interval.every == 13


def lease_errors(**overrides: Any) -> list[str]:
    from django.core.checks import run_checks

    with override_settings(**overrides):
        return [
            m.id
            for m in run_checks()
            if m.id in ("channels_presence.E005", "channels_presence.E006")
            or (m.id == "channels_presence.E003" and "SERVER_PRUNE" in m.msg)
        ]


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "10", True])
def test_a_bad_lease_time_is_reported_at_startup(value: Any) -> None:
    assert lease_errors(CHANNELS_PRESENCE_SERVER_LEASE=value) == [
        "channels_presence.E005"
    ]


@pytest.mark.parametrize("value", [None, 0.5, 10, 60])
def test_a_good_lease_time_is_not_reported(value: Any) -> None:
    assert lease_errors(CHANNELS_PRESENCE_SERVER_LEASE=value) == []


@pytest.mark.parametrize("value", ["127.0.0.1:6379", 6379, "http://redis"])
def test_a_lease_redis_that_is_not_a_redis_url_is_reported(value: Any) -> None:
    assert lease_errors(CHANNELS_PRESENCE_REDIS_URL=value) == ["channels_presence.E006"]


def test_no_redis_to_keep_the_leases_in_is_reported_unless_leases_are_off() -> None:
    layers = {"default": {"BACKEND": "x.Layer", "CONFIG": {"hosts": [42]}}}
    assert "channels_presence.E006" in lease_errors(CHANNEL_LAYERS=layers)
    assert "channels_presence.E006" not in lease_errors(
        CHANNEL_LAYERS=layers, CHANNELS_PRESENCE_SERVER_LEASE=None
    )


@pytest.mark.parametrize("value", [-1, "5", float("nan")])
def test_a_bad_prune_servers_interval_is_reported(value: Any) -> None:
    assert lease_errors(CHANNELS_PRESENCE_SERVER_PRUNE_INTERVAL=value) == [
        "channels_presence.E003"
    ]
