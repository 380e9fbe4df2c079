# mypy: disallow-subclassing-any=False
"""Celery mode end to end: consumers in this process, a real worker beside it.

The consumers send their tasks through the process's outbox to the run's queue
on the real Redis broker; a ``celery -A tasks worker`` subprocess applies them to
the test database and broadcasts through the real Redis channel layer.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.test import override_settings

from channels_presence.consumers import PresenceConsumerMixin
from tests.consumers import AsyncJsonEchoConsumer, connected
from tests.helpers import group_members, sockets, wait_until
from tests.workers import CeleryProcess, celery_worker, purge_queue

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("celery_mode"),
]


@pytest.fixture
def celery_mode() -> Iterator[None]:
    purge_queue()
    with override_settings(CHANNELS_PRESENCE_USE_CELERY=True):
        yield
    purge_queue()


@pytest.fixture
def worker() -> Iterator[CeleryProcess]:
    with celery_worker() as process:
        yield process


class LobbyConsumer(PresenceConsumerMixin, AsyncJsonEchoConsumer):
    presence_rooms = ["lobby"]


async def test_a_join_reaches_the_other_clients_from_the_worker(
    worker: CeleryProcess, alice, bob
) -> None:
    async with connected(LobbyConsumer.as_asgi(), user=alice) as a:
        event = await a.receive_type("presence")
        assert [m["username"] for m in event["members"]] == ["alice"]
        async with connected(LobbyConsumer.as_asgi(), user=bob):
            event = await a.receive_type("presence")
            assert [m["username"] for m in event["members"]] == ["alice", "bob"]
            assert len(await sockets()) == 2
            assert len(group_members("lobby")) == 2
        event = await a.receive_type("presence")
        assert [m["username"] for m in event["members"]] == ["alice"]
    await wait_until(lambda: _count(0))
    assert group_members("lobby") == set()


async def _count(expected: int) -> bool:
    return len(await sockets()) == expected
