"""After commit, the channel layer fails: nothing is undone, repeated, or left wrong.

A change set is committed before its frames are sent and its departed sockets
leave their groups. Here the channel layer (a throwaway Redis) refuses exactly
those calls, after the commit: Redis ACLs take ZREM (the group discards) and
EVAL (every send) away from the layer's user, and give them back later. The
task that applied the change does not fail, so Celery never runs it again;
the discards are retried in the background until the layer answers; and a
client that missed the diff is brought back by the next version beacon, which
shows it is behind, and a sync.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.test import override_settings

from channels_presence import broadcast, operations, tasks
from channels_presence.groups import events_group
from channels_presence.models import Room
from channels_presence.testing import RoomView, channel_messages, members_now
from tests.helpers import group_members, wait_until
from tests.servers import ThrowawayRedis, throwaway_redis

pytestmark = pytest.mark.django_db(transaction=True)

ROOM = "lobby"


@contextmanager
def layer_on(server: ThrowawayRedis) -> Iterator[Any]:
    default: dict[str, Any] = settings.CHANNEL_LAYERS["default"]
    layers = {
        "default": {**default, "CONFIG": {**default["CONFIG"], "hosts": [server.url]}}
    }
    with override_settings(CHANNEL_LAYERS=layers, REDIS_URL=server.url):
        yield get_channel_layer()


@contextmanager
def refusing(server: ThrowawayRedis, *commands: str) -> Iterator[None]:
    """The layer's Redis refuses ``commands`` (NOPERM) until the block ends."""
    with server.client() as client:
        client.execute_command(
            "ACL", "SETUSER", "default", *(f"-{c}" for c in commands)
        )
    try:
        yield
    finally:
        with server.client() as client:
            client.execute_command("ACL", "SETUSER", "default", "+@all")


def received(layer: Any, channel: str) -> list[dict[str, Any]]:
    return channel_messages(channel, layer)


def members_of(server: ThrowawayRedis, layer: Any, group: str) -> set[str]:
    with server.client() as client:
        return {name.decode() for name in client.zrange(layer._group_key(group), 0, -1)}


def test_a_failed_send_and_discard_after_commit_converge_once_the_layer_answers(
    signals: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    with throwaway_redis() as server, layer_on(server) as layer:
        now = time.time()
        tasks.add_presence(ROOM, "specific.a!stays", None, now, True)
        tasks.add_presence(ROOM, "specific.a!leaves", None, now, True)
        watcher = async_to_sync(layer.new_channel)()
        async_to_sync(layer.group_add)(events_group(ROOM), watcher)
        view = RoomView(ROOM)
        view.receive(operations.read_state(ROOM))
        version = Room.objects.get(channel_name=ROOM).version
        signals.clear()

        with refusing(server, "zrem", "eval"):
            # As a worker runs it: it must not raise, or Celery would retry it.
            tasks.remove_presence(ROOM, "specific.a!leaves", now + 1)
            # Run again (a redelivery): it changes nothing more.
            tasks.remove_presence(ROOM, "specific.a!leaves", now + 1)

        # Committed once: the row is gone, the version moved by one, one signal.
        room = Room.objects.get(channel_name=ROOM)
        assert room.version == version + 1
        assert room.counts() == (0, 1, 1)
        assert [s["removed"].channel_name for s in signals] == ["specific.a!leaves"]
        # The discard failed, is logged, and waits to be retried.
        assert "specific.a!leaves" in members_of(server, layer, ROOM)
        assert broadcast.retries.pending() >= 1
        assert "retried in the background" in caplog.text
        # The diff never reached the watcher.
        assert [f["type"] for f in received(layer, watcher)] == []

        # The layer answers again: the retry discards, once, for good.
        assert broadcast.retries.retry()
        assert members_of(server, layer, ROOM) == {"specific.a!stays"}
        assert members_of(server, layer, events_group(ROOM)) == {
            "specific.a!stays",
            watcher,
        }
        assert broadcast.retries.pending() == 0
        assert broadcast.retries.retry()
        assert members_of(server, layer, ROOM) == {"specific.a!stays"}

        # The beat's beacon shows the client it is behind; it syncs.
        operations.send_beacons(60)
        (beacon,) = received(layer, watcher)
        view.receive(beacon)
        assert view.behind
        view.receive(operations.read_state(ROOM))
        assert not view.behind
        assert view.members == members_now(ROOM)


def test_a_join_whose_group_add_fails_after_commit_stands_and_its_add_is_retried(
    signals: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    # Groups change after commit, with no lock held: the join is written,
    # and its group add goes through once the layer answers.
    with (
        throwaway_redis() as server,
        layer_on(server) as layer,
        override_settings(),
    ):
        saved = broadcast.RETRY_FIRST
        broadcast.RETRY_FIRST = 0.2
        try:
            with refusing(server, "zadd"):
                # As a worker runs it: it must not raise, or Celery would
                # apply it again.
                tasks.add_presence(ROOM, "specific.a!1", None, time.time(), True)
                assert Room.objects.get(channel_name=ROOM).counts() == (0, 1, 1)
                assert [s["added"].channel_name for s in signals] == ["specific.a!1"]
                assert members_of(server, layer, ROOM) == set()
                assert "retried in the background" in caplog.text
            async_to_sync(wait_until)(lambda: broadcast.retries.pending() == 0)
            assert members_of(server, layer, ROOM) == {"specific.a!1"}
        finally:
            broadcast.RETRY_FIRST = saved


def test_discards_retried_in_the_background_go_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        throwaway_redis() as server,
        layer_on(server) as layer,
        override_settings(),
    ):
        saved = broadcast.RETRY_FIRST
        broadcast.RETRY_FIRST = 0.2
        try:
            now = time.time()
            tasks.add_presence(ROOM, "specific.a!1", None, now, True)
            with refusing(server, "zrem"):
                tasks.leave_all("specific.a!1", now + 1)
                assert members_of(server, layer, ROOM) == {"specific.a!1"}
            # Not called by the test: the background thread does it.
            async_to_sync(wait_until)(lambda: broadcast.retries.pending() == 0)
            assert members_of(server, layer, ROOM) == set()
        finally:
            broadcast.RETRY_FIRST = saved
        assert group_members(ROOM) == set()
